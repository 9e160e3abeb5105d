"""Q-Tuning (Wang et al., 2025): joint sample and token pruning on the error-uncertainty plane.

Per micro-batch, every sample gets PPL (error) and mean entropy (uncertainty) under the current model.
A bisection over quantile thresholds keeps the samples in Q2 (high PPL, low entropy: "valuable
misconceptions") and Q4 (low PPL, high entropy: "calibration data") at a budget of `sample_ratio`; Q1 and
Q3 (and the middle bands) are dropped. Q2 samples keep only `token_ratio` of their response tokens,
ranked by neighbour-smoothed token PPL; Q4 samples keep every token. See docs/selectors/q_tuning.md."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..registry import register
from .random_subset import sample_spans

_MAX_NLL = 700.0  # exp() of more overflows float64; such tokens rank as the worst either way


class QTuningConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["q_tuning"] = "q_tuning"
    sample_ratio: float = Field(0.25, gt=0, le=1, description="r_sample: share of each micro-batch's samples kept")
    token_ratio: float = Field(0.5, gt=0, le=1, description="r_token: share of response tokens kept in Q2 samples")
    smoothing: float = Field(0.5, ge=0, le=1, description="λ in s_i = (1-λ)·PPL_i + λ·(PPL_{i-1} + PPL_{i+1})")
    keep_direction: Literal["low", "high"] = Field(
        "low", description="low: keep the Q2 tokens with the lowest smoothed PPL (drop the highest); high: the reverse")
    bisection_iters: int = Field(10, ge=1, le=50, description="bisection steps for the quantile thresholds")
    boundary: Literal["self", "zero"] = Field(
        "self", description="a missing neighbour (response start/end) counts as the token's own PPL (self) or 0 (zero)")


def regions(score: torch.Tensor, ent: torch.Tensor, q: float) -> tuple[torch.Tensor, ...]:
    """Boolean masks of Q1..Q4 at quantile level q (α = β = q, as the paper's bisection moves both together):
    high = at or above Quantile_{1-q}, low = at or below Quantile_q. Past q = 0.5 the bands overlap."""
    hi_p, lo_p = score >= torch.quantile(score, 1 - q), score <= torch.quantile(score, q)
    hi_e, lo_e = ent >= torch.quantile(ent, 1 - q), ent <= torch.quantile(ent, q)
    return hi_p & hi_e, hi_p & lo_e, lo_p & lo_e, lo_p & hi_e


def _retained(score: torch.Tensor, ent: torch.Tensor, q: float) -> torch.Tensor:
    _, q2, _, q4 = regions(score, ent, q)
    return q2 | q4


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Normalised ranks in [0, 1] (0 for a single sample)."""
    return torch.argsort(torch.argsort(x, stable=True)).double() / max(len(x) - 1, 1)


def bisect_level(score: torch.Tensor, ent: torch.Tensor, ratio: float, iters: int) -> tuple[float, float]:
    """(lo, hi): quantile levels with retained share <= ratio at lo and > ratio at hi (or hi = the interval's
    end). The paper searches [0, 0.5]; when even 0.5 keeps too few (positively correlated PPL and entropy,
    or ratio near 1) we search [0.5, 1], where the bands overlap, so that every budget is reachable."""
    share = lambda q: float(_retained(score, ent, q).double().mean())  # noqa: E731
    lo, hi = (0.0, 0.5) if share(0.5) > ratio else (0.5, 1.0)
    for _ in range(iters):
        mid = (lo + hi) / 2
        if share(mid) > ratio:
            hi = mid
        else:
            lo = mid
    return lo, hi


def assign_quadrants(score: torch.Tensor, ent: torch.Tensor, ratio: float, iters: int) -> tuple[torch.Tensor, float]:
    """Quadrant per sample (1..4; 0 = dropped from the middle bands) and the threshold level used.

    Kept: exactly round(ratio·n) samples (at least 1): those retained at the bisection's lower level, then
    the ones that enter between its lower and upper level, then (never needed unless level 0 already keeps
    too many) by how far their PPL rank and entropy rank differ. Past level 0.5 the bands overlap; a sample
    in two regions goes by its ranks u (PPL) and v (entropy): kept ones are Q2 if u > v, else Q4; dropped
    ones Q1 if u + v > 1, else Q3."""
    n = len(score)
    lo, hi = bisect_level(score, ent, ratio, iters)
    q1, q2, q3, q4 = regions(score, ent, hi)
    u, v = _ranks(score), _ranks(ent)
    priority = 2.0 * _retained(score, ent, lo).double() + (q2 | q4).double() + (u - v).abs() / 2
    k = min(n, max(1, math.floor(ratio * n + 0.5)))
    kept = torch.zeros(n, dtype=torch.bool)
    kept[torch.argsort(priority, descending=True, stable=True)[:k]] = True
    is_q2 = q2 & (~q4 | (u > v))
    is_q1 = q1 & (~q3 | (u + v > 1))
    quadrant = torch.zeros(n, dtype=torch.long)
    quadrant[~kept & q3] = 3
    quadrant[~kept & is_q1] = 1
    quadrant[kept] = 4
    quadrant[kept & is_q2] = 2
    return quadrant, hi


def smoothed_token_ppl(nll: torch.Tensor, positions: torch.Tensor, lam: float, boundary: str) -> torch.Tensor:
    """s_i = (1-λ)·PPL_i + λ·(PPL_{i-1} + PPL_{i+1}) over a sample's response tokens (sorted positions).
    Neighbours are the adjacent sequence positions when they are response tokens of the same sample;
    otherwise (response start/end, a gap of prompt or pruned tokens) `boundary` decides."""
    ppl = nll.double().clamp(max=_MAX_NLL).exp()
    fill = ppl if boundary == "self" else torch.zeros_like(ppl)
    adjacent = positions[1:] == positions[:-1] + 1
    prev, nxt = fill.clone(), fill.clone()
    prev[1:] = torch.where(adjacent, ppl[:-1], fill[1:])
    nxt[:-1] = torch.where(adjacent, ppl[1:], fill[:-1])
    return (1 - lam) * ppl + lam * (prev + nxt)


def tokens_to_keep(scores: torch.Tensor, ratio: float, direction: str) -> torch.Tensor:
    """Indices of the round(ratio·|T|) (at least 1) tokens kept: lowest (or highest) score, earlier first on ties."""
    k = max(1, math.floor(ratio * len(scores) + 0.5))
    return torch.argsort(scores, descending=direction == "high", stable=True)[:k]


@register("selector", "q_tuning", config=QTuningConfig,
          description="Q-Tuning: keep Q2/Q4 samples on the PPL-entropy plane, prune Q2 tokens by smoothed PPL")
class QTuning:
    name = "q_tuning"
    needs = {"current"}

    def __init__(self, config: QTuningConfig):
        self.config = config

    def select(self, batch: dict, signals) -> dict:
        spans = sample_spans(batch)
        if not spans:
            return batch
        c = self.config
        stats = signals.current()
        nlls = [-stats.logprob[row, pos].cpu().double() for row, pos in spans]
        score = torch.stack([nll.mean() for nll in nlls])  # log PPL: same ranks and thresholds as PPL
        ent = torch.stack([stats.entropy[row, pos].cpu().double().mean() for row, pos in spans])
        quadrant, level = assign_quadrants(score, ent, c.sample_ratio, c.bisection_iters)
        weights = batch["loss_weights"].clone()
        for (row, pos), nll, q in zip(spans, nlls, quadrant.tolist()):
            if q in (0, 1, 3):
                weights[row, pos] = 0
            elif q == 2 and c.token_ratio < 1:
                keep = tokens_to_keep(smoothed_token_ppl(nll, pos.cpu(), c.smoothing, c.boundary),
                                      c.token_ratio, c.keep_direction)
                drop = torch.ones(len(pos), dtype=torch.bool)
                drop[keep] = False
                weights[row, pos[drop.to(pos.device)]] = 0
        n = len(spans)
        for i in range(1, 5):
            signals.report(f"select/q_tuning_Q{i}", float((quadrant == i).sum()) / n)
        signals.report("select/q_tuning_mid", float((quadrant == 0).sum()) / n)
        signals.report("select/q_tuning_level", level)
        return {**batch, "loss_weights": weights}
