"""LoRA against independent references: the untouched base model, the parameter-count formula, PEFT itself
(both directions), transformers' own checkpoint loading after merge."""

import copy
import json
import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from tokentune.adapters.base import Adapter
from tokentune.adapters.lora import LoraAdapter, LoraConfig
from tokentune.adapters.lora_layer import LoraLinear
from tokentune.errors import TokentuneError

from .helpers import attach, ids, logits, randomize


@pytest.fixture(params=["llama", "gpt2"])
def model(request, tiny_llama, tiny_gpt2):
    return tiny_llama if request.param == "llama" else tiny_gpt2


def test_attach_leaves_base_untouched_and_starts_at_base(model):
    reference = copy.deepcopy(model)
    adapter = attach(LoraAdapter(), model)
    assert isinstance(adapter, Adapter)
    # Every base tensor keeps its value; only its name gains `.base_layer` (PEFT's layout).
    base = {n.replace(".base_layer.", "."): p for n, p in model.state_dict().items() if ".lora_" not in n}
    ref = reference.state_dict()
    assert set(base) == set(ref)
    assert all(torch.equal(base[n], ref[n]) for n in ref)
    assert torch.equal(logits(model), logits(reference))  # B = 0


def test_only_lora_trains_and_count_matches_formula(tiny_llama, tiny_gpt2):
    r = 4
    # Llama: hidden 32, intermediate 64, k/v out = 2 kv heads * 8 = 16; per layer sum of r * (in + out).
    llama_per_layer = r * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + 3 * (32 + 64))
    # GPT-2: c_attn 32->96, attn.c_proj 32->32, c_fc 32->128, mlp.c_proj 128->32 (no gate).
    gpt2_per_layer = r * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    for model, expected in ((tiny_llama, 2 * llama_per_layer), (tiny_gpt2, 2 * gpt2_per_layer)):
        adapter = attach(LoraAdapter(LoraConfig(r=r)), model)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        grouped = [(n, p) for g in adapter.param_groups() for n, p in g.params]
        assert trainable == {n for n, _ in grouped}
        assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
        assert sum(p.numel() for _, p in grouped) == expected


def test_gpt2_default_targets_skip_gate_and_fuse_qkv(tiny_gpt2):
    adapter = attach(LoraAdapter(), tiny_gpt2)
    assert sorted(adapter.wrappers) == sorted(
        f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))


def _train_steps(model, adapter, steps=3):
    opt = torch.optim.AdamW([p for g in adapter.param_groups() for _, p in g.params], lr=1e-2)
    x = ids(seed=5)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_saved_adapter_loads_in_peft_with_same_logits(model, tmp_path, rslora):
    from peft import PeftModel

    model.save_pretrained(tmp_path / "base")
    frozen = {n: p.clone() for n, p in model.named_parameters()}
    adapter = attach(LoraAdapter(LoraConfig(r=4, alpha=8, rslora=rslora)), model)
    randomize(adapter)  # B != 0 from the start, then real steps
    _train_steps(model, adapter)
    assert all(torch.equal(p, frozen[n.replace(".base_layer.", ".")])
               for n, p in model.named_parameters() if ".lora_" not in n)
    adapter.save(tmp_path / "adapter", str(tmp_path / "base"))

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    assert config["fan_in_fan_out"] == (model.config.model_type == "gpt2")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                           tmp_path / "adapter").eval()
    ours = logits(model)
    assert not torch.allclose(ours, logits(AutoModelForCausalLM.from_pretrained(tmp_path / "base")), atol=1e-3)
    torch.testing.assert_close(logits(peft_model), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_made_adapter_loads_into_tokentune(family, tiny_llama, tiny_gpt2, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    base = tiny_llama if family == "llama" else tiny_gpt2
    fresh = copy.deepcopy(base)
    modules = ["q_proj", "v_proj"] if family == "llama" else ["c_attn"]
    peft_model = get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=8, target_modules=modules,
                                                     task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "peft")

    targets = ["q", "v"] if family == "llama" else ["q", "k", "v"]
    adapter = attach(LoraAdapter(LoraConfig(r=4, alpha=8, targets=targets)), fresh)
    adapter.load(tmp_path / "peft")
    torch.testing.assert_close(logits(fresh), logits(peft_model.eval()), atol=1e-5, rtol=0)


def test_save_load_merge_export(tiny_llama, tmp_path):
    fresh = copy.deepcopy(tiny_llama)
    adapter = attach(LoraAdapter(LoraConfig(r=4)), tiny_llama)
    randomize(adapter)
    unmerged = logits(tiny_llama)
    adapter.save(tmp_path / "adapter", "base")

    again = attach(LoraAdapter(LoraConfig(r=4)), fresh)
    again.load(tmp_path / "adapter")
    assert torch.equal(logits(fresh), unmerged)

    adapter.merge()
    assert not any(isinstance(m, LoraLinear) for m in tiny_llama.modules())
    assert not any("lora_" in n or "base_layer" in n for n in tiny_llama.state_dict())
    torch.testing.assert_close(logits(tiny_llama), unmerged, atol=1e-5, rtol=0)
    tiny_llama.save_pretrained(tmp_path / "merged")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(exported), unmerged, atol=1e-5, rtol=0)
    with pytest.raises(TokentuneError, match="merged"):
        adapter.state_dict()


def test_gpt2_conv1d_merge_equals_unmerged(tiny_gpt2):
    adapter = attach(LoraAdapter(LoraConfig(r=4)), tiny_gpt2)
    randomize(adapter)
    unmerged = logits(tiny_gpt2)
    adapter.merge()
    assert not any(isinstance(m, LoraLinear) for m in tiny_gpt2.modules())
    torch.testing.assert_close(logits(tiny_gpt2), unmerged, atol=1e-5, rtol=0)


def test_state_dict_round_trip_is_safetensors_ready(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    fresh = copy.deepcopy(tiny_llama)
    adapter = attach(LoraAdapter(LoraConfig(r=2)), tiny_llama)
    randomize(adapter)
    save_file(adapter.state_dict(), tmp_path / "state.safetensors")  # refuses shared or strided tensors
    again = attach(LoraAdapter(LoraConfig(r=2)), fresh)
    again.load_state_dict(load_file(tmp_path / "state.safetensors"))
    assert torch.equal(logits(fresh), logits(tiny_llama))


@pytest.mark.parametrize("rslora", [False, True])
def test_wrapper_matches_hand_computed_update(rslora):
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    layer = LoraLinear(base, "proj", r=4, alpha=3.0, dropout=0.0, rslora=rslora)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 8)
    scale = 3.0 / math.sqrt(4) if rslora else 3.0 / 4
    expected = base(x) + scale * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected)


def test_dropout_only_in_train_mode(tiny_llama):
    reference = copy.deepcopy(tiny_llama)
    adapter = attach(LoraAdapter(LoraConfig(r=4, dropout=0.5)), tiny_llama)
    randomize(adapter)
    no_dropout = attach(LoraAdapter(LoraConfig(r=4)), reference)
    no_dropout.load_state_dict(adapter.state_dict())
    x = ids()
    tiny_llama.train()
    torch.manual_seed(0)
    first = tiny_llama(input_ids=x).logits
    second = tiny_llama(input_ids=x).logits
    assert not torch.allclose(first, second)
    tiny_llama.eval()
    assert torch.equal(logits(tiny_llama, x), logits(reference, x))


def test_target_regex_selects_exactly_and_round_trips_through_peft(tiny_llama, tmp_path):
    from peft import PeftModel

    tiny_llama.save_pretrained(tmp_path / "base")
    regex = r".*\.(q|v)_proj"
    adapter = attach(LoraAdapter(LoraConfig(r=2, target_regex=regex)), tiny_llama)
    assert sorted(adapter.wrappers) == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]
    randomize(adapter)
    adapter.save(tmp_path / "adapter", str(tmp_path / "base"))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"] == regex
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                           tmp_path / "adapter")
    torch.testing.assert_close(logits(peft_model.eval()), logits(tiny_llama), atol=1e-5, rtol=0)


def test_default_targets_written_as_exact_suffixes(tiny_llama, tiny_gpt2, tmp_path):
    attach(LoraAdapter(), tiny_llama).save(tmp_path / "l", "b")
    attach(LoraAdapter(LoraConfig(targets=["o"])), tiny_gpt2).save(tmp_path / "g", "b")
    read = lambda d: json.loads((tmp_path / d / "adapter_config.json").read_text())["target_modules"]  # noqa: E731
    assert read("l") == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert read("g") == ["attn.c_proj"]  # `c_proj` alone would also catch mlp.c_proj


@pytest.mark.parametrize("kwargs, match", [
    ({"targets": ["qq"]}, "unknown projection role"),
    ({"targets": []}, "targets is empty"),
    ({"targets": ["q"], "target_regex": ".*q_proj"}, "not both"),
    ({"target_regex": "(unclosed"}, "not a regex"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(TokentuneError, match=match):
        LoraConfig(**kwargs)


def test_attach_errors(tiny_llama, tiny_gpt2):
    with pytest.raises(TokentuneError, match="no 'gate' projection"):
        attach(LoraAdapter(LoraConfig(targets=["q", "gate"])), copy.deepcopy(tiny_gpt2))
    with pytest.raises(TokentuneError, match="matches no module"):
        attach(LoraAdapter(LoraConfig(target_regex=r".*\.query")), copy.deepcopy(tiny_llama))
    with pytest.raises(TokentuneError, match="cannot wrap"):
        attach(LoraAdapter(LoraConfig(target_regex=r".*\.self_attn")), copy.deepcopy(tiny_llama))
    with pytest.raises(TokentuneError, match="tied"):
        attach(LoraAdapter(LoraConfig(target_regex="lm_head")), copy.deepcopy(tiny_llama))
    with pytest.raises(TokentuneError, match="no task head"):
        attach(LoraAdapter(LoraConfig(train_head=True)), copy.deepcopy(tiny_llama))


def test_load_refuses_a_different_rank_or_target_set(tiny_llama, tmp_path):
    attach(LoraAdapter(LoraConfig(r=4, targets=["q"])), copy.deepcopy(tiny_llama)).save(tmp_path / "a", "b")
    with pytest.raises(TokentuneError, match="adapter.r=4"):
        attach(LoraAdapter(LoraConfig(r=8, targets=["q"])), copy.deepcopy(tiny_llama)).load(tmp_path / "a")
    with pytest.raises(TokentuneError, match="target the same modules"):
        attach(LoraAdapter(LoraConfig(r=4, targets=["q", "v"])), copy.deepcopy(tiny_llama)).load(tmp_path / "a")


def test_disabled_context_gives_the_base_model(tiny_llama):
    from tokentune.adapters.base import reference_mode

    base = logits(tiny_llama)
    adapter = attach(LoraAdapter(LoraConfig(r=4)), tiny_llama)
    randomize(adapter)
    tuned = logits(tiny_llama)
    assert not torch.allclose(tuned, base)
    with reference_mode(adapter):
        torch.testing.assert_close(logits(tiny_llama), base)
    torch.testing.assert_close(logits(tiny_llama), tuned)
