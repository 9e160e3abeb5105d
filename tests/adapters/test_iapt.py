"""IAPT against its spec checks and independent references: the rational's GELU fit and identity, the 7B
parameter count, S's shape and padding invariance, keys/values equal to what the model's own block computes,
packed records seeing only their own prompts, no leak of the response into the prompt, cached generation equal
to a full recompute, and bi-level separation of Θ and Ω in a real training run."""

from types import SimpleNamespace

import pytest
import torch
import yaml

from tokentune.adapters.iapt import IaptAdapter, IaptConfig
from tokentune.adapters.iapt_generator import IaptGenerators, config_parameter_count, pool_weights
from tokentune.adapters.iapt_rational import rational, RationalActivation
from tokentune.adapters.iapt_runtime import leading_unlabelled, require_supported, soft_kv
from tokentune.errors import TokentuneError
from tokentune.models.anatomy import ModelView
from tokentune.models.attention import add_attention_hook

from .conformance import make_model
from .helpers import ids


def _attach(model, **kw):
    kw = {"bottleneck": 8, "bilevel": False, **kw}
    adapter = IaptAdapter(IaptConfig(**kw))
    torch.manual_seed(0)
    adapter.attach(model, ModelView(model))
    return adapter


def _record(prompt, response):
    """A one-record batch: the prompt unlabelled, the response labelled."""
    x = torch.cat([prompt, response], 1)
    labels = torch.cat([torch.full_like(prompt, -100), response], 1)
    return {"input_ids": x, "labels": labels, "attention_mask": torch.ones_like(x)}


@torch.no_grad()
def _hidden(model, adapter, batch, positions=None):
    view = ModelView(model)
    x = batch["input_ids"]
    positions = torch.arange(x.shape[1]).unsqueeze(0) if positions is None else positions
    adapter.before_batch(batch)
    try:
        return view.backbone(input_ids=x, position_ids=positions, use_cache=False).last_hidden_state
    finally:
        adapter.after_batch()


# --- spec check 3: the rational activation -----------------------------------------------------------

def test_rational_starts_at_gelu_and_gets_gradients():
    act = RationalActivation()
    x = torch.linspace(-3, 3, 6001, dtype=torch.float64)
    gelu = torch.nn.functional.gelu(x)  # exact (erf) form
    err = (act(x) - gelu).abs().max().item()
    assert err <= 0.02 and err < 1e-4  # spec tolerance, and what the stored fit achieves
    act(torch.linspace(-3, 3, 101)).pow(2).sum().backward()
    assert act.numerator.grad.abs().min() > 0 and act.denominator.grad.abs().min() > 0


def test_rational_with_unit_linear_numerator_is_the_identity():
    x = torch.linspace(-50, 50, 1001)
    a = torch.tensor([0.0, 1, 0, 0, 0, 0, 0])
    assert torch.equal(rational(x, a, torch.zeros(5)), x)


def test_rational_matches_the_written_formula():
    g = torch.Generator().manual_seed(0)
    a, b, x = torch.randn(7, generator=g), torch.randn(5, generator=g), torch.randn(50, generator=g)
    num = sum(a[j] * x ** j for j in range(7))
    den = 1 + sum(b[i] * x ** (i + 1) for i in range(5)).abs()
    torch.testing.assert_close(rational(x, a, b), num / den)


# --- spec check 2: parameter count ---------------------------------------------------------------------

def test_llama2_7b_count_pins_the_pooler_in_the_bottleneck_space():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32)
    ours = config_parameter_count(cfg, bottleneck=320, soft_tokens=4)
    assert ours == 32 * (2 * 4096 * 320 + 320 * 4 + 12) == 83_927_424
    assert round(ours / 1e6, 1) == 83.9  # MiLoRA's reported IAPT size
    d_space_pooler = 32 * (2 * 4096 * 320 + 4096 * 4 + 12)  # ~84.4M: does not match the report
    assert round(d_space_pooler / 1e6, 1) == 84.4 != round(ours / 1e6, 1)
    with torch.device("meta"):  # the module itself has exactly that many parameters
        built = IaptGenerators(4096, 32, 320, 4)
    assert sum(p.numel() for p in built.parameters()) == ours
    with torch.device("meta"):
        shared = IaptGenerators(4096, 32, 320, 4, share=True)
    assert sum(p.numel() for p in shared.parameters()) == config_parameter_count(cfg, share=True) \
        == 2 * 4096 * 320 + 320 * 4 + 32 * 12


# --- spec check 1: shapes and padding invariance --------------------------------------------------------

def test_pooling_ignores_padding_values_and_places():
    g = torch.Generator().manual_seed(0)
    hidden, queries = torch.randn(1, 9, 6, generator=g), torch.randn(6, 4, generator=g)
    real = torch.tensor([0, 0, 1, 1, 1, 1, 0, 0, 0], dtype=torch.bool)
    alpha = pool_weights(hidden, queries, real.view(1, 1, 9))
    ref = torch.softmax(hidden[0, 2:6] @ queries, 0)  # by hand: softmax over the 4 real positions
    torch.testing.assert_close(alpha[0, 0, 2:6], ref)
    assert torch.all(alpha[0, 0, ~real] == 0)
    gen = IaptGenerators(6, 1, 3, 4)
    s = gen(0, hidden, real.view(1, 1, 9))
    noisy = hidden.clone()
    noisy[:, ~real] = 1e4  # other values at the padding
    moved = torch.cat([hidden[:, 2:6], hidden[:, :2]], 1)  # the same tokens, padding moved to the right
    torch.testing.assert_close(gen(0, noisy, real.view(1, 1, 9)), s)
    torch.testing.assert_close(gen(0, moved, torch.tensor([[[1, 1, 1, 1, 0, 0]]], dtype=torch.bool)), s)
    empty = gen(0, hidden, torch.zeros(1, 1, 9, dtype=torch.bool))  # a padding segment: finite, from U = 0
    assert torch.isfinite(empty).all()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_soft_tokens_have_shape_batch_layers_4_d_and_depend_on_the_instruction(family):
    model = make_model(family)
    adapter = _attach(model)
    made = []
    adapter.generators.register_forward_hook(lambda m, args, out: made.append(out))
    with torch.no_grad():
        model(input_ids=ids(0, shape=(2, 6)))
        first = torch.stack(made, 1)[:, :, 0]  # [B, L, 4, d] (one record per row)
        made.clear()
        model(input_ids=ids(1, shape=(2, 6)))
        second = torch.stack(made, 1)[:, :, 0]
    assert first.shape == (2, 2, 4, 32)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_padding_does_not_change_the_output(family):
    model = make_model(family)
    _attach(model)
    a = ids(4, shape=(1, 7))
    pad = torch.zeros(1, 3, dtype=torch.long)
    left = family != "bert"  # decoders generate from left-padded prompts; encoders pad on the right
    x = torch.cat([pad, a], 1) if left else torch.cat([a, pad], 1)
    mask = torch.cat([torch.zeros_like(pad), torch.ones_like(a)], 1) if left else \
        torch.cat([torch.ones_like(a), torch.zeros_like(pad)], 1)
    kw = {"position_ids": (mask.cumsum(-1) - 1).clamp_min(0)} if left else {}
    with torch.no_grad():
        padded = model(input_ids=x, attention_mask=mask, **kw).logits
        alone = model(input_ids=a, attention_mask=torch.ones_like(a)).logits
    torch.testing.assert_close(padded[:, 3:] if left else padded, alone, atol=1e-5, rtol=1e-5)


# --- insertion: keys/values are what the layer itself computes for S -----------------------------------

def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Qwen3ForCausalLM(cfg).eval()
    model.config._attn_implementation = "tokentune"
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "qwen3"])
def test_soft_keys_values_equal_the_blocks_own_for_hidden_states_at_positions_0_to_3(family):
    model = _qwen3() if family == "qwen3" else make_model(family)
    view = ModelView(model)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 4, 32, generator=g)
    captured = {}

    def swap(module, args, kwargs):  # the block receives S as its input hidden states
        return (s, *args[1:]), kwargs

    def capture(module, q, k, v, mask, kwargs):
        captured["kv"] = (k, v)
        return q, k, v, mask

    handles = [view.layers[1].register_forward_pre_hook(swap, with_kwargs=True)]
    handles += add_attention_hook(view, 1, capture)
    with torch.no_grad():
        extra = {"attention_mask": torch.ones(2, 4, dtype=torch.long)} if family == "bert" else {}
        view.backbone(inputs_embeds=torch.zeros_like(s), position_ids=torch.arange(4).expand(2, -1), use_cache=False,
                      **extra)
        ours = soft_kv(view, 1, s, torch.arange(4))
    for h in handles:
        h.remove()
    torch.testing.assert_close(ours[0], captured["kv"][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours[1], captured["kv"][1], atol=1e-6, rtol=1e-6)


def test_qwen3_model_runs_with_iapt():
    model = _qwen3()
    _attach(model)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids(shape=(2, 5))).logits).all()


# --- the instruction: packing, the response, chats -------------------------------------------------------

def test_instruction_stops_at_the_first_labelled_token_of_each_record():
    labelled = torch.tensor([[0, 0, 1, 1, 0, 1, 0, 0, 1, 0]], dtype=torch.bool)  # two records: 5 + 5 tokens
    segments = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]])
    got = leading_unlabelled(labelled, segments, 2)
    # record 0: the later unlabelled token 4 (a second user turn) is not instruction; record 1 starts labelled
    assert got.int().tolist() == [[1, 1, 0, 0, 0, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_row_equals_each_record_with_its_own_prompts(family):
    model = make_model(family)
    adapter = _attach(model)
    ra, rb = _record(ids(1, shape=(1, 4)), ids(2, shape=(1, 3))), _record(ids(3, shape=(1, 3)), ids(4, shape=(1, 2)))
    pad = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": torch.full((1, 2), -100),
           "attention_mask": torch.zeros(1, 2, dtype=torch.long)}  # collate's right padding: a segment of its own
    packed = {k: torch.cat([ra[k], rb[k], pad[k]], 1) for k in ra}
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 0, 1]])
    both = _hidden(model, adapter, packed, positions)
    torch.testing.assert_close(both[:, :7], _hidden(model, adapter, ra), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[:, 7:12], _hidden(model, adapter, rb), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_response_never_reaches_the_prompt(family):
    model = make_model(family)
    adapter = _attach(model)
    batch = _record(ids(5, shape=(1, 4)), ids(6, shape=(1, 5)))
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][0, -1] = (changed["input_ids"][0, -1] + 1) % 128
    a, b = _hidden(model, adapter, batch), _hidden(model, adapter, changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1], atol=0, rtol=0)  # causal, prompts from the instruction only
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = make_model("llama")
        adapter = _attach(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        batch = _record(ids(1, shape=(2, 4)), ids(2, shape=(2, 3)))
        adapter.before_batch(batch)
        hidden = ModelView(model).backbone(input_ids=batch["input_ids"], position_ids=torch.arange(7).expand(2, -1),
                                           use_cache=False).last_hidden_state
        adapter.after_batch()
        hidden.pow(2).sum().backward()
        grads.append([p.grad.clone() for _, p in adapter.generators.projection_parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_batch_that_does_not_match_the_forward_is_an_error():
    model = make_model("llama")
    adapter = _attach(model)
    adapter.before_batch(_record(ids(shape=(1, 3)), ids(shape=(1, 2))))
    with pytest.raises(TokentuneError, match="instruction"):
        model(input_ids=ids(shape=(1, 9)))
    adapter.after_batch()


# --- spec check 5: generation --------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_generation_computes_prompts_once_and_equals_full_recompute(family):
    model = make_model(family)
    adapter = _attach(model)
    x = ids(3, shape=(1, 5))
    calls = adapter.runtime.generator_calls
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                         pad_token_id=0)
    assert adapter.runtime.generator_calls - calls == 2  # once per layer, on the first call only
    seq = x
    for _ in range(6):  # no cache: the whole sequence every step, the prompt marked as the instruction
        batch = {"input_ids": seq, "attention_mask": torch.ones_like(seq),
                 "labels": torch.cat([torch.full_like(x, -100), seq[:, 5:]], 1)}
        adapter.before_batch(batch)
        with torch.no_grad():
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        adapter.after_batch()
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_left_padded_generation_equals_each_prompt_alone():
    model = make_model("llama")
    _attach(model)
    a, b = ids(7, shape=(1, 6)), ids(8, shape=(1, 3))
    x = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    both = model.generate(input_ids=x, attention_mask=mask, **kw)
    assert torch.equal(both[0, 6:], model.generate(input_ids=a, attention_mask=torch.ones_like(a), **kw)[0, 6:])
    assert torch.equal(both[1, 6:], model.generate(input_ids=b, attention_mask=torch.ones_like(b), **kw)[0, 3:])


def test_continuing_a_cache_it_did_not_start_is_an_error():
    model = make_model("llama")
    adapter = _attach(model)
    x = ids(shape=(1, 4))
    with torch.no_grad(), adapter.disabled():
        cache = model(input_ids=x, use_cache=True)["cache"]
    with pytest.raises(TokentuneError, match="first call"):
        model(input_ids=x[:, :1], cache=cache, use_cache=True)


# --- spec check 4: bi-level ------------------------------------------------------------------------------

def test_bilevel_train_step_moves_only_omega_and_dev_step_only_theta(tmp_path):
    from tests.e2e.helpers import write_config
    from tokentune.config import load_config
    from tokentune.engine.distributed import setup
    from tokentune.engine.session import build_session
    from tokentune.engine.trainer import Trainer

    path = write_config(tmp_path, data={"packing": True}, train={"max_steps": 2, "batch_size": 2, "lr": 1e-2})
    tree = yaml.safe_load(path.read_text())
    tree["adapter"] = {"name": "iapt", "bottleneck": 8, "dev_fraction": 0.25, "activation_lr": 1e-3}
    tree["eval"]["at_end"], tree["log"]["report"] = False, False
    path.write_text(yaml.safe_dump(tree))
    session = build_session(load_config(path), setup("cpu"))
    adapter = session.adapter
    assert len(session.splits.train) == 36 and len(adapter._dev_examples) == 12  # 48 records, a quarter held out
    assert not {e.source for e in session.splits.train} & {e.source for e in adapter._dev_examples}
    theta = [p for _, p in adapter.generators.activation_parameters()]
    omega = [p for _, p in adapter.generators.projection_parameters()]
    snaps = []

    def snap(tag):
        snaps.append((tag, [p.detach().clone() for p in theta], [p.detach().clone() for p in omega]))

    dev_step = adapter.after_optimizer_step
    adapter.on_step_start = lambda trainer, step: snap("start")

    def spy(trainer, step):
        snap("trained")
        dev_step(trainer, step)
        snap("dev")

    adapter.after_optimizer_step = spy
    Trainer(session).train()
    same = lambda xs, ys: all(torch.equal(x, y) for x, y in zip(xs, ys))  # noqa: E731
    for (_, t0, o0), (_, t1, o1), (_, t2, o2) in (snaps[0:3], snaps[3:6]):
        assert same(t0, t1) and not same(o0, o1)  # training batch: Ω moves, Θ does not
        assert same(o1, o2) and not same(t1, t2)  # dev batch: Θ moves, Ω does not


def test_single_level_puts_theta_in_its_own_group_at_1e_6():
    model = make_model("llama")
    adapter = _attach(model)
    groups = {g.name: g for g in adapter.param_groups()}
    assert groups["activation"].lr == 1e-6 and groups["generator"].lr is None
    assert sum(p.numel() for _, p in groups["activation"].params) == 2 * 12


def test_bilevel_without_prepare_data_is_an_error():
    model = make_model("llama")
    adapter = _attach(model, bilevel=True)
    with pytest.raises(TokentuneError, match="prepare_data"):
        adapter.on_train_start(SimpleNamespace())


# --- artefacts and refusals -----------------------------------------------------------------------------

def test_save_load_round_trip_and_structure_check(tmp_path):
    model = make_model("llama")
    adapter = _attach(model)
    with torch.no_grad():
        for _, p in adapter.generators.projection_parameters():
            p.add_(0.1)
        expected = model(input_ids=ids()).logits
    adapter.save(tmp_path, "tiny")
    fresh = make_model("llama")
    _attach(fresh).load(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids()).logits, expected)
    with pytest.raises(TokentuneError, match="bottleneck=8"):
        _attach(make_model("llama"), bottleneck=4).load(tmp_path)


def test_disabled_gives_the_base_model_and_unsupported_families_are_refused():
    from tokentune.adapters.base import reference_mode

    model = make_model("gpt2")
    x = ids()
    with torch.no_grad():
        base = model(input_ids=x).logits
        adapter = _attach(model)
        with reference_mode(adapter):
            torch.testing.assert_close(model(input_ids=x).logits, base)
        assert not torch.allclose(model(input_ids=x).logits, base)
    with pytest.raises(TokentuneError, match="gemma"):
        require_supported(SimpleNamespace(model_type="gemma"))


def test_encoder_classifier_trains_with_the_generators():
    model = make_model("bert")
    adapter = _attach(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= names
    assert all(n.startswith(("classifier.", "tokentune_iapt.")) for n in names)
    x = ids(shape=(2, 6))
    model(input_ids=x, attention_mask=torch.ones_like(x)).logits.sum().backward()
    assert all(p.grad is not None for _, p in adapter.generators.projection_parameters())
