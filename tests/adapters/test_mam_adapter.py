"""MAM adapter against the spec's checks: the prefix-concatenated attention equals the (1−λ)/λ two-term form; with
W_up = 0 the model is the prefix-only model (and the frozen model once the prefix is off); the parameter count
formula (and the paper's 6.7% for BART-large); the union of the two parts' groups and state; merge refused."""

import pytest
import torch

from tokentune.adapters.mam_adapter import MamAdapter, MamAdapterConfig
from tokentune.adapters.parallel_adapter import ParallelAdapter, ParallelAdapterConfig
from tokentune.adapters.prefix_tuning import PrefixTuning, PrefixTuningConfig
from tokentune.errors import TokentuneError
from tokentune.models.attention import add_attention_hook

from .cases.mam_adapter import count
from .conformance import logits, make_model
from .helpers import attach, randomize

SMALL = dict(num_virtual_tokens=4, prefix_hidden=16, r=8, scale=2.0)


def _additive(mask, q, k):
    """Any mask the hook sees -> additive float [B or 1, 1, q, k]."""
    if mask is None:
        return torch.zeros(1, 1, q, k)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    return mask.float()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_attention_equals_the_gated_two_term_form(family):
    """head = (1−λ)·Attn(q, K, V) + λ·softmax(q P_k^T) P_v with λ the prefix's share of the softmax mass, checked
    against what layer 0 actually feeds its output projection."""
    model = make_model(family)
    l = SMALL["num_virtual_tokens"]
    adapter = attach(MamAdapter(MamAdapterConfig(**SMALL)), model)
    seen = {}

    def record(module, q, k, v, mask, kwargs):  # runs after the prefix hook: sees [P_k; K], [P_v; V]
        seen.update(q=q, k=k, v=v, mask=mask, scaling=kwargs.get("scaling"))
        return q, k, v, mask

    add_attention_hook(adapter.view, 0, record)
    o_proj = next(iter(adapter.view.modules_for_roles(["o"]).values()))  # layer 0's output projection
    o_proj.register_forward_pre_hook(lambda m, args: seen.update(attn_out=args[0].clone()))
    logits(model, family)

    q, k, v = seen["q"], seen["k"], seen["v"]
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * seen["scaling"] + _additive(seen["mask"], q.shape[2], k.shape[2])
    pre, ctx = scores[..., :l], scores[..., l:]
    assert torch.isfinite(pre).all(), "every query must see every prefix position"
    m = scores.amax(-1, keepdim=True)
    mass_pre, mass_ctx = (pre - m).exp().sum(-1, keepdim=True), (ctx - m).exp().sum(-1, keepdim=True)
    lam = mass_pre / (mass_pre + mass_ctx)
    two_term = (1 - lam) * (ctx.softmax(-1) @ v[:, :, l:]) + lam * (pre.softmax(-1) @ v[:, :, :l])
    concat = scores.softmax(-1) @ v
    torch.testing.assert_close(two_term, concat, atol=1e-5, rtol=1e-5)
    assert 0 < lam.min() and lam.max() < 1
    b, h, t, hd = two_term.shape
    torch.testing.assert_close(seen["attn_out"], two_term.transpose(1, 2).reshape(b, t, h * hd), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_at_init_the_ffn_part_is_zero_and_without_prefix_the_model_is_frozen_base(family):
    base = logits(make_model(family), family)
    model = make_model(family)
    mam = attach(MamAdapter(MamAdapterConfig(**SMALL)), model)
    with_prefix = logits(model, family)
    # The same prefix alone (prefix tuning, no FFN adapter) gives the same outputs: W_up = 0.
    alone_model = make_model(family)
    alone = attach(PrefixTuning(PrefixTuningConfig(num_virtual_tokens=4, hidden=16, train_head=False)), alone_model)
    alone.load_state_dict({k[len("prefix."):]: v for k, v in mam.state_dict().items() if k.startswith("prefix.")})
    if family == "bert":  # the classifier is random: copy MAM's (it is part of MAM's state)
        alone_model.classifier.load_state_dict(model.classifier.state_dict())
    torch.testing.assert_close(logits(alone_model, family), with_prefix, atol=1e-6, rtol=0)
    assert not torch.allclose(with_prefix, base, atol=1e-7)
    mam.prefix_tuning.virtual.enabled = False
    assert torch.equal(logits(model, family), base)


def test_parts_sit_where_the_spec_says():
    model = make_model("gpt2")
    mam = attach(MamAdapter(MamAdapterConfig(**SMALL)), model)
    assert mam.ffn_adapter.sublayers == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    assert not any("attn.parallel_adapter" in n for n, _ in model.named_parameters())
    assert model.transformer.h[0].mlp.parallel_adapter.scale == 2.0
    assert mam.prefix_tuning.virtual.layers == [0, 1]  # a prefix at every attention sublayer


def test_param_count_formula_and_the_papers_share():
    # Direct prefixes on GPT-2 (keys/values as wide as d): the spec's 2·l·d per attention sublayer + 2·r·d
    # (+ biases) per FFN sublayer; 2 blocks, d 32, l 4, r 8.
    model = make_model("gpt2")
    attach(MamAdapter(MamAdapterConfig(num_virtual_tokens=4, reparameterize=False, r=8)), model)
    measured = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert measured == 2 * 4 * 32 * 2 + (2 * 8 * 32 + 8 + 32) * 2 == count(make_model("gpt2"), 4, 8)
    # BART-large (d 1024; 12 encoder + 12 decoder layers: 36 attention sublayers, 24 FFNs), l 30, r 512:
    # the paper's 6.7% of its 406,291,456 parameters.
    bart = 2 * 30 * 1024 * 3 * 12 + (2 * 512 * 1024 + 512 + 1024) * 2 * 12
    assert round(100 * bart / 406_291_456, 1) == 6.7


def test_groups_and_state_are_the_union_of_the_parts():
    model = make_model("bert")
    mam = attach(MamAdapter(MamAdapterConfig(**SMALL, prefix_lr=0.03)), model)
    groups = {g.name: g for g in mam.param_groups()}
    assert set(groups) == {"prefix", "ffn_adapter", "head"}
    assert groups["prefix"].lr == 0.03 and groups["ffn_adapter"].lr is None
    assert all(n.startswith("prefix.") for n, _ in groups["prefix"].params)
    assert all(".output.parallel_adapter." in n for n, _ in groups["ffn_adapter"].params)
    assert [n for n, _ in groups["head"].params] == ["classifier.weight", "classifier.bias"]
    grouped = {id(p) for g in groups.values() for _, p in g.params}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert set(mam.state_dict()) == {n for g in groups.values() for n, _ in g.params}


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_save_load_round_trip_and_mismatch_refused(family, tmp_path):
    cfg = MamAdapterConfig(**SMALL)
    model = make_model(family)
    mam = attach(MamAdapter(cfg), model)
    randomize(mam, std=0.1)
    expected = logits(model, family)
    mam.save(tmp_path, "base")
    assert {p.name for p in tmp_path.iterdir()} == {"prefix", "ffn_adapter", "tokentune_adapter.json"}
    fresh = make_model(family, seed=0)
    torch.manual_seed(7)  # a different prefix init: the loaded one must replace it
    attach(MamAdapter(cfg), fresh).load(tmp_path)
    torch.testing.assert_close(logits(fresh, family), expected, atol=1e-6, rtol=0)
    other = attach(MamAdapter(cfg.model_copy(update={"r": 16})), make_model(family))
    with pytest.raises(TokentuneError, match="'r': 8"):
        other.load(tmp_path)


def test_merge_and_double_attachment_are_refused():
    model = make_model("llama")
    mam = attach(MamAdapter(MamAdapterConfig(**SMALL)), model)
    with pytest.raises(TokentuneError, match="cannot be merged.*prefix.*nonlinearity"):
        mam.merge()
    with pytest.raises(TokentuneError, match="already has a parallel adapter"):
        attach(ParallelAdapter(ParallelAdapterConfig(r=8)), model)
    with pytest.raises(TokentuneError, match="already carries"):
        attach(MamAdapter(MamAdapterConfig(**SMALL)), make_model_with_prefix())


def make_model_with_prefix():
    model = make_model("gpt2")
    attach(PrefixTuning(PrefixTuningConfig(num_virtual_tokens=2)), model)
    return model
