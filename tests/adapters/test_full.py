"""Full fine-tuning: tied weights listed once, embeddings frozen on request, a loadable transformers dir."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from tokentune.adapters.full import FullAdapter, FullConfig
from tokentune.errors import TokentuneError

from .helpers import attach, logits, randomize


def test_tied_embedding_is_one_parameter_in_groups(tiny_llama):
    adapter = attach(FullAdapter(), tiny_llama)
    params = [p for g in adapter.param_groups() for _, p in g.params]
    assert len({id(p) for p in params}) == len(params)
    assert sum(p is tiny_llama.lm_head.weight for p in params) == 1
    assert {id(p) for p in params} == {id(p) for p in tiny_llama.parameters()}
    assert "lm_head.weight" not in adapter.state_dict()


def test_frozen_embeddings(tiny_gpt2):
    adapter = attach(FullAdapter(FullConfig(train_embeddings=False)), tiny_gpt2)
    names = {n for g in adapter.param_groups() for n, _ in g.params}
    assert names == {n for n, _ in tiny_gpt2.named_parameters()} - {"transformer.wte.weight", "transformer.wpe.weight"}
    assert not tiny_gpt2.lm_head.weight.requires_grad  # tied to wte


def test_save_is_a_transformers_checkpoint_and_loads_back(tiny_llama, tmp_path):
    from safetensors.torch import save_file

    fresh = copy.deepcopy(tiny_llama)
    adapter = attach(FullAdapter(), tiny_llama)
    randomize(adapter, std=0.05)
    save_file(adapter.state_dict(), tmp_path / "state.safetensors")  # no shared storage despite the tie
    adapter.save(tmp_path / "final", "base")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert torch.equal(logits(exported), logits(tiny_llama))

    attach(FullAdapter(), fresh).load(tmp_path / "final")
    assert torch.equal(logits(fresh), logits(tiny_llama))
    with pytest.raises(TokentuneError, match="safetensors"):
        attach(FullAdapter(), copy.deepcopy(fresh)).load(tmp_path / "empty")
