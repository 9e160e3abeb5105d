"""APT against the spec's checks: the module formula computed by hand at the spec's placement (pre-norm decoders:
the attention's output projection with r = the pre-norm output; BERT: BertSelfOutput after dense, r = input_tensor),
sequence length unchanged with an N×p score matrix, K == M while W_b = 0, M = 0 is the identity, w carries no
gradient, the concatenated-prompt identity of the motivation, the parameter count, causality, and the artefact."""

import pytest
import torch
import torch.nn.functional as F

from tokentune.adapters.apt import APTAdapter, APTConfig, ApproximatePrompt
from tokentune.errors import TokentuneError
from tokentune.models.attention import add_attention_hook

from .cases.apt import count
from .conformance import logits, make_model
from .helpers import attach, ids, randomize

FAMILIES = ("llama", "gpt2", "bert")
# Per family, block 1's modules written out here rather than taken from the model view:
# (module whose output is r, raw output projection, module whose output is the attention sublayer's result)
NAMES = {
    "llama": ("model.layers.1.input_layernorm", "model.layers.1.self_attn.o_proj", "model.layers.1.self_attn"),
    "gpt2": ("transformer.h.1.ln_1", "transformer.h.1.attn.c_proj", "transformer.h.1.attn"),
    "bert": (None, "bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.attention.output"),
}


def reference(x, r, m, w_a, w_b, s):
    """The spec's formula written out: (x + stopgrad(max_j A) ⊙ (A M)) · exp(s), A = ReLU(r (M + M W_a W_b)^T)."""
    a = torch.relu(r @ (m + m @ w_a @ w_b).T)
    return (x + a.max(dim=-1, keepdim=True).values.detach() * (a @ m)) * torch.exp(s)


def _params(block):
    return block.memory, block.w_a, block.w_b, block.log_scale


def _out(module, store, key):
    def hook(mod, args, out):
        store[key] = (out[0] if isinstance(out, tuple) else out).detach().clone()
    return module.register_forward_hook(hook)


def _apt(family, **cfg):
    model = make_model(family)
    adapter = attach(APTAdapter(APTConfig(**cfg)), model)
    return model, adapter


@pytest.mark.parametrize("family", FAMILIES)
def test_module_sits_where_the_spec_places_it(family):
    model = make_model(family)
    r_name, proj_name, out_name = NAMES[family]
    got = {}
    # Registered before attach, so they see the projection's raw output (hooks run in registration order).
    _out(model.get_submodule(proj_name), got, "x")
    if r_name is not None:
        _out(model.get_submodule(r_name), got, "r")
    else:  # BERT: r = input_tensor, the BertAttention input
        model.get_submodule("bert.encoder.layer.1.attention").register_forward_pre_hook(
            lambda mod, args, kwargs: got.__setitem__("r", (args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True)
    adapter = attach(APTAdapter(), model)
    randomize(adapter, std=0.3)
    _out(model.get_submodule(out_name), got, "out")
    logits(model, family)
    expected = reference(got["x"], got["r"], *_params(adapter.blocks[1]))
    if family == "bert":  # METER: LN(dropout(APT(dense(h), input_tensor)) + input_tensor)
        expected = model.get_submodule(out_name).LayerNorm(expected + got["r"])
    assert not torch.allclose(expected, got["x"], atol=1e-3)  # the module really changes the output
    torch.testing.assert_close(got["out"], expected, atol=1e-5, rtol=1e-5)
    assert adapter.sites[1] == out_name


@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_length_unchanged_and_extra_scores_are_n_by_p(family):
    model, adapter = _apt(family, num_memory=7)
    seen = {"scores": [], "keys": []}
    for block in adapter.blocks:
        inner = block.scores
        block.scores = lambda r, inner=inner: seen["scores"].append(tuple((a := inner(r)).shape)) or a
    for layer in range(2):
        add_attention_hook(adapter.view, layer, lambda mod, q, k, v, mask, kw: (
            seen["keys"].append((q.shape[-2], k.shape[-2])) or (q, k, v, mask)))
    out = logits(model, family)
    assert seen["scores"] == [(2, 10, 7)] * 2  # B × N × p per block
    assert seen["keys"] == [(10, 10)] * 2  # the attention stays N × N: no token joins the sequence
    assert out.shape[:2] == ((2, 10) if family != "bert" else (2, 3))


def test_keys_equal_memory_while_w_b_is_zero():
    model, adapter = _apt("llama")
    for block in adapter.blocks:
        assert torch.equal(block.keys(), block.memory)
    randomize(adapter, std=0.3)
    assert not torch.equal(adapter.blocks[0].keys(), adapter.blocks[0].memory)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_memory_is_the_identity(family):
    base = make_model(family)
    model, adapter = _apt(family)
    assert not torch.allclose(logits(model, family), logits(base, family), atol=1e-6)  # not identity at init
    with torch.no_grad():
        for block in adapter.blocks:
            block.w_b.normal_()  # K != M, and still M = 0 switches the branch off
            block.memory.zero_()
    torch.testing.assert_close(logits(model, family), logits(base, family), atol=1e-6, rtol=0)


def test_weight_carries_no_gradient():
    torch.manual_seed(0)
    block = ApproximatePrompt(16, 5, 4)
    with torch.no_grad():
        block.w_b.normal_(0, 0.1), block.log_scale.fill_(0.3), block.memory.mul_(20)
    x, r = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    block(x, r).square().sum().backward()
    got = [p.grad.clone() for p in _params(block)]

    def grads(detach_weight):
        ps = [p.detach().clone().requires_grad_() for p in _params(block)]
        m, w_a, w_b, s = ps
        a = torch.relu(r @ (m + m @ w_a @ w_b).T)
        w = a.max(dim=-1, keepdim=True).values
        ((x + (w.detach() if detach_weight else w) * (a @ m)) * torch.exp(s)).square().sum().backward()
        return [p.grad for p in ps]

    for mine, ref in zip(got, grads(True)):
        torch.testing.assert_close(mine, ref)
    assert not torch.allclose(got[0], grads(False)[0])  # a gradient through w would change M's


@pytest.mark.parametrize("scale", [1.0, 0.125])
def test_concatenated_prompt_attention_splits_into_original_and_prompt_terms(scale):
    g = torch.Generator().manual_seed(0)
    n, p, d = 9, 5, 8
    q, kx, vx = (torch.randn(3, n, d, generator=g) for _ in range(3))
    kp, vp = (torch.randn(3, p, d, generator=g) for _ in range(2))
    full = F.scaled_dot_product_attention(q, torch.cat([kx, kp], 1), torch.cat([vx, vp], 1), scale=scale)
    ex, ep = (torch.exp(scale * q @ k.transpose(-1, -2)).sum(-1, keepdim=True) for k in (kx, kp))
    lam = ep / (ep + ex)
    split = ((1 - lam) * torch.softmax(scale * q @ kx.transpose(-1, -2), -1) @ vx
             + lam * torch.softmax(scale * q @ kp.transpose(-1, -2), -1) @ vp)
    torch.testing.assert_close(split, full, atol=1e-5, rtol=0)


def test_parameter_count_per_block():
    model, adapter = _apt("llama")  # C = 32, 2 blocks, p = 50: 2·(50·32 + 32·4 + 4·32 + 1)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * (1600 + 128 + 128 + 1) == count(make_model("llama"))
    assert [n for n, _ in adapter.param_groups()[0].params][:4] == [
        "tokentune_apt.0.memory", "tokentune_apt.0.w_a", "tokentune_apt.0.w_b", "tokentune_apt.0.log_scale"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("tokentune_apt."))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_a_later_token_never_changes_earlier_outputs(family):
    model, adapter = _apt(family)
    randomize(adapter, std=0.3)
    x = ids(shape=(2, 10))
    y = x.clone()
    y[:, 6:] = ids(seed=5, shape=(2, 4))
    with torch.no_grad():
        a, b = model(input_ids=x).logits, model(input_ids=y).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=0, rtol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_cached_generation_equals_a_full_forward():
    model, adapter = _apt("llama")
    randomize(adapter, std=0.3)
    x = ids(shape=(2, 10))
    with torch.no_grad():
        full = model(input_ids=x).logits[:, -1]
        cache = model(input_ids=x[:, :-1], use_cache=True).cache
        step = model(input_ids=x[:, -1:], cache=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
    assert adapter._pending == {}  # no activation is kept between forwards


def test_dropout_acts_in_training_only():
    model, adapter = _apt("llama", dropout=0.5)
    plain, other = _apt("llama", dropout=0.0)
    randomize(adapter, std=0.3), randomize(other, std=0.3)
    torch.testing.assert_close(logits(model, "llama"), logits(plain, "llama"))  # eval: no dropout
    model.train()
    assert adapter.blocks[0].training
    assert not torch.allclose(logits(model, "llama"), logits(plain, "llama"))


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpoint):
        model, adapter = _apt("llama")
        randomize(adapter, std=0.3)
        model.train()
        if checkpoint:  # as models/loading.py enables it
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        calls = []
        model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda *a: calls.append(1))
        x = ids(shape=(2, 10))
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        assert len(calls) == (2 if checkpoint else 1)  # the block really was recomputed
        assert adapter._pending == {}
        return [p.grad for _, p in adapter.param_groups()[0].params]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_save_load_disable_and_merge(family, tmp_path):
    model, adapter = _apt(family)
    base = logits(make_model(family), family)
    randomize(adapter, std=0.3)
    expected = logits(model, family)
    adapter.save(tmp_path, "tiny")
    fresh, other = _apt(family)
    other.load(tmp_path)
    torch.testing.assert_close(logits(fresh, family), expected, atol=0, rtol=0)
    if family == "llama":
        with other.disabled():
            torch.testing.assert_close(logits(fresh, family), base, atol=0, rtol=0)
    with pytest.raises(TokentuneError, match="cannot be merged"):
        other.merge()
    _, wrong = _apt(family, num_memory=8)
    with pytest.raises(TokentuneError, match="num_memory"):
        wrong.load(tmp_path)


def test_half_precision_base_keeps_fp32_apt():
    model = make_model("llama").to(torch.bfloat16)
    adapter = attach(APTAdapter(), model)
    assert all(p.dtype == torch.float32 for _, p in adapter.param_groups()[0].params)
    out = model(input_ids=ids(shape=(2, 10))).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_config_refuses_zero_init_and_attaching_twice():
    with pytest.raises(ValueError):
        APTConfig(init_std=0.0)
    model, adapter = _apt("gpt2")
    with pytest.raises(TokentuneError, match="already"):
        adapter.attach(model, adapter.view)
    with pytest.raises(TokentuneError, match="tokentune_apt"):
        attach(APTAdapter(), model)  # one APT per model
