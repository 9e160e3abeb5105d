"""GreenTrainer's budget and tensor selection. Index 0 is the OUTPUT side here (the reference flips the
parameter list): activation gradients enter at tensor 0 and travel down to the deepest selected tensor k*.

Problem: choose m ∈ {0,1}^N maximising Σ m_k I_k subject to
    Σ_k m_k t_dw[k] + Σ_{j ≤ k*} t_dy[j] ≤ budget          (integer units; k* = deepest selected tensor)

`select_exact` solves it exactly: for every candidate k* it pays Σ_{j≤k*} t_dy[j] + t_dw[k*] and fills the rest
of the budget with a 0/1 knapsack over the t_dw of the tensors above k*. The knapsack table over tensors
0..k*-1 grows by one item per candidate, so the whole search is O(N · budget). (The reference dynamic programme
only chains through table cells whose best solution ends in a selection, which misses the optimum in ~28 % of
small random instances; see the spec.)
"""

from __future__ import annotations

import numpy as np

from ..errors import TokentuneError

MIN_RHO_BP = 0.05  # the reference's backward fraction when the requested ρ leaves none for the backward pass


def backward_rho(rho: float, t_fp: float, t_bp: float) -> float:
    """The backward-pass fraction that makes (forward + selected backward) = ρ · (forward + full backward):
    ρ_bp = ρ(1 + t_fp/t_bp) − t_fp/t_bp, or 0.05 when that is ≤ 0 (reference)."""
    r = t_fp / t_bp
    rho_bp = rho * (1 + r) - r
    return rho_bp if rho_bp > 0 else MIN_RHO_BP


def quantise(t_dy: np.ndarray, t_dw: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale so that Σ(t_dy + t_dw) = resolution, then floor to integers (reference `downscale_t_dy_and_t_dw`)."""
    scale = resolution / float(np.sum(t_dy) + np.sum(t_dw))
    return np.floor(t_dy * scale).astype(np.int64), np.floor(t_dw * scale).astype(np.int64)


def selection_cost(t_dy, t_dw, mask) -> float:
    """Σ m_k t_dw[k] + Σ_{j ≤ k*} t_dy[j] (output side first); 0 for an empty mask."""
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return 0
    deepest = int(np.flatnonzero(m)[-1])
    return np.asarray(t_dw)[m].sum() + np.asarray(t_dy)[: deepest + 1].sum()


def reachable(t_dy: np.ndarray, t_dw: np.ndarray, budget: int) -> np.ndarray:
    """Tensors that some feasible selection can include: those whose own cost as the deepest tensor fits."""
    return np.cumsum(t_dy) + t_dw <= budget


def select_exact(t_dy, t_dw, importance, budget: int) -> tuple[float, np.ndarray]:
    """The best non-empty selection (output side first): (Σ m·I, mask). Integer costs, float importances.

    Ties keep the shallowest k* and, inside the knapsack, the earlier (output-side) solution."""
    t_dy = np.asarray(t_dy, dtype=np.int64)
    t_dw = np.asarray(t_dw, dtype=np.int64)
    imp = np.asarray(importance, dtype=np.float64)
    n, budget = len(t_dy), int(budget)
    if (t_dy < 0).any() or (t_dw < 0).any():
        raise ValueError("costs must be non-negative")
    best = np.zeros(budget + 1)  # best[c]: most importance from tensors above the candidate, cost ≤ c
    take = np.zeros((n, budget + 1), dtype=bool)  # take[i, c]: item i is in the best solution of items 0..i at c
    top_value, top_k, top_cap = -np.inf, -1, 0
    reach = np.cumsum(t_dy)
    for k in range(n):
        if reach[k] > budget:  # t_dy alone is over budget from here down
            break
        cap = budget - reach[k] - t_dw[k]
        if cap >= 0 and imp[k] + best[cap] > top_value:
            top_value, top_k, top_cap = imp[k] + best[cap], k, cap
        w, v = int(t_dw[k]), imp[k]
        if v > 0 and w <= budget:  # add tensor k to the knapsack of the tensors above the next candidate
            cand = np.full(budget + 1, -np.inf)
            cand[w:] = best[: budget + 1 - w] + v
            take[k] = cand > best
            best = np.where(take[k], cand, best)
    mask = np.zeros(n, dtype=bool)
    if top_k < 0:
        return float("-inf"), mask
    mask[top_k] = True
    cap = top_cap
    for i in range(top_k - 1, -1, -1):
        if take[i, cap]:
            mask[i] = True
            cap -= int(t_dw[i])
    return float(top_value), mask


def select_tensors(t_dy_q, t_dw_q, importance, rho_bp: float) -> tuple[float, np.ndarray, int]:
    """Budget int(ρ_bp · Σ quantised costs) as in the reference; (value, mask, budget). Output side first."""
    budget = int(rho_bp * int(np.sum(t_dy_q) + np.sum(t_dw_q)))
    value, mask = select_exact(t_dy_q, t_dw_q, importance, budget)
    if not mask.any():
        cheapest = int(np.min(np.cumsum(t_dy_q) + t_dw_q))
        raise TokentuneError(
            f"GreenTrainer's backward budget ({budget} of {int(np.sum(t_dy_q) + np.sum(t_dw_q))} units, "
            f"rho_bp {rho_bp:.3f}) cannot pay for any tensor (the cheapest costs {cheapest})",
            where="adapter.rho", fix="raise adapter.rho (or adapter.resolution if costs round badly)")
    return value, mask, budget
