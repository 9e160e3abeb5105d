"""Parallel / scaled parallel adapters against the spec's checks: Δ = s·(ReLU(x W_down + b_down) W_up + b_up)
computed by hand at the placement the spec gives (pre-LN: beside the sublayer, added to its output; post-LN BERT:
inside LN(x + F(x) + Δ)), identity at init, s = 1 equals the plain adapter, parameter counts, merge refused."""

import copy

import pytest
import torch
import torch.nn.functional as F

from tokentune.adapters.parallel_adapter import (ParallelAdapter, ParallelAdapterConfig, ScaledParallelAdapter,
                                                 ScaledParallelAdapterConfig)
from tokentune.errors import TokentuneError

from .cases.parallel_adapter import count
from .conformance import logits, make_model
from .helpers import attach, randomize

FAMILIES = ("llama", "gpt2", "bert")
# Layer 0's sublayer modules, written out here rather than taken from the model view.
SUBLAYER = {
    ("llama", "ffn"): "model.layers.0.mlp", ("llama", "attn"): "model.layers.0.self_attn",
    ("gpt2", "ffn"): "transformer.h.0.mlp", ("gpt2", "attn"): "transformer.h.0.attn",
    ("bert", "ffn"): "bert.encoder.layer.0.output", ("bert", "attn"): "bert.encoder.layer.0.attention.output",
}


def manual_delta(adapter_module, x, s):
    a = adapter_module
    return s * (F.relu(x @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias)


def _capture(module, store):
    """Record the (unmodified) inputs and the final output of `module`."""
    def pre(mod, args, kwargs):
        store["args"] = [t.clone() for t in args] or [kwargs["hidden_states"].clone()]

    def post(mod, args, kwargs, out):
        store["out"] = (out[0] if isinstance(out, tuple) else out).clone()

    return [module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True),
            module.register_forward_hook(post, with_kwargs=True)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["ffn", "attn"])
def test_delta_sits_where_the_spec_places_it(family, kind):
    s = 3.0
    model = make_model(family)
    reference = copy.deepcopy(model)
    adapter = attach(ScaledParallelAdapter(ScaledParallelAdapterConfig(r=8, placement=kind, scale=s)), model)
    randomize(adapter, std=0.1)
    name = SUBLAYER[(family, kind)]
    assert adapter.sublayers[0] == name
    got, ref = {}, {}
    _capture(model.get_submodule(name), got)
    _capture(reference.get_submodule(name), ref)
    logits(model, family), logits(reference, family)
    module = model.get_submodule(name)
    if family == "bert":  # post-LN: out = LN(dense(h) + x + Δ(x)), x = the sublayer's input
        h, x = got["args"]
        expected = module.LayerNorm(module.dense(h) + x + manual_delta(module.parallel_adapter, x, s))
    else:  # pre-LN: out = F(x) + Δ(x), x = the sublayer's (normed) input, which layer 0 shares with the base
        x = got["args"][0]
        torch.testing.assert_close(x, ref["args"][0], atol=0, rtol=0)
        expected = ref["out"] + manual_delta(module.parallel_adapter, x, s)
    assert not torch.allclose(got["out"], ref["out"], atol=1e-4)
    torch.testing.assert_close(got["out"], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init_in_every_placement(family):
    base = logits(make_model(family), family)
    for placement in ("ffn", "attn", "both"):
        model = make_model(family)
        attach(ScaledParallelAdapter(ScaledParallelAdapterConfig(r=8, placement=placement)), model)
        assert torch.equal(logits(model, family), base)


@pytest.mark.parametrize("family", ("llama", "gpt2"))
def test_scaled_with_s1_equals_plain_and_s_scales_delta(family):
    base = logits(make_model(family), family)
    outs = {}
    for label, adapter in (("plain", ParallelAdapter(ParallelAdapterConfig(r=8, placement="both"))),
                           ("s1", ScaledParallelAdapter(ScaledParallelAdapterConfig(r=8, placement="both", scale=1))),
                           ("s4", ScaledParallelAdapter(ScaledParallelAdapterConfig(r=8, placement="both", scale=4)))):
        model = make_model(family)
        torch.manual_seed(0)
        randomize(attach(adapter, model), std=0.1)
        outs[label] = logits(model, family)
    torch.testing.assert_close(outs["s1"], outs["plain"], atol=0, rtol=0)
    assert not torch.allclose(outs["s4"], outs["plain"], atol=1e-3)
    assert not torch.allclose(outs["plain"], base, atol=1e-3)


def test_scale_multiplies_the_whole_up_projection():
    """As in the reference code: s·up(·), bias included; learn_scale makes s a parameter starting at `scale`."""
    model = make_model("gpt2")
    adapter = attach(ScaledParallelAdapter(ScaledParallelAdapterConfig(r=8, scale=2.5, learn_scale=True)), model)
    module = model.get_submodule("transformer.h.0.mlp.parallel_adapter")
    assert isinstance(module.scale, torch.nn.Parameter) and module.scale.item() == 2.5
    assert any(n.endswith("parallel_adapter.scale") for g in adapter.param_groups() for n, _ in g.params)
    with torch.no_grad():
        module.up.bias.fill_(1.0)
    assert torch.allclose(module(torch.zeros(1, 1, 32)), torch.full((1, 1, 32), 2.5))


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_count_is_the_formula(family):
    for placement, per_layer in (("ffn", 1), ("attn", 1), ("both", 2)):
        model = make_model(family)
        expected = count(model, 16, per_layer)
        adapter = attach(ParallelAdapter(ParallelAdapterConfig(r=16, placement=placement)), model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert sum(p.numel() for p in trainable) == expected
        assert sum(p.numel() for g in adapter.param_groups() for _, p in g.params) == expected
    # By hand for the tiny llama (d 32, 2 blocks), ffn, r 16: 2 * (2*16*32 + 16 + 32).
    assert count(make_model("llama"), 16) == 2 * (1024 + 48)


def test_only_the_adapter_learns_and_gradients_reach_it():
    model = make_model("llama")
    adapter = attach(ScaledParallelAdapter(ScaledParallelAdapterConfig(r=8)), model)
    model.train()
    x = torch.randint(3, 128, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    named = dict(adapter.param_groups()[0].params)
    assert named["model.layers.0.mlp.parallel_adapter.up.weight"].grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "parallel_adapter" not in n)


def test_half_precision_base_keeps_fp32_adapter():
    model = make_model("llama").to(torch.bfloat16)
    adapter = attach(ScaledParallelAdapter(ScaledParallelAdapterConfig(r=8)), model)
    assert all(p.dtype == torch.float32 for g in adapter.param_groups() for _, p in g.params)
    randomize(adapter, std=0.1)
    out = logits(model, "llama")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_merge_is_refused_with_a_clear_error():
    adapter = attach(ParallelAdapter(ParallelAdapterConfig(r=8)), make_model("gpt2"))
    with pytest.raises(TokentuneError, match="cannot be merged.*nonlinearity"):
        adapter.merge()


def test_save_load_round_trip_and_mismatch_refused(tmp_path):
    cfg = ScaledParallelAdapterConfig(r=8, placement="both", scale=2.0)
    model = make_model("bert")
    adapter = attach(ScaledParallelAdapter(cfg), model)
    randomize(adapter, std=0.1)
    expected = logits(model, "bert")
    adapter.save(tmp_path, "base")
    fresh = make_model("bert")
    torch.nn.init.normal_(fresh.classifier.weight)  # the trained head must come back from the file too
    attach(ScaledParallelAdapter(cfg), fresh).load(tmp_path)
    torch.testing.assert_close(logits(fresh, "bert"), expected, atol=1e-6, rtol=0)
    other = attach(ScaledParallelAdapter(cfg.model_copy(update={"scale": 4.0})), make_model("bert"))
    with pytest.raises(TokentuneError, match="scale"):
        other.load(tmp_path)
    plain = attach(ParallelAdapter(ParallelAdapterConfig(r=8, placement="both")), make_model("bert"))
    with pytest.raises(TokentuneError, match="scaled_parallel_adapter"):
        plain.load(tmp_path)


def test_attach_twice_and_wrong_config_are_errors():
    model = make_model("gpt2")
    adapter = attach(ParallelAdapter(ParallelAdapterConfig(r=8)), model)
    with pytest.raises(TokentuneError, match="already attached"):
        adapter.attach(model, adapter.view)
    with pytest.raises(TokentuneError, match="already has a parallel adapter"):
        attach(ParallelAdapter(ParallelAdapterConfig(r=8)), model)
    with pytest.raises(TokentuneError):
        ParallelAdapter(ScaledParallelAdapterConfig())
    with pytest.raises(TokentuneError, match="no task head"):
        attach(ParallelAdapter(ParallelAdapterConfig(r=8, train_head=True)), make_model("llama"))


def test_dropout_defaults_to_the_models_hidden_dropout_and_is_off_in_eval():
    def dropout_of(family, **kw):
        model = make_model(family)
        attach(ParallelAdapter(ParallelAdapterConfig(r=8, **kw)), model)
        return model, next(m for n, m in model.named_modules() if n.endswith("parallel_adapter")).dropout

    model, drop = dropout_of("bert")  # hidden_dropout_prob 0.1, as the reference passes it
    assert isinstance(drop, torch.nn.Dropout) and drop.p == 0.1 and not drop.training  # follows model.eval()
    assert isinstance(dropout_of("llama")[1], torch.nn.Identity)  # Llama has no hidden dropout
    assert dropout_of("llama", dropout=0.3)[1].p == 0.3
