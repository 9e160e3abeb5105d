"""DePT against its spec checks and independent references: prompt tuning with the same prompt (B = 0), the
m·d + r·(s + d) budget, two learning rates through the real optimiser builder, the offset at position i being
row i of c·A@B for any token, explicitly built inputs (m + T long), packing, cached generation, and positions
past s."""

import math

import pytest
import torch

from tokentune.adapters.dept import DeptAdapter, DeptConfig, dept_parameter_count
from tokentune.adapters.prompt_tuning import PromptTuningAdapter, PromptTuningConfig
from tokentune.config import TrainConfig
from tokentune.data.example import Example
from tokentune.engine.optim import build_optimizer
from tokentune.errors import TokentuneError
from tokentune.models.anatomy import ModelView

from .conformance import make_model
from .helpers import ids

M, R, S = 4, 3, 16


def _attach(model, **kw):
    cfg = {"num_virtual_tokens": M, "r": R, "max_length": S, "init": "random", **kw}
    adapter = DeptAdapter(DeptConfig(**cfg))
    torch.manual_seed(0)
    adapter.attach(model, ModelView(model))
    return adapter


@torch.no_grad()
def _nonzero_b(adapter, seed=1):
    g = torch.Generator().manual_seed(seed)
    adapter.offset.lora_embedding_B.copy_(torch.randn(adapter.offset.lora_embedding_B.shape, generator=g) * 0.3)


def _offset_rows(adapter):
    """c·A@B, computed here from the parameters (c = alpha / sqrt(r))."""
    c = adapter.config.alpha / math.sqrt(adapter.config.r)
    return c * adapter.offset.lora_embedding_A.detach() @ adapter.offset.lora_embedding_B.detach()


def _logits(model, x, **kw):
    with torch.no_grad():
        if ModelView(model).is_encoder:
            return model(input_ids=x, attention_mask=torch.ones_like(x), **kw).logits
        return model(input_ids=x, **kw).logits


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_b_zero_equals_prompt_tuning_with_the_same_prompt(family):
    model, other = make_model(family), make_model(family)
    dept = _attach(model)
    assert torch.count_nonzero(dept.offset.lora_embedding_B) == 0
    pt = PromptTuningAdapter(PromptTuningConfig(num_virtual_tokens=M, init="random"))
    pt.attach(other, ModelView(other))
    with torch.no_grad():
        pt.prompt.copy_(dept.prompt)
        if family == "bert":  # the fresh classifier is drawn separately; give both the same
            other.classifier.load_state_dict(model.classifier.state_dict())
    x = ids(shape=(2, 9))
    assert torch.equal(_logits(model, x), _logits(other, x))
    _nonzero_b(dept)  # the check can fail: a non-zero offset changes the output
    assert not torch.allclose(_logits(model, x), _logits(other, x))


def test_parameter_count_is_m_d_plus_r_s_plus_d():
    assert dept_parameter_count(60, 30, 256, 768) == 76_800  # the spec's released T5-Base budgets
    assert dept_parameter_count(40, 45, 256, 768) == 76_800
    model = make_model("llama")  # d = 32, spec defaults m=60, r=30, s=256: 60·32 + 30·(256 + 32)
    DeptAdapter(DeptConfig(init="random")).attach(model, ModelView(model))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 1920 + 8640


def _step(adapter, model, prompt_lr, low_rank_lr):
    adapter.config.prompt_lr, adapter.config.low_rank_lr = prompt_lr, low_rank_lr
    opt = build_optimizer(adapter.param_groups(), TrainConfig(lr=1e-3), torch.device("cpu"))
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"prompt": prompt_lr, "low_rank": low_rank_lr}
    before = {n: p.detach().clone() for n, p in adapter._own()}
    model(input_ids=ids(shape=(2, 8))).logits.square().mean().backward()
    opt.step()
    return {n: not torch.equal(p.detach(), before[n]) for n, p in adapter._own()}


def test_two_learning_rates_and_a_zero_rate_freezes_its_group():
    model = make_model("llama")
    adapter = _attach(model)
    _nonzero_b(adapter)  # so that A has a gradient too
    groups = {g.name: g for g in adapter.param_groups()}
    assert groups["prompt"].lr == 3e-1 and groups["low_rank"].lr == 5e-3  # the spec's defaults
    moved = _step(adapter, model, 0.0, 1e-2)
    assert moved == {"prompt_embeddings": False, "lora_embedding_A": True, "lora_embedding_B": True}
    model.zero_grad()
    moved = _step(adapter, model, 1e-2, 0.0)
    assert moved == {"prompt_embeddings": True, "lora_embedding_A": False, "lora_embedding_B": False}


def test_a_rate_left_unset_follows_train_lr():
    adapter = _attach(make_model("llama"), prompt_lr=None)
    opt = build_optimizer(adapter.param_groups(), TrainConfig(lr=0.07), torch.device("cpu"))
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"prompt": 0.07, "low_rank": 5e-3}


def _captured_embeddings(model, call):
    """The word embedding's output after DePT's hook (a later hook sees the replaced output)."""
    seen = []
    handle = ModelView(model).embed_tokens.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    try:
        call()
    finally:
        handle.remove()
    return seen[-1]


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_offset_at_position_i_is_row_i_for_any_token(family):
    model = make_model(family)
    adapter = _attach(model)
    _nonzero_b(adapter)
    x = ids(shape=(2, 10))
    x[1] = (x[0] + 7) % 120 + 3  # a different token at every position
    out = _captured_embeddings(model, lambda: _logits(model, x))
    offset = out - model.get_input_embeddings().weight[x].detach()
    rows = _offset_rows(adapter)[:10]
    torch.testing.assert_close(offset[0], rows, atol=1e-6, rtol=0)
    torch.testing.assert_close(offset[1], offset[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_equals_explicitly_built_input_of_length_m_plus_t(family):
    """Reference: [P ; E + c·A@B[:T]] fed as inputs_embeds with the adapter off (encoders: P after [CLS])."""
    model = make_model(family)
    adapter = _attach(model)
    _nonzero_b(adapter)
    x = ids(shape=(2, 9))
    ours = _logits(model, x)
    words = model.get_input_embeddings().weight[x].detach() + _offset_rows(adapter)[:9]
    prompt = adapter.prompt.detach().unsqueeze(0).expand(2, -1, -1)
    adapter.entry.enabled = False
    with torch.no_grad():
        if family == "bert":
            embeds = torch.cat([words[:, :1], prompt, words[:, 1:]], 1)
            ref = model(inputs_embeds=embeds, attention_mask=torch.ones(2, M + 9, dtype=torch.long)).logits
        else:
            ref = model(inputs_embeds=torch.cat([prompt, words], 1)).logits[:, M:]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_row_equals_each_record_alone(family):
    model = make_model(family)
    adapter = _attach(model)
    _nonzero_b(adapter)
    a, b = ids(1, shape=(1, 6)), ids(2, shape=(1, 5))
    pos = torch.cat([torch.arange(6), torch.arange(5)]).unsqueeze(0)
    view = ModelView(model)
    with torch.no_grad():
        hidden = view.backbone(input_ids=torch.cat([a, b], 1), position_ids=pos, use_cache=False).last_hidden_state
        packed = model.lm_head(hidden)
    torch.testing.assert_close(packed[:, :6], _logits(model, a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 6:], _logits(model, b), atol=1e-5, rtol=1e-5)


def test_cached_generation_equals_full_recompute():
    model = make_model("llama")
    adapter = _attach(model)
    _nonzero_b(adapter)
    x = ids(3, shape=(1, 5))
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                         pad_token_id=0)
    seq = x
    for _ in range(6):
        nxt = _logits(model, seq, use_cache=False)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_positions_past_max_length_raise_or_get_no_offset():
    model = make_model("llama")
    _attach(model)
    with pytest.raises(TokentuneError, match="max_length=16"):
        _logits(model, ids(shape=(1, S + 1)))
    model = make_model("llama")
    adapter = _attach(model, beyond="zero")
    _nonzero_b(adapter)
    x = ids(shape=(1, S + 4))
    out = _captured_embeddings(model, lambda: _logits(model, x))
    offset = (out - model.get_input_embeddings().weight[x].detach())[0]
    torch.testing.assert_close(offset[:S], _offset_rows(adapter), atol=1e-6, rtol=0)
    assert torch.count_nonzero(offset[S:]) == 0


def test_prepare_data_refuses_records_longer_than_max_length():
    from types import SimpleNamespace

    def ex(n, i):
        return Example(input_ids=[5] * n, labels=[-100] + [5] * (n - 1), source=f"train.jsonl:{i}", index=i)

    splits = SimpleNamespace(train=[ex(8, 0), ex(S + 2, 1)], eval=None)
    with pytest.raises(TokentuneError, match="train.jsonl:1"):
        DeptAdapter(DeptConfig(max_length=S)).prepare_data(splits, None, None)
    assert DeptAdapter(DeptConfig(max_length=S, beyond="zero")).prepare_data(splits, None, None) is splits


def test_only_prompt_and_b_get_gradients_at_init():
    model = make_model("gpt2")
    adapter = _attach(model)
    model(input_ids=ids()).logits.sum().backward()
    assert adapter.prompt.grad.abs().sum() > 0 and adapter.offset.lora_embedding_B.grad.abs().sum() > 0
    assert adapter.offset.lora_embedding_A.grad.abs().sum() == 0  # B = 0: no signal into A yet
    own = {id(p) for _, p in adapter._own()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in own)


def test_save_load_round_trip_and_refuses_another_rank(tmp_path):
    model = make_model("gpt2")
    adapter = _attach(model)
    _nonzero_b(adapter)
    x = ids(shape=(2, 7))
    expected = _logits(model, x)
    adapter.save(tmp_path, "tiny")
    fresh = make_model("gpt2")
    _attach(fresh).load(tmp_path)
    torch.testing.assert_close(_logits(fresh, x), expected, atol=1e-6, rtol=0)
    with pytest.raises(TokentuneError, match="adapter.r=3"):
        _attach(make_model("gpt2"), r=5).load(tmp_path)


def test_text_init_defaults_to_the_reference_string():
    model = make_model("llama")
    view = ModelView(model)
    seen = []

    class Tok:
        all_special_ids = [0, 1, 2]

        def __call__(self, text, add_special_tokens=False):
            seen.append(text)
            return {"input_ids": [10, 11, 12]}

    view.tokenizer = Tok()
    adapter = DeptAdapter(DeptConfig(num_virtual_tokens=M, r=R, max_length=S))
    adapter.attach(model, view)
    assert seen == ["Classify this text is postive or not:"]
    assert torch.equal(adapter.prompt.detach(), model.model.embed_tokens.weight[[10, 11, 12, 10]])
    with pytest.raises(ValueError, match="init_text"):
        DeptConfig(init="random", init_text="hello")
