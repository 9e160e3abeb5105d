"""Q-Tuning against the spec's checks: keep-all equals plain training through the real trainer, the
bisection's budget and quadrants against an independent numpy reading of the four thresholds, exact
token budgets in Q2 and none in Q4 (both keep directions, packed rows), and lambda = 0 = plain PPL ranking."""

import json
import math

import numpy as np
import pytest
import torch

from tests.e2e.helpers import losses, write_config
from tokentune.cli import main
from tokentune.selection.q_tuning import (QTuning, QTuningConfig, assign_quadrants, smoothed_token_ppl,
                                          tokens_to_keep)
from tokentune.selection.signals import TokenStats


class _Signals:
    def __init__(self, logprob, entropy):
        self.stats = TokenStats(logprob, entropy)
        self.reported = {}

    def current(self):
        return self.stats

    def report(self, key, value):
        self.reported[key] = value


def _np_regions(score, ent, q):
    """The four-threshold reading, written independently: high = >= Quantile_{1-q}, low = <= Quantile_q."""
    hp, lp = score >= np.quantile(score, 1 - q), score <= np.quantile(score, q)
    he, le = ent >= np.quantile(ent, 1 - q), ent <= np.quantile(ent, q)
    return hp & he, hp & le, lp & le, lp & he


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ratio", [0.125, 0.25, 0.4])
def test_bisection_meets_the_budget_and_keeps_only_q2_q4(seed, ratio):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(16, 64))
    score, ent = rng.random(n), rng.random(n)
    quadrant, level = assign_quadrants(torch.tensor(score), torch.tensor(ent), ratio, 10)
    kept = (quadrant == 2) | (quadrant == 4)
    assert abs(int(kept.sum()) - ratio * n) <= 1
    assert level <= 0.5  # independent scores: the paper's [0, 0.5] interval suffices
    q1, q2, q3, q4 = _np_regions(score, ent, level)
    kept = kept.numpy()
    assert not (kept & (q1 | q3)).any()  # no Q1/Q3 sample survives
    assert np.array_equal(quadrant.numpy() == 2, kept & q2) and np.array_equal(quadrant.numpy() == 4, kept & q4)
    assert np.array_equal(quadrant.numpy() == 1, ~kept & q1) and np.array_equal(quadrant.numpy() == 3, ~kept & q3)


@pytest.mark.parametrize("ratio", [0.5, 0.75, 1.0])
def test_budgets_beyond_the_papers_interval_are_still_met(ratio):
    # Strongly correlated PPL and entropy: at level 0.5 only a few samples are off the diagonal.
    rng = np.random.default_rng(0)
    score = rng.random(40)
    ent = score + 0.05 * rng.random(40)
    quadrant, level = assign_quadrants(torch.tensor(score), torch.tensor(ent), ratio, 10)
    assert int(((quadrant == 2) | (quadrant == 4)).sum()) == math.floor(ratio * 40 + 0.5)
    assert level > 0.5


def test_hand_placed_quadrants():
    # (mean NLL, mean entropy): A high/low = Q2, B low/high = Q4, C high/high = Q1, D low/low = Q3.
    score = torch.tensor([3.0, 0.2, 2.8, 0.3], dtype=torch.float64)
    ent = torch.tensor([0.1, 3.0, 2.9, 0.2], dtype=torch.float64)
    quadrant, _ = assign_quadrants(score, ent, 0.5, 10)
    assert quadrant.tolist() == [2, 4, 1, 3]


def _ref_smoothed(nll, lam, boundary):
    ppl = [math.exp(x) for x in nll]
    out = []
    for i, p in enumerate(ppl):
        missing = p if boundary == "self" else 0.0
        prev = ppl[i - 1] if i > 0 else missing
        nxt = ppl[i + 1] if i + 1 < len(ppl) else missing
        out.append((1 - lam) * p + lam * (prev + nxt))
    return out


@pytest.mark.parametrize("boundary", ["self", "zero"])
def test_smoothed_token_ppl_by_hand(boundary):
    nll = [1.0, 0.5, 2.0, 0.1, 1.5]
    got = smoothed_token_ppl(torch.tensor(nll), torch.arange(5, 10), 0.5, boundary)
    assert got.tolist() == pytest.approx(_ref_smoothed(nll, 0.5, boundary))
    # A gap (positions 6 and 8 are not adjacent) is a boundary on both sides.
    gapped = smoothed_token_ppl(torch.tensor(nll), torch.tensor([5, 6, 8, 9, 10]), 0.5, boundary)
    expected = _ref_smoothed(nll[:2], 0.5, boundary) + _ref_smoothed(nll[2:], 0.5, boundary)
    assert gapped.tolist() == pytest.approx(expected)


def test_lambda_zero_is_plain_token_ppl_ranking():
    torch.manual_seed(0)
    nll = torch.rand(37) * 5
    scores = smoothed_token_ppl(nll, torch.arange(37), 0.0, "self")
    for direction, ref in [("low", torch.argsort(nll)), ("high", torch.argsort(nll, descending=True))]:
        keep = tokens_to_keep(scores, 0.3, direction)
        assert len(keep) == round(0.3 * 37) and set(keep.tolist()) == set(ref[:len(keep)].tolist())


def _packed_batch():
    """Two packed rows, four samples (A, C in row 0; B, D in row 1) with hand-set token NLL and entropy.
    A: 5 response tokens, NLL [1, 5, 2, 4, 3] (mean 3), entropy 0.1: Q2.  B: NLL 0.2, entropy 3: Q4.
    C: NLL 2.8, entropy 2.9: Q1.  D: NLL 0.3, entropy 0.2: Q3."""
    labels = torch.full((2, 16), -100)
    index = torch.full((2, 16), -1)
    nll, ent = torch.zeros(2, 16), torch.zeros(2, 16)
    spans = {"A": (0, 0, 8, [1, 5, 2, 4, 3], 0.1), "C": (0, 8, 14, [2.8] * 4, 2.9),
             "B": (1, 0, 7, [0.2] * 4, 3.0), "D": (1, 7, 13, [0.3] * 3, 0.2)}
    for i, (row, start, end, token_nll, token_ent) in enumerate(spans.values()):
        index[row, start:end] = i
        first = end - len(token_nll)  # prompt tokens before the response
        labels[row, first:end] = 7
        nll[row, first:end] = torch.tensor(token_nll)
        ent[row, first:end] = token_ent
    batch = {"input_ids": labels.clamp_min(3), "labels": labels, "loss_weights": (labels != -100).float(),
             "sample_index": index}
    return batch, _Signals(-nll, ent), spans


@pytest.mark.parametrize("direction", ["low", "high"])
def test_select_on_packed_rows(direction):
    batch, signals, spans = _packed_batch()
    before = batch["loss_weights"].clone()
    out = QTuning(QTuningConfig(sample_ratio=0.5, token_ratio=0.5, keep_direction=direction)).select(batch, signals)
    w = out["loss_weights"]
    assert torch.equal(batch["loss_weights"], before)  # the input is not mutated
    row, start, end, token_nll, _ = spans["A"]
    s = _ref_smoothed(token_nll, 0.5, "self")
    k = math.floor(0.5 * 5 + 0.5)  # round(r_token * |T|), halves up: 3
    order = sorted(range(5), key=lambda i: s[i], reverse=direction == "high")
    expected = [1.0 if i in order[:k] else 0.0 for i in range(5)]
    assert w[row, end - 5:end].tolist() == expected
    row, start, end, _, _ = spans["B"]  # Q4: every token keeps its weight
    assert torch.equal(w[row, start:end], before[row, start:end])
    for name in "CD":  # Q1, Q3 dropped
        row, start, end, _, _ = spans[name]
        assert w[row, start:end].sum() == 0
    assert (w[before == 0] == 0).all()  # prompts and padding never gain weight
    assert {k: signals.reported[f"select/q_tuning_{k}"] for k in ("Q1", "Q2", "Q3", "Q4", "mid")} == \
        {"Q1": 0.25, "Q2": 0.25, "Q3": 0.25, "Q4": 0.25, "mid": 0.0}


def test_ratio_one_keeps_every_token_of_the_batch():
    batch, signals, _ = _packed_batch()
    out = QTuning(QTuningConfig(sample_ratio=1, token_ratio=1)).select(batch, signals)
    assert torch.equal(out["loss_weights"], batch["loss_weights"])


def test_keep_all_equals_plain_training_and_reports_quadrants(tmp_path):
    plain = write_config(tmp_path / "plain", train={"max_steps": 2}, eval={"at_end": False})
    tuned = write_config(tmp_path / "tuned", train={"max_steps": 2}, eval={"at_end": False})
    assert main(["train", str(plain)]) == 0
    assert main(["train", str(tuned), "selectors=[{name: q_tuning, sample_ratio: 1, token_ratio: 1}]"]) == 0
    assert losses(tmp_path / "tuned" / "run") == losses(tmp_path / "plain" / "run")
    record = json.loads((tmp_path / "tuned" / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["select/samples_kept"] == 1.0 and record["select/loss_tokens_kept"] == 1.0
    assert record["select/q_tuning_Q2"] + record["select/q_tuning_Q4"] == 1.0
