"""LeMo token elimination against independent references: block scores against the logits the attention
itself sees, the gathered layer against the layer run on each segment's kept tokens alone, and the spec's
checks (keep-all = plain training, pass-through without layer gradients, memory falls with the kept
fraction, segment-wise loss = full loss)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from tests.conftest import tiny_gpt2_model, tiny_llama_model
from tests.e2e.helpers import losses, write_config
from tokentune.cli import main
from tokentune.errors import TokentuneError
from tokentune.models import attention
from tokentune.models.anatomy import ModelView
from tokentune.objectives.base import backbone_hidden
from tokentune.objectives.chunked import chunked_cross_entropy
from tokentune.selection import lemo_calibrate as calib
from tokentune.selection.attention_mass import QKCapture
from tokentune.selection.lemo import Lemo, LemoConfig
from tokentune.selection.lemo_layers import gathered_forward, plan_blocks
from tokentune.selection.lemo_runtime import LemoRuntime
from tokentune.selection.lemo_scores import block_allowed, segment_ids

# Row 0 packs records of 13, 15 and 12 tokens; row 1 is one 40-token record.
POS = torch.tensor([list(range(13)) + list(range(15)) + list(range(12)), list(range(40))])


def _model(impl="tokentune", family="llama"):
    attention.register()
    if family == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        torch.manual_seed(0)
        model = Qwen3ForCausalLM(Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()
    else:
        model = tiny_llama_model()
    model.set_attn_implementation(attention.NAME if impl == "tokentune" else impl)
    return model, ModelView(model)


def _batch(pos=POS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 120, pos.shape, generator=g), "position_ids": pos}


def _reference_matrix(q, k, scaling, pos, block, causal):
    """Spec step 2 written out: all heads' logits at once, then block by block."""
    h = q.shape[1]
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(h // k.shape[1], 1)) * scaling
    seg = (pos == 0).cumsum(-1)  # records restart their positions at 0
    t = pos.shape[1]
    i = torch.arange(t)
    order = i[:, None] > i[None, :] if causal else i[:, None] != i[None, :]
    allowed = order & (seg[:, :, None] == seg[:, None, :])
    positive = logits.clamp_min(0).sum(1) / h * allowed
    nb = math.ceil(t / block)
    out = torch.zeros(pos.shape[0], nb, nb)
    for m in range(nb):
        for n in range(nb):
            out[:, m, n] = positive[:, m * block:(m + 1) * block, n * block:(n + 1) * block].amax((1, 2))
    return out


@pytest.mark.parametrize("family,causal", [("llama", False), ("llama", True), ("qwen3", False)])
def test_block_scores_match_the_attention_logits(family, causal):
    model, view = _model(family=family)
    batch = _batch()
    rt = LemoRuntime(view, [0, 1], block=8, score_chunk=16, mask_kind="bool", causal=causal)
    caps = [QKCapture() for _ in range(2)]
    handles = [h for i, c in enumerate(caps) for h in c.install(view, i)]
    records = calib.record(rt, lambda b: backbone_hidden(view, b), [batch], inputs=False)
    for h in handles:
        h.remove()
    rt.remove()
    for i, cap in enumerate(caps):
        expected = _reference_matrix(cap.query, cap.key, cap.scaling, POS, 8, causal)
        torch.testing.assert_close(records[i][0]["matrix"], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(records[i][0]["scores"], expected.sum(1))
        assert not expected[~block_allowed(segment_ids(POS), 8, causal)].any()


def test_block_pairs_that_share_a_segment():
    # Row 0's records cover tokens 0-12, 13-27, 28-39: blocks of 8 span segments {1}, {1,2}, {2}, {2,3}, {3}.
    shared = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    assert block_allowed(segment_ids(POS), 8)[0].long().tolist() == shared.tolist()
    assert block_allowed(segment_ids(POS), 8, causal=True)[0].long().tolist() == shared.tril().tolist()
    assert block_allowed(segment_ids(POS), 8)[1].all()


def test_plans_by_ratio_and_threshold():
    scores = torch.tensor([[5.0, 1.0, 3.0, 2.0, 0.5], [0.1, 0.2, 0.3, 0.4, 0.05]])
    assert plan_blocks(scores, keep_ratio=0.4).tolist() == [[True, False, True, False, False],
                                                            [False, False, True, True, False]]
    # Row 1 has no block above the threshold: its best block is kept all the same.
    assert plan_blocks(scores, threshold=2.0).tolist() == [[True, False, True, True, False],
                                                           [False, False, False, True, False]]
    assert plan_blocks(scores, keep_ratio=1.0).all()


def _layer_inputs(model, view, batch, layer=0):
    """(hidden, kwargs) that the model passes to one decoder layer, from a dense forward."""
    seen = {}

    def grab(module, args, kwargs):
        seen["hidden"], seen["kwargs"] = args[0].detach(), dict(kwargs)

    handle = view.layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        backbone_hidden(view, batch)
    handle.remove()
    return seen["hidden"], seen["kwargs"]


# Row 0 (packed) keeps blocks 0, 2, 4 of 8 tokens; row 1 keeps blocks 1 and 3 (rows keep different counts).
KEEP = torch.tensor([[1, 0, 1, 0, 1], [0, 1, 0, 1, 0]], dtype=torch.bool).repeat_interleave(8, 1)


@pytest.mark.parametrize("impl", ["tokentune", "eager"])
def test_kept_tokens_equal_the_layer_run_on_them_alone(impl):
    model, view = _model(impl)
    hidden, kwargs = _layer_inputs(model, view, _batch())
    layer = view.layers[0]
    with torch.no_grad():
        out = gathered_forward(layer.forward, hidden, KEEP, kwargs, "float" if impl == "eager" else "bool")
        assert torch.equal(out[~KEEP], hidden[~KEEP])
        seg = (POS == 0).cumsum(-1)
        for row in range(2):
            for s in seg[row].unique():
                idx = ((seg[row] == s) & KEEP[row]).nonzero()[:, 0]
                pos = POS[row:row + 1, idx]
                causal = torch.ones(len(idx), len(idx), dtype=torch.bool).tril()[None, None]
                if impl == "eager":  # eager attention adds its mask, and applies none without one
                    causal = torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)
                ref = layer(hidden[row:row + 1, idx], attention_mask=causal, position_ids=pos,
                            position_embeddings=model.model.rotary_emb(hidden, pos))
                torch.testing.assert_close(out[row:row + 1, idx], ref, rtol=1e-5, atol=1e-5)


def test_eliminated_tokens_pass_through_without_layer_gradient():
    """Spec check 2: same hidden state before and after the layer, and no gradient through its weights."""
    model, view = _model()
    hidden, kwargs = _layer_inputs(model, view, _batch())
    layer = view.layers[0]
    hidden = hidden.clone().requires_grad_(True)
    out = gathered_forward(layer.forward, hidden, KEEP, kwargs, "bool")
    assert torch.equal(out[~KEEP], hidden[~KEEP])
    out[~KEEP].pow(2).sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in layer.parameters())
    torch.testing.assert_close(hidden.grad[~KEEP], 2 * hidden[~KEEP].detach())
    assert not hidden.grad[KEEP].any()
    out = gathered_forward(layer.forward, hidden, KEEP, kwargs, "bool")  # kept tokens do train the layer
    out[KEEP].sum().backward()
    assert layer.self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("packed", [True, False])
def test_keeping_everything_equals_the_plain_layer(packed):
    """Spec check 1 at the layer: the gather / sub-mask / scatter path with every token kept."""
    model, view = _model()
    pos = POS if packed else torch.arange(40).expand(2, -1)
    hidden, kwargs = _layer_inputs(model, view, _batch(pos))
    layer = view.layers[0]
    everything = torch.ones(2, 40, dtype=torch.bool)
    results = []
    for run in (lambda h: layer(h, **kwargs), lambda h: gathered_forward(layer.forward, h, everything, kwargs, "bool")):
        layer.zero_grad()
        h = hidden.clone().requires_grad_(True)
        out = run(h)
        (out * torch.linspace(-1, 1, 32)).sum().backward()
        results.append((out.detach(), h.grad, [p.grad.clone() for p in layer.parameters()]))
    (a, ga, pa), (b, gb, pb) = results
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_elimination_only_in_training_mode_and_keep_ratio_one_is_dense():
    model, view = _model()
    batch = _batch()
    with torch.no_grad():
        dense = backbone_hidden(view, batch)
        sel = Lemo(LemoConfig(block_size=8, mode="ratio", keep_ratio=1.0))
        sel.install(model, view)
        model.train()
        assert torch.equal(backbone_hidden(view, batch), dense) and sel.runtime.last_keep["mean"] == 1.0
        model.eval()
        sel.detach()
        sel = Lemo(LemoConfig(block_size=8, mode="ratio", keep_ratio=0.4, layers="all"))
        sel.install(model, view)
        assert torch.equal(backbone_hidden(view, batch), dense)  # eval mode: full model
        model.train()
        sparse = backbone_hidden(view, batch)
        assert not torch.allclose(sparse, dense)
        assert sel.runtime.last_keep[0] == pytest.approx(16 / 40)
        sel.detach()
        assert torch.equal(backbone_hidden(view, batch), dense)
    model.eval()


def _saved_bytes(model, view, batch, keep_ratio):
    """Bytes of activations autograd saves for backward (parameters excluded, shared storage once)."""
    sel = Lemo(LemoConfig(block_size=32, mode="ratio", keep_ratio=keep_ratio, layers="all"))
    sel.install(model, view)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        backbone_hidden(view, batch)
    sel.detach()
    model.eval()
    return sum(seen.values())


def test_saved_activations_fall_with_the_kept_fraction():
    """Spec check 3."""
    model, view = _model()
    for p in model.model.layers.parameters():
        p.requires_grad_(True)
    batch = _batch(torch.arange(512)[None])
    full, half, quarter = (_saved_bytes(model, view, batch, r) for r in (1.0, 0.5, 0.25))
    assert full > half > quarter
    assert half / full == pytest.approx(0.5, abs=0.1) and quarter / full == pytest.approx(0.25, abs=0.1)


def test_segment_wise_loss_equals_full_loss():
    """Spec check 4: the LM head applied in N segments (the objective's chunks) gives the full loss and
    gradients."""
    model, view = _model()
    model.requires_grad_(True)
    ids = torch.randint(3, 120, (1, 40))
    targets = ids[0, 1:]
    results = []
    for chunk in (None, 10):
        model.zero_grad()
        hidden = backbone_hidden(view, {"input_ids": ids, "position_ids": torch.arange(40)[None]})[0, :-1]
        if chunk is None:
            loss = F.cross_entropy(view.lm_head(hidden), targets, reduction="sum")
        else:
            loss = chunked_cross_entropy(hidden, view.lm_head, targets, chunk).sum()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_predictors_recall_the_exact_plan():
    """Blocks of one repeated token each (from a pool of six), so a block's score depends on its content,
    which its mean embedding carries; the last calibration batch is held out from the fit."""
    model, view = _model()
    pool = torch.tensor([5, 17, 33, 48, 71, 90])
    batches = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        ids = pool[torch.randint(0, 6, (8, 8), generator=g)].repeat_interleave(8, 1)
        batches.append({"input_ids": ids, "position_ids": torch.arange(64).expand(8, -1)})
    sel = Lemo(LemoConfig(block_size=8, mode="ratio", keep_ratio=0.5, predictor=True, predictor_epochs=200,
                          layers="all"))
    sel.install(model, view, batches)
    recall = sel.calibration["predictor_recall"]  # chance is 0.5
    assert set(recall) == {0, 1} and min(recall.values()) >= 0.75
    model.train()
    with torch.no_grad():
        backbone_hidden(view, batches[0])
    assert sel.runtime.last_keep[0] == 0.5
    model.eval()
    sel.detach()


def test_threshold_calibration_and_finite_difference_tuning():
    model, view = _model()
    batches = [_batch()]
    sel = Lemo(LemoConfig(block_size=8, layers="all"))
    sel.install(model, view, batches)
    for i in (0, 1):  # T_l = mean token-block score of layer l
        assert sel.runtime.thresholds[i] == pytest.approx(sel.calibration["exact_mean_scores"][i])
    sel.detach()
    # The update rule against a loss whose gradient is known: L(u) = Σ (u_l - c_l)^2, u_l = T_l / T0_l.
    rt = LemoRuntime(view, [0, 1], block=8, score_chunk=64, mask_kind="bool", thresholds={0: 2.0, 1: 4.0})
    target = {0: 3.0, 1: 0.5}
    history = calib.tune_thresholds(
        rt, lambda _: (sum((rt.thresholds[i] / t0 - target[i]) ** 2 for i, t0 in ((0, 2.0), (1, 4.0))), 1.0),
        [None], steps=1, eps=0.1, lr=0.25)
    rt.remove()
    # central differences are exact on a quadratic: u <- u - 2·0.25·(u - c) = (1 + c) / 2
    assert rt.thresholds[0] == pytest.approx(2.0 * 2.0) and rt.thresholds[1] == pytest.approx(4.0 * 0.75)
    assert history[0]["loss"] == pytest.approx(1.0 + 0.0625)


def test_tuning_moves_real_thresholds():
    model, view = _model()
    sel = Lemo(LemoConfig(block_size=8, tune_steps=1, tune_eps=0.3, tune_lr=10.0))
    batches = [_batch()]

    def loss_fn(batch):
        hidden = backbone_hidden(view, batch)[:, :-1]
        loss = F.cross_entropy(view.lm_head(hidden).flatten(0, 1), batch["input_ids"][:, 1:].flatten(), reduction="sum")
        return float(loss), float(hidden.shape[0] * hidden.shape[1])

    sel.install(model, view, batches, heldout=batches, loss_fn=loss_fn)
    tuned, start = sel.calibration["thresholds"], sel.calibration["exact_mean_scores"]
    assert len(sel.calibration["tuning"]) == 1 and tuned != start
    sel.detach()


def test_config_and_model_errors():
    with pytest.raises(ValidationError, match="keep_ratio applies to mode: ratio"):
        LemoConfig(keep_ratio=0.5)
    with pytest.raises(ValidationError, match="thresholds and tune"):
        LemoConfig(mode="ratio", thresholds=1.0)
    with pytest.raises(ValidationError, match="predictor: true"):
        LemoConfig(predictor_rank=8)
    with pytest.raises(ValidationError, match="finite"):
        LemoConfig(thresholds=-math.inf, tune_steps=1)
    model, view = _model()
    for layers, expected in ((None, [1]), ("all", [0, 1]), ([-1], [1])):
        sel = Lemo(LemoConfig(mode="ratio", layers=layers))
        sel.install(model, view)
        assert sel.runtime.layers == expected
        sel.detach()
    with pytest.raises(TokentuneError, match="out of range"):
        Lemo(LemoConfig(layers=[5])).install(model, view)
    with pytest.raises(TokentuneError, match="3 thresholds for 2"):
        Lemo(LemoConfig(thresholds=[1.0, 2.0, 3.0], layers="all")).install(model, view)
    with pytest.raises(TokentuneError, match="calibration batches"):
        Lemo(LemoConfig()).install(model, view)
    with pytest.raises(TokentuneError, match="not attached"):
        Lemo(LemoConfig()).select({}, None)
    gpt2 = tiny_gpt2_model()
    with pytest.raises(TokentuneError, match="does not support 'gpt2'"):
        Lemo(LemoConfig(mode="ratio")).install(gpt2, ModelView(gpt2))


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_trainer_keep_all_equals_plain_training_and_eliminating_reports(tmp_path):
    """Spec check 1 through the real trainer (packed rows on builtin:tiny-llama), and a run with
    calibrated, tuned thresholds eliminates blocks and logs its kept fractions."""
    short = dict(train={"max_steps": 3}, eval={"at_end": False})
    plain = write_config(tmp_path / "plain", **short)
    assert main(["train", str(plain)]) == 0
    cfg = write_config(tmp_path / "inf", **short)
    assert main(["train", str(cfg), "selectors=[{name: lemo, thresholds: -.inf, block_size: 8}]"]) == 0
    assert losses(tmp_path / "inf" / "run") == losses(tmp_path / "plain" / "run")
    assert _metrics(tmp_path / "inf" / "run")[0]["select/lemo_keep"] == 1.0
    cfg = write_config(tmp_path / "sparse", **short)  # calibrated + tuned thresholds, from the session's data
    lemo = "{name: lemo, block_size: 8, calibration_batches: 1, tune_steps: 1, tune_eps: 0.3}"
    assert main(["train", str(cfg), f"selectors=[{lemo}]"]) == 0
    record = _metrics(tmp_path / "sparse" / "run")[0]  # layer 0 does not eliminate by default
    assert 0 < record["select/lemo_keep_layer_1"] < 1 and "select/lemo_keep_layer_0" not in record
    assert record["select/lemo_keep"] == pytest.approx((1 + record["select/lemo_keep_layer_1"]) / 2)
    assert all(math.isfinite(x) for x in losses(tmp_path / "sparse" / "run"))
    assert losses(tmp_path / "sparse" / "run") != losses(tmp_path / "plain" / "run")


def test_loss_on_eliminated_false_drops_exactly_the_skipped_tokens(monkeypatch):
    """The hidden state of token t predicts labels[t + 1]: that weight goes to 0 when t skipped any eliminating
    layer of this forward; everything else (and the caller's batch) is untouched, and the loss is the same
    forward's per-token losses summed over the surviving tokens."""
    from tokentune.selection import lemo_runtime
    from tokentune.objectives.cross_entropy import CrossEntropy, CrossEntropyConfig

    model, view = _model()
    batch = _batch()
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][1, :5] = -100
    batch["loss_weights"] = torch.ones(batch["input_ids"].shape)
    keeps = []
    real = lemo_runtime.gathered_forward
    monkeypatch.setattr(lemo_runtime, "gathered_forward",
                        lambda inner, h, keep, kw, kind: keeps.append(keep.clone()) or real(inner, h, keep, kw, kind))
    objective = CrossEntropy(CrossEntropyConfig())
    results = {}
    for drop in (False, True):
        sel = Lemo(LemoConfig(block_size=8, mode="ratio", keep_ratio=0.6, layers="all", loss_on_eliminated=not drop))
        sel.install(model, view)
        model.train()
        keeps.clear()
        selected = sel.select(batch, None)
        with torch.no_grad():
            results[drop] = (objective(model, view, selected, chunk_size=16), selected["loss_weights"], list(keeps))
        sel.detach()
        model.eval()
    (full, w_full, plan_a), (dropped, w_drop, plan_b) = results[False], results[True]
    assert len(plan_a) == 2 and all(torch.equal(a, b) for a, b in zip(plan_a, plan_b))  # the same plan both times
    kept_everywhere = torch.stack(plan_a).all(0)  # [B, T]
    expected = torch.ones_like(w_drop)
    expected[:, 1:] = kept_everywhere[:, :-1].float()
    assert torch.equal(w_drop, expected) and torch.equal(w_full, torch.ones_like(w_full))
    assert torch.equal(batch["loss_weights"], torch.ones_like(w_full))  # the caller's tensor is not modified
    labels = batch["labels"][:, 1:]
    live = (labels != -100)
    rows, cols = live.nonzero(as_tuple=True)
    keep_tok = kept_everywhere[:, :-1][rows, cols]
    assert 0 < int(keep_tok.sum()) < len(keep_tok)
    torch.testing.assert_close(dropped.loss_sum, full.token_losses[keep_tok].sum(), rtol=1e-5, atol=1e-5)
