"""Freeze: each selection against a hand-written list of parameter names, and a save/load round trip."""

import copy
import json

import pytest
import torch

from tokentune.adapters.freeze import FreezeAdapter, FreezeConfig
from tokentune.errors import TokentuneError

from .helpers import attach, logits, randomize, tiny_bert_classifier

LLAMA_BLOCK_1 = [f"model.layers.1.{n}" for n in (
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight")]


def selected(model, **kwargs) -> list[str]:
    adapter = attach(FreezeAdapter(FreezeConfig(**kwargs)), model)
    names = [n for g in adapter.param_groups() for n, _ in g.params]
    assert set(names) == {n for n, p in model.named_parameters() if p.requires_grad}
    return sorted(names)


@pytest.mark.parametrize("kwargs, expected", [
    ({"layers": "1"}, sorted(LLAMA_BLOCK_1)),
    ({"layers": [-1]}, sorted(LLAMA_BLOCK_1)),
    ({"train": [r"mlp\.down_proj"], "layers": [0]}, ["model.layers.0.mlp.down_proj.weight"]),
    ({"train": ["norm"]}, sorted(["model.norm.weight"] + [f"model.layers.{i}.{n}_layernorm.weight"
                                                          for i in range(2) for n in ("input", "post_attention")])),
    ({"include_final_norm": True, "include_embeddings": True}, ["model.embed_tokens.weight", "model.norm.weight"]),
    # The tied LM head is the embedding tensor: listed once, under the embedding's name.
    ({"include_head": True}, ["model.embed_tokens.weight"]),
])
def test_llama_selections(tiny_llama, kwargs, expected):
    assert selected(tiny_llama, **kwargs) == expected
    if "model.embed_tokens.weight" in expected:
        assert tiny_llama.lm_head.weight.requires_grad


def test_gpt2_blocks_and_embeddings(tiny_gpt2):
    names = selected(tiny_gpt2, layers="0-1", include_embeddings=True)
    blocks = [n for n, _ in tiny_gpt2.named_parameters() if n.startswith("transformer.h.")]
    assert names == sorted(blocks + ["transformer.wte.weight", "transformer.wpe.weight"])


def test_bert_classifier_head_trains_by_default():
    model = tiny_bert_classifier()
    names = selected(model, layers=[-1])
    assert {"classifier.weight", "classifier.bias"} <= set(names)
    assert not any(n.startswith("bert.pooler") or ".layer.0." in n for n in names)
    assert "classifier.weight" not in selected(tiny_bert_classifier(), layers=[-1], include_head=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"train": ["nonexistent"]}, "matches no parameter"),
    ({"train": [r"layers\.0\."], "layers": [1]}, "matches no parameter inside layers"),
    ({"layers": [2]}, "does not exist"),
    ({}, "selects no parameter"),
])
def test_attach_errors(tiny_llama, kwargs, match):
    with pytest.raises(TokentuneError, match=match) as info:
        attach(FreezeAdapter(FreezeConfig(**kwargs)), tiny_llama)
    if "nonexistent" in str(kwargs):
        assert "model.embed_tokens.weight" in info.value.fix  # shows what names look like


@pytest.mark.parametrize("kwargs", [{"layers": "3-1"}, {"layers": "a"}, {"train": ["("]}])
def test_config_errors(kwargs):
    with pytest.raises(TokentuneError):
        FreezeConfig(**kwargs)


def test_save_load_round_trip(tiny_llama, tmp_path):
    fresh = copy.deepcopy(tiny_llama)
    adapter = attach(FreezeAdapter(FreezeConfig(layers=[-1], include_final_norm=True)), tiny_llama)
    randomize(adapter, std=0.05)
    adapter.save(tmp_path / "out", "the-base")
    meta = json.loads((tmp_path / "out" / "tokentune_adapter.json").read_text())
    assert meta["base_model_name_or_path"] == "the-base" and "model.norm.weight" in meta["parameters"]

    attach(FreezeAdapter(FreezeConfig(layers=[-1], include_final_norm=True)), fresh).load(tmp_path / "out")
    assert torch.equal(logits(fresh), logits(tiny_llama))
    with pytest.raises(TokentuneError, match="does not match"):
        attach(FreezeAdapter(FreezeConfig(layers=[0])), copy.deepcopy(fresh)).load(tmp_path / "out")
