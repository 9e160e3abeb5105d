"""EPT (reference design) against its spec checks: identity with short-prompt tuning at init, the parameter count
(prompt budget reported apart), a proper gate that every projection and the gate itself learn through, an input
of s + n (explicitly rebuilt), the SVD init, packing, and save/load."""

import pytest
import torch

from tokentune.adapters.ept import EptAdapter, EptConfig, ept_parameter_count, prompt_budget
from tokentune.adapters.prompt_tuning import PromptTuningAdapter, PromptTuningConfig
from tokentune.config import TrainConfig
from tokentune.engine.optim import build_optimizer
from tokentune.errors import TokentuneError
from tokentune.models.anatomy import ModelView

from .conformance import make_model
from .helpers import ids

S, R, N = 4, 3, 16


def _attach(model, **kw):
    cfg = {"num_virtual_tokens": S, "r": R, "max_length": N, "num_spaces": 2, "init": "dept", "prompt_init": "random",
           **kw}
    adapter = EptAdapter(EptConfig(**cfg))
    torch.manual_seed(0)
    adapter.attach(model, ModelView(model))
    return adapter


@torch.no_grad()
def _randomize(adapter, seed=1, std=0.2):
    """Every EPT tensor away from its init (the projections around I, so the prompt stays at its scale)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in adapter._own():
        noise = torch.randn(p.shape, generator=g) * std
        p.add_(noise * 0.1) if name == "network.projections" else p.copy_(noise)


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("init", ["dept", "svd"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_zero_offset_zero_wo_one_space_is_short_prompt_tuning_bit_for_bit(family, init):
    model, other = make_model(family), make_model(family)
    extra = {"long_prompt_length": 8} if init == "svd" else {}
    ept = _attach(model, num_spaces=1, init=init, **extra)
    assert torch.count_nonzero(ept.offset.table()) == 0 and torch.count_nonzero(ept.network.out) == 0
    assert torch.equal(ept.network.projections[0], torch.eye(32))
    pt = PromptTuningAdapter(PromptTuningConfig(num_virtual_tokens=S, init="random"))
    pt.attach(other, ModelView(other))
    with torch.no_grad():
        pt.prompt.copy_(ept.prompt)
    x = ids(shape=(2, 9))
    assert torch.equal(_logits(model, x), _logits(other, x))
    with torch.no_grad():
        ept.network.out.normal_(0, 0.2)  # the check can fail: a fusion output changes the prompt
        ept.offset.lora_embedding_A.normal_(0, 0.2)
        ept.offset.lora_embedding_B.normal_(0, 0.2)
    assert not torch.allclose(_logits(model, x), _logits(other, x))


def test_parameter_count_and_prompt_budget():
    # d = 32, s = 4, r = 3, n = 16, N = 2: budget 4·32 + 3·(16 + 32) = 272; + 4·32² + 2·32² + 32·2 = 6480 in all
    assert prompt_budget(S, R, N, 32) == 272
    assert ept_parameter_count(S, R, N, 32, 2) == 272 + 4096 + 2048 + 64
    model = make_model("llama")
    _attach(model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 6480


def test_gate_is_a_distribution_and_every_projection_and_the_gate_learn_after_one_step():
    model = make_model("llama")
    adapter = _attach(model, num_spaces=3, init="svd", long_prompt_length=8)
    with torch.no_grad():
        adapter.network.gate.normal_(0, 1.0)
    g = adapter.gate()
    assert (g >= 0).all() and torch.allclose(g.sum(), torch.tensor(1.0)) and g.std() > 0
    opt = build_optimizer(adapter.param_groups(), TrainConfig(lr=1e-3), torch.device("cpu"))
    x = ids(shape=(2, 8))
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=x).logits.square().mean().backward()
        opt.step()
    opt.zero_grad()
    model(input_ids=x).logits.square().mean().backward()
    net = adapter.network
    assert all(net.projections.grad[i].abs().sum() > 0 for i in range(3))
    assert net.gate.grad.abs().sum() > 0
    for w in (net.query, net.key, net.value, net.out):  # fusion needs A@B != 0 and Wo != 0: two steps
        assert w.grad.abs().sum() > 0


def test_without_the_projection_perturbation_the_gate_gets_no_gradient():
    """Why proj_noise exists: with every W_i = I the sub-spaces are identical and the gate has nothing to choose."""
    model = make_model("llama")
    adapter = _attach(model, proj_noise=0.0)
    model(input_ids=ids(shape=(2, 8))).logits.square().mean().backward()
    assert adapter.network.gate.grad.abs().sum() == 0
    model.zero_grad()
    model = make_model("llama")
    adapter = _attach(model)
    model(input_ids=ids(shape=(2, 8))).logits.square().mean().backward()
    assert adapter.network.gate.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_equals_explicitly_built_input_of_length_s_plus_n(family):
    """Reference: P* recomputed here from the parameters, [P* ; E + A@B[:T]] as inputs_embeds, adapter off."""
    model = make_model(family)
    adapter = _attach(model, num_spaces=2)
    _randomize(adapter)
    x = ids(shape=(2, 9))
    ours = _logits(model, x)
    with torch.no_grad():
        p = {n: t.detach() for n, t in adapter._own()}
        table = p["lora_embedding_A"] @ p["lora_embedding_B"]
        q, k, v = p["prompt_embeddings"] @ p["network.query"], table @ p["network.key"], table @ p["network.value"]
        fused = p["prompt_embeddings"] + torch.softmax(q @ k.T / 32 ** 0.5, -1) @ v @ p["network.out"]
        g = torch.softmax(fused.mean(0) @ p["network.gate"], -1)
        prompt = sum(g[i] * fused @ p["network.projections"][i] for i in range(2))
        words = model.get_input_embeddings().weight[x] + table[:9]
        adapter.entry.enabled = False
        ref = model(inputs_embeds=torch.cat([prompt.expand(2, -1, -1), words], 1)).logits[:, S:]
    assert adapter.entry.length == S
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_svd_init_has_zero_offset_and_b_is_the_scaled_top_singular_directions():
    model = make_model("llama")
    view = ModelView(model)

    class Tok:
        all_special_ids = [0, 1, 2]

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(range(10, 30))}

    view.tokenizer = Tok()
    adapter = EptAdapter(EptConfig(num_virtual_tokens=S, r=5, max_length=N, init="svd", long_prompt_length=24,
                                   prompt_init="text", init_text="task"))
    adapter.attach(model, view)
    long_prompt = model.model.embed_tokens.weight.detach()[(list(range(10, 30)) * 2)[:24]]
    sigma = torch.linalg.svdvals(long_prompt)[:5]
    b = adapter.offset.lora_embedding_B.detach()
    assert torch.count_nonzero(adapter.offset.table()) == 0
    torch.testing.assert_close(b @ b.T, torch.diag(sigma ** 2), atol=1e-4, rtol=1e-4)
    assert torch.equal(adapter.prompt.detach(), long_prompt[:S])


def test_packed_row_equals_each_record_alone():
    model = make_model("gpt2")
    adapter = _attach(model)
    _randomize(adapter)
    a, b = ids(1, shape=(1, 6)), ids(2, shape=(1, 5))
    pos = torch.cat([torch.arange(6), torch.arange(5)]).unsqueeze(0)
    with torch.no_grad():
        hidden = model.transformer(input_ids=torch.cat([a, b], 1), position_ids=pos, use_cache=False)[0]
        packed = model.lm_head(hidden)
    torch.testing.assert_close(packed[:, :6], _logits(model, a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 6:], _logits(model, b), atol=1e-5, rtol=1e-5)


def test_three_learning_rates_network_defaults_to_the_prompt_rate():
    model = make_model("llama")
    rates = {g.name: g.lr for g in _attach(model).param_groups()}
    assert rates == {"prompt": 3e-1, "low_rank": 5e-3, "network": 3e-1}
    rates = {g.name: g.lr for g in _attach(make_model("llama"), network_lr=1e-3).param_groups()}
    assert rates["network"] == 1e-3


def test_save_load_round_trip_and_refuses_another_number_of_spaces(tmp_path):
    model = make_model("llama")
    adapter = _attach(model)
    _randomize(adapter)
    x = ids(shape=(2, 7))
    expected = _logits(model, x)
    adapter.save(tmp_path, "tiny")
    fresh = make_model("llama")
    _attach(fresh).load(tmp_path)
    torch.testing.assert_close(_logits(fresh, x), expected, atol=1e-6, rtol=0)
    with pytest.raises(TokentuneError, match="adapter.num_spaces=2"):
        _attach(make_model("llama"), num_spaces=3).load(tmp_path)


def test_config_rejects_inconsistent_svd_settings():
    with pytest.raises(ValueError, match="long_prompt_length"):
        EptConfig(num_virtual_tokens=20, long_prompt_length=10)
    with pytest.raises(ValueError, match="svd only"):
        EptConfig(init="dept", long_prompt_length=50)
    with pytest.raises(ValueError, match="r \\(40\\)"):
        EptConfig(r=40, num_virtual_tokens=10, long_prompt_length=20)
