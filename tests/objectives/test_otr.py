"""OTR (one-token rollout) against independent references: the spec's verification checks on a toy vocabulary
(MC → closed form, κ = 1 → DFT scaled by 1 − β, one-hot policy, stop-gradients, β < 0 pushes sampled wrong tokens
down), the grouped form against the explicit sum, and the chunked objective against a dense full-logits reference
with the same samples (which fails if the checkpoint recompute drew new ones)."""

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from tokentune.config import ModelConfig
from tokentune.models.loading import load_model
from tokentune.objectives.otr import (OneTokenRollout, OTRConfig, draw_samples, expected_loss, group_samples,
                                      sampled_loss, sequence_weights)


def _toy(n=3, V=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, V, generator=g) * 1.5, torch.randint(0, V, (n,), generator=g)


def _explicit(logits, ids, targets, beta):
    """−(1/K) Σ_k R(a_k) log π(a_k), one term per sample, written out."""
    logp = F.log_softmax(logits, -1)
    reward = torch.where(ids == targets[:, None], 1.0, beta)
    return -(reward * logp.gather(1, ids)).mean(1)


# --- spec check 1: the MC average converges to the closed form -------------------------------------------------

def test_mc_average_converges_to_the_closed_form():
    logits, y = _toy()
    K, kappa, beta = 100_000, 1.3, -0.1
    ids = draw_samples(logits, K, kappa, torch.Generator().manual_seed(1))
    z = logits.clone().requires_grad_(True)
    mc = sampled_loss(z, *group_samples(ids, y, beta))
    (g_mc,) = torch.autograd.grad(mc.sum(), z)
    z2 = logits.clone().requires_grad_(True)
    closed = expected_loss(z2, y, kappa, beta)
    (g_closed,) = torch.autograd.grad(closed.sum(), z2)
    # 5 standard errors of the per-sample term R·log π(a) under π'
    logp = F.log_softmax(logits, -1)
    probs = torch.softmax(logits / kappa, -1)
    term = torch.where(torch.arange(7)[None] == y[:, None], 1.0, beta) * logp
    sd = ((probs * term ** 2).sum(-1) - (probs * term).sum(-1) ** 2).sqrt()
    assert torch.all((mc - closed).abs() < 5 * sd / math.sqrt(K))
    torch.testing.assert_close(g_mc, g_closed, atol=5 / math.sqrt(K), rtol=0)
    # and with a handful of samples the estimate is visibly off: the tolerance above is tight
    few = sampled_loss(logits, *group_samples(draw_samples(logits, 4, kappa, torch.Generator().manual_seed(2)), y, beta))
    assert (few - closed).abs().max() > 20 * (5 * sd / math.sqrt(K)).max()


def test_draws_follow_the_exploration_temperature():
    logits, _ = _toy(n=1)
    ids = draw_samples(logits, 200_000, 1.3, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids[0], minlength=7).float() / ids.numel()
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 1.3, -1), atol=4e-3, rtol=0)
    assert (freq - torch.softmax(logits[0], -1)).abs().max() > 0.02  # not the temperature-1 policy


# --- spec check 2: κ = 1, expected mode is DFT scaled by (1 − β) -------------------------------------------------

@pytest.mark.parametrize("beta", [0.0, -0.1, 0.5])
def test_expected_mode_at_kappa_one_is_scaled_dft(beta):
    logits, y = _toy(n=4, V=9)
    z = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(expected_loss(z, y, 1.0, beta).sum(), z)
    p = torch.softmax(logits, -1)
    onehot = F.one_hot(y, 9).float()
    p_x = p.gather(1, y[:, None])
    # (1 − β)·π(x)·∇_z(−log π(x)) with ∇_z(−log π(x)) = p − e_x, written by hand
    torch.testing.assert_close(grad, (1 - beta) * p_x * (p - onehot), atol=1e-6, rtol=1e-5)
    z3 = logits.clone().requires_grad_(True)
    (grad_hot,) = torch.autograd.grad(expected_loss(z3, y, 1.3, beta).sum(), z3)
    assert (grad_hot - (1 - beta) * p_x * (p - onehot)).abs().max() > 1e-3  # κ ≠ 1: a different objective


# --- the grouped form equals the explicit sum -------------------------------------------------------------------

def test_grouped_counts_equal_the_explicit_sum():
    logits, y = _toy(n=5, V=6)
    ids = torch.randint(0, 6, (5, 40), generator=torch.Generator().manual_seed(3))  # many repeats
    ids[0, :] = y[0]  # a row of ground-truth only
    sorted_ids, coef = group_samples(ids, y, -0.2)
    counts = torch.zeros(5, 6).scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float))
    dense = counts / 40 * torch.where(torch.arange(6)[None] == y[:, None], 1.0, -0.2)
    grouped_dense = torch.zeros(5, 6).scatter_add_(1, sorted_ids, coef)
    torch.testing.assert_close(grouped_dense, dense)  # n_a/K · R(a), one entry per distinct token
    assert int((coef != 0).sum()) == int((counts > 0).sum())
    z1, z2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    a, b = sampled_loss(z1, sorted_ids, coef), _explicit(z2, ids, y, -0.2)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    a.sum().backward(), b.sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad, atol=1e-6, rtol=1e-6)


# --- spec check 3: a policy one-hot on the ground truth --------------------------------------------------------

def test_one_hot_policy_samples_only_the_target_and_has_zero_loss():
    y = torch.tensor([2, 5])
    logits = torch.full((2, 8), -60.0).scatter(1, y[:, None], 60.0)
    ids, coef = group_samples(draw_samples(logits, 256, 1.3, torch.Generator().manual_seed(0)), y, -0.1)
    assert torch.all(ids == y[:, None])
    torch.testing.assert_close(coef.sum(1), torch.ones(2))  # all reward 1, no negative term
    assert float(sampled_loss(logits, ids, coef).abs().max()) < 1e-6
    assert float(expected_loss(logits, y, 1.3, -0.1).abs().max()) < 1e-6


# --- spec check 4: gradients flow only through log π_θ ----------------------------------------------------------

def test_no_gradient_through_samples_rewards_or_exploration_policy():
    logits, y = _toy(n=3, V=7)
    kappa, beta = 1.3, -0.1
    z = logits.clone().requires_grad_(True)
    ids, coef = group_samples(draw_samples(z, 64, kappa, torch.Generator().manual_seed(0)), y, beta)
    assert not ids.requires_grad and not coef.requires_grad
    (grad,) = torch.autograd.grad(expected_loss(z, y, kappa, beta).sum(), z)
    # with c the detached coefficients, ∇_z[−Σ_a c_a log π(a)] = (Σ_a c_a)·π − c
    p_kappa = torch.softmax(logits / kappa, -1)
    c = beta * p_kappa + (1 - beta) * p_kappa * F.one_hot(y, 7)
    torch.testing.assert_close(grad, c.sum(-1, keepdim=True) * torch.softmax(logits, -1) - c, atol=1e-6, rtol=1e-5)
    # differentiating through π' as well gives a different gradient: the check above can fail
    z2 = logits.clone().requires_grad_(True)
    q = torch.softmax(z2 / kappa, -1)
    leaky = -((beta * q + (1 - beta) * q * F.one_hot(y, 7)) * F.log_softmax(z2, -1)).sum()
    (grad_leaky,) = torch.autograd.grad(leaky, z2)
    assert (grad_leaky - grad).abs().max() > 1e-3


# --- spec check 5: with β < 0, a sampled wrong token loses probability --------------------------------------------

def test_negative_beta_lowers_a_sampled_wrong_token():
    torch.manual_seed(0)
    features = torch.randn(1, 16)
    drops = {}
    for beta in (0.0, -0.5):
        torch.manual_seed(1)
        head = torch.nn.Linear(16, 10)
        torch.nn.init.normal_(head.weight, std=0.05)  # a flat policy: wrong tokens get sampled
        y = torch.tensor([3])
        ids, coef = group_samples(draw_samples(head(features), 256, 1.3, torch.Generator().manual_seed(1)), y, beta)
        wrong = int(torch.bincount(ids[0].masked_fill(ids[0] == 3, 0), minlength=10)[1:].argmax()) + 1
        wrong = wrong if wrong != 3 else 0  # the most sampled wrong token (id 0 stands in if 3 wins the argmax)
        before = torch.softmax(head(features), -1)[0, wrong].item()
        sampled_loss(head(features), ids, coef).sum().backward()
        with torch.no_grad():
            for p in head.parameters():
                p -= 0.5 * p.grad
        drops[beta] = before - torch.softmax(head(features), -1)[0, wrong].item()
    assert drops[-0.5] > 0
    assert drops[-0.5] > drops[0.0]  # the negative reward pushes it down beyond the renormalisation of β = 0


# --- the chunked objective on a tiny model --------------------------------------------------------------------

def _model():
    loaded = load_model(ModelConfig(name="builtin:tiny-llama", attn_implementation="sdpa"))
    return loaded.model, loaded.view


def _batch(vocab: int):
    """Row 0 packs two records (sample 0 and 1), row 1 is record 2 with right padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, [0, 1, 6, 7]] = -100  # prompts of the two packed records
    labels[1, :4] = -100
    labels[1, 10:] = -100  # padding
    weights = (labels != -100).float()
    weights[1, 6] = 0.5
    positions = torch.tensor([list(range(6)) * 2, list(range(10)) + [0, 1]])
    sample = torch.tensor([[0] * 6 + [1] * 6, [2] * 10 + [-1] * 2])
    return {"input_ids": ids, "labels": labels, "loss_weights": weights, "position_ids": positions,
            "sample_index": sample, "attention_mask": torch.ones_like(ids)}


def _dense_logits(model, batch):
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[:, :-1]
    mask = (batch["labels"][:, 1:] != -100) & (batch["loss_weights"][:, 1:] != 0)
    rows, cols = mask.nonzero(as_tuple=True)
    return logits[rows, cols], batch["labels"][:, 1:][rows, cols], rows, cols


@pytest.mark.parametrize("mode", ["mc", "expected"])
def test_chunked_objective_equals_the_dense_reference_with_the_same_samples(mode):
    model, view = _model()
    cfg = OTRConfig(mode=mode, K=32, kappa=1.3, beta=-0.1) if mode == "mc" else OTRConfig(mode=mode, beta=-0.1)
    otr = OneTokenRollout(cfg)
    captured = {}
    sample = otr.sample
    otr.sample = lambda *a, **k: captured.setdefault("draws", sample(*a, **k))
    batch = _batch(model.config.vocab_size)
    torch.manual_seed(11)
    out = otr(model, view, batch, chunk_size=3)  # 14 positions: 5 chunks, each recomputed in the backward
    out.loss_sum.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits, y, rows, cols = _dense_logits(model, batch)
    w = sequence_weights(batch)[rows, cols]
    if mode == "mc":
        ids, coef = captured["draws"]
        assert len(ids) == len(y) == 14
        per = sampled_loss(logits, ids, coef)
    else:
        per = expected_loss(logits, y, 1.3, -0.1)
    ref = (per * w).sum()
    ref.backward()
    torch.testing.assert_close(out.loss_sum, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.token_losses, per.detach(), atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():  # the tied embedding / head trains too: its chunks are recomputed
        torch.testing.assert_close(ours[n], p.grad, atol=1e-6, rtol=1e-4)


def test_samples_are_a_function_of_the_global_seed():
    model, view = _model()
    otr = OneTokenRollout(OTRConfig(K=16))
    batch = _batch(model.config.vocab_size)
    with torch.no_grad():
        runs = []
        for seed in (5, 5, 6):
            torch.manual_seed(seed)
            runs.append(otr(model, view, batch).token_losses)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_sequence_normalisation_is_a_mean_over_records():
    model, view = _model()
    batch = _batch(model.config.vocab_size)
    otr = OneTokenRollout(OTRConfig(mode="expected"))
    with torch.no_grad():
        out = otr(model, view, batch)
    assert float(otr.weight_total(batch)) == pytest.approx(3.0)  # three records
    assert float(out.weight_sum) == pytest.approx(3.0)
    # by hand: record 0 has loss targets at shifted cols 1..4, record 1 at 7..10, record 2 at 3..8 (one at 0.5)
    per, tokens = out.token_losses, batch["labels"][:, 1:] != -100
    rows, cols = tokens.nonzero(as_tuple=True)
    seq0 = per[(rows == 0) & (cols < 5)].mean()
    seq1 = per[(rows == 0) & (cols >= 5)].mean()
    w2 = batch["loss_weights"][1, 1:][tokens[1]]
    seq2 = (per[rows == 1] * w2).sum() / w2.sum()
    assert int(((rows == 0) & (cols < 5)).sum()) == 4 and int(((rows == 0) & (cols >= 5)).sum()) == 4
    assert float(out.loss_sum / out.weight_sum) == pytest.approx(float((seq0 + seq1 + seq2) / 3), rel=1e-5)
    token = OneTokenRollout(OTRConfig(mode="expected", normalize="token"))
    assert float(token.weight_total(batch)) == pytest.approx(float(batch["loss_weights"][:, 1:].sum()))


def test_config_refuses_k_in_expected_mode_and_beta_of_one():
    with pytest.raises(ValidationError, match="mode: mc only"):
        OTRConfig(mode="expected", K=8)
    with pytest.raises(ValidationError):
        OTRConfig(beta=1.0)
    assert OTRConfig().model_dump() == {"name": "otr", "mode": "mc", "K": 256, "kappa": 1.3, "beta": -0.1,
                                        "logprob_temperature": 1.0, "normalize": "sequence"}


# --- through the trainer --------------------------------------------------------------------------------------

def test_resumed_mc_run_draws_the_same_samples_as_an_uninterrupted_one(tmp_path):
    import json
    import shutil

    from tests.e2e.helpers import losses, write_config
    from tokentune.cli import main

    cfg = write_config(tmp_path, objective={"name": "otr", "K": 16},
                       train={"max_steps": 4, "save_every": 2, "keep_checkpoints": 3})
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "run"
    full = losses(run)
    logged = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= l["otr/gt_sample_rate"] <= 1 for l in logged if "loss" in l)
    assert "eval/otr_gt_sample_rate" in json.loads((run / "summary.json").read_text())["after"]
    shutil.rmtree(run / "final")
    for name in ["summary.json", "report.html"]:
        (run / name).unlink(missing_ok=True)
    assert main(["train", str(cfg), "--resume"]) == 0
    assert losses(run) == full and len(full) == 4


def test_sequence_normalisation_survives_gradient_accumulation(tmp_path):
    from tests.e2e.helpers import losses, write_config
    from tokentune.cli import main

    objective = {"name": "otr", "mode": "expected"}
    a = write_config(tmp_path / "a", objective=objective, train={"batch_size": 4, "grad_accum": 1, "max_steps": 3})
    b = write_config(tmp_path / "b", objective=objective, train={"batch_size": 2, "grad_accum": 2, "max_steps": 3})
    assert main(["train", str(a)]) == 0 and main(["train", str(b)]) == 0
    assert losses(tmp_path / "a" / "run") == pytest.approx(losses(tmp_path / "b" / "run"), rel=1e-5)
