"""The stack adapter: frozen members stay bit-identical through an optimiser step, init_from loads a member's saved
artefact, attach order does not change the trainable set, names stay apart, and the parts save and load."""

from __future__ import annotations

import json

import pytest
import torch

from tokentune.adapters.prompt_tuning import PromptTuningAdapter, PromptTuningConfig
from tokentune.adapters.stack import StackAdapter, StackConfig
from tokentune.errors import TokentuneError
from tokentune.models.anatomy import ModelView

from .conformance import logits, make_model

PROMPT = {"name": "prompt_tuning", "num_virtual_tokens": 4}


def _stack(model, *members):
    adapter = StackAdapter(StackConfig(adapters=list(members)))
    torch.manual_seed(0)
    adapter.attach(model, ModelView(model))
    return adapter


def _saved_prompt(tmp_path, family="llama"):
    model = make_model(family)
    adapter = PromptTuningAdapter(PromptTuningConfig(num_virtual_tokens=4))
    adapter.attach(model, ModelView(model))
    with torch.no_grad():
        adapter.prompt.add_(torch.randn_like(adapter.prompt))
    adapter.save(tmp_path / "prompt", "base")
    return adapter.prompt.detach().clone(), tmp_path / "prompt"


def test_frozen_member_is_loaded_from_init_from_and_unchanged_by_a_step(tmp_path):
    saved, where = _saved_prompt(tmp_path)
    model = make_model("llama")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    stack = _stack(model, {**PROMPT, "frozen": True, "init_from": str(where)}, {"name": "full"})
    prompt = model.tokentune_prompt.embeddings
    assert torch.equal(prompt, saved) and not prompt.requires_grad
    params = [p for g in stack.param_groups() for _, p in g.params]
    assert all(p is not prompt for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    model(input_ids=torch.arange(3, 13).view(1, -1)).logits.square().mean().backward()
    opt.step()
    assert prompt.grad is None and torch.equal(prompt, saved)
    assert any(not torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)


def test_attach_order_does_not_change_what_trains():
    # Prompt tuning freezes the whole base when it attaches; after `full` that would undo full's choice.
    def trainable(*members):
        model = make_model("gpt2")
        _stack(model, *members)
        return sorted(n for n, p in model.named_parameters() if p.requires_grad)

    first = trainable({**PROMPT, "frozen": True}, {"name": "full"})
    second = trainable({"name": "full"}, {**PROMPT, "frozen": True})
    assert first == second and first and not any(n.startswith("tokentune_") for n in first)
    both = trainable(PROMPT, {"name": "full"})
    assert "tokentune_prompt.embeddings" in both and len(both) == len(first) + 1


def test_param_groups_carry_member_index_and_keep_their_lr():
    model = make_model("llama")
    stack = _stack(model, {**PROMPT, "lr": 0.3}, {"name": "lora", "r": 2, "targets": ["q"]})
    groups = {g.name: g for g in stack.param_groups()}
    assert set(groups) == {"0.prompt", "1.lora"}
    assert groups["0.prompt"].lr == 0.3 and groups["1.lora"].lr is None
    assert [n for n, _ in groups["0.prompt"].params] == ["0.prompt_embeddings"]
    assert set(stack.state_dict()) == {n for g in groups.values() for n, _ in g.params}


def test_save_writes_each_member_apart_and_load_restores(tmp_path):
    model = make_model("llama")
    stack = _stack(model, {**PROMPT, "frozen": True}, {"name": "full"})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    expected = logits(model, "llama")
    stack.save(tmp_path / "final", "base")
    meta = json.loads((tmp_path / "final" / "stack.json").read_text())
    assert [m["dir"] for m in meta["members"]] == ["0-prompt_tuning", "1-full"]
    assert meta["members"][0]["frozen"] is True

    # The full member's checkpoint is a plain transformers model: no other adapter's tensors inside.
    from safetensors import safe_open
    with safe_open(str(tmp_path / "final" / "1-full" / "model.safetensors"), "pt") as fh:
        assert not any(k.startswith("tokentune_") for k in fh.keys())

    fresh = make_model("llama", seed=5)
    other = _stack(fresh, {**PROMPT, "frozen": True}, {"name": "full"})
    other.load(tmp_path / "final")
    torch.testing.assert_close(logits(fresh, "llama"), expected, atol=1e-6, rtol=0)

    # Without the prompt, the stack's model is exactly the saved full checkpoint.
    from transformers import LlamaForCausalLM
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "final" / "1-full").eval()
    with other.members[0].disabled():
        torch.testing.assert_close(logits(fresh, "llama"), logits(plain, "llama"), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(fresh, "llama"), logits(plain, "llama"), atol=1e-3)


def test_load_refuses_a_stack_with_other_members(tmp_path):
    stack = _stack(make_model("llama"), {**PROMPT, "frozen": True}, {"name": "full"})
    stack.save(tmp_path / "final", "base")
    other = _stack(make_model("llama"), {"name": "full"}, {**PROMPT, "frozen": True})
    with pytest.raises(TokentuneError, match="members"):
        other.load(tmp_path / "final")


def test_merge_names_the_member_that_refuses():
    stack = _stack(make_model("llama"), {**PROMPT, "frozen": True}, {"name": "full"})
    with pytest.raises(TokentuneError, match=r"member 0 \(prompt_tuning\)"):
        stack.merge()


def test_disabled_switches_every_member_off_or_refuses():
    model = make_model("llama")
    base = logits(model, "llama")
    stack = _stack(model, PROMPT, {"name": "lora", "r": 2, "targets": ["q", "v"]})
    with torch.no_grad():
        for g in stack.param_groups():
            for _, p in g.params:
                p.add_(torch.randn_like(p) * 0.1)
    assert not torch.allclose(logits(model, "llama"), base, atol=1e-4)
    with stack.disabled():
        torch.testing.assert_close(logits(model, "llama"), base, atol=1e-6, rtol=0)
    with pytest.raises(TokentuneError, match="full"):
        with _stack(make_model("llama"), PROMPT, {"name": "full"}).disabled():
            pass


def test_training_hooks_reach_only_trainable_members():
    stack = StackAdapter(StackConfig(adapters=[{**PROMPT, "frozen": True}, {"name": "full"}]))
    calls = []
    for i, m in enumerate(stack.members):
        m.on_step_start = lambda trainer, step, i=i: calls.append(("step", i, step))
        m.should_stop = lambda trainer, step, i=i: i == 0  # a frozen member cannot stop training
        m.before_batch = lambda batch, i=i: calls.append(("batch", i))
    stack.on_step_start(None, 7)
    stack.before_batch({})
    assert calls == [("step", 1, 7), ("batch", 0), ("batch", 1)]
    assert stack.should_stop(None, 7) is False


@pytest.mark.parametrize("members,match", [
    ([], "at least one"),
    ([{**PROMPT, "frozen": True}], "nothing would train"),
    ([{"name": "stack", "adapters": [PROMPT]}], "cannot contain a stack"),
    ([{**PROMPT, "frozen": "yes"}], "frozen must be true or false"),
    ([{**PROMPT, "num_virtual_token": 3}], "num_virtual_tokens"),
])
def test_config_errors(members, match):
    with pytest.raises(TokentuneError, match=match):
        StackConfig(adapters=members)


def test_init_from_must_exist(tmp_path):
    with pytest.raises(TokentuneError, match="not a directory"):
        _stack(make_model("llama"), {**PROMPT, "frozen": True, "init_from": str(tmp_path / "nope")}, {"name": "full"})
