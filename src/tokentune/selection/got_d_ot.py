"""GOT-D's optimal-transport core: the cost between candidate and target embeddings, the entropic OT
solve (POT, log-domain Sinkhorn) between the uniform measures on them, and the calibrated gradient of
the OT value with respect to each candidate's probability mass (Just et al. 2023, LAVA):
`g_i = f_i - (1/(N-1)) * sum_{j != i} f_j`, with f the candidate-side dual potential.

POT is an optional dependency (`pip install tokentune[select]`); it is imported only when solving.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import TokentuneError

COSTS = ("cosine", "l2", "l1")
POT_FIX = "pip install pot  (tokentune's 'select' extra)"


@dataclass
class OTSolution:
    f: np.ndarray  # candidate-side dual potential, [N] (POT's entropic formulation: epsilon * log u)
    g: np.ndarray  # target-side dual potential, [M]
    epsilon: float  # the absolute regularisation the solver used
    ot_cost: float  # <P, C>: transport cost of the entropic plan (what ot.sinkhorn2 returns)
    ot_value: float  # <P, C> + epsilon * KL(P | a b^T): the regularised objective (ot.solve's value)
    iterations: int
    marginal_error: float  # L2 violation of the target marginal at the last check
    converged: bool


def require_pot():
    try:
        import ot
    except ImportError:
        raise TokentuneError("GOT-D solves optimal transport with the optional package 'pot' (POT)",
                             where="tokentune select", fix=POT_FIX) from None
    return ot


def cost_matrix(x: torch.Tensor, y: torch.Tensor, cost: str) -> torch.Tensor:
    """[N, M] float64 cost between rows of x and rows of y: cosine distance 1 - cos, Euclidean (l2) or
    Manhattan (l1) distance."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    if cost == "cosine":
        xn = torch.nn.functional.normalize(x, dim=1)
        yn = torch.nn.functional.normalize(y, dim=1)
        return (1.0 - xn @ yn.T).clamp_min(0.0)
    if cost == "l2":
        return torch.cdist(x, y, p=2.0)
    if cost == "l1":
        return torch.cdist(x, y, p=1.0)
    raise TokentuneError(f"unknown cost {cost!r}", where="cost", fix=f"use one of {', '.join(COSTS)}")


def solve_ot(x: torch.Tensor, y: torch.Tensor, *, cost: str = "cosine", epsilon: float = 0.05,
             relative_epsilon: bool = True, max_iter: int = 2000, tol: float = 1e-6) -> OTSolution:
    """Entropic OT between the uniform measures on x [N, d] and y [M, d] (same device), with POT's
    log-domain Sinkhorn (stable for small epsilon). With `relative_epsilon` the regularisation is
    `epsilon * mean(C)` (ott-jax's default scaling, which the GOT-D paper used), else `epsilon` itself."""
    ot = require_pot()
    if not (epsilon > 0 and max_iter >= 1 and tol > 0):
        raise TokentuneError(f"epsilon and tol must be > 0 and max_iter >= 1; got epsilon={epsilon}, tol={tol}, "
                             f"max_iter={max_iter}", where="solver options")
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise TokentuneError(f"candidate and target embeddings must be [N, d] and [M, d] with the same d; "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}", where="embeddings")
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 1:
        raise TokentuneError(f"GOT-D needs at least 2 candidates and 1 target example; got {n} and {m}",
                             where="candidates/target", fix="add data")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise TokentuneError("the embeddings contain NaN or infinite values", where="embeddings",
                             fix="check the embedder (or the arrays passed to select_subset)")
    c = cost_matrix(x, y, cost)
    scale = float(c.mean()) if relative_epsilon else 1.0
    if scale <= 0:
        raise TokentuneError("every candidate is identical to every target example (the cost is all zero), "
                             "so OT cannot rank them", where="candidates/target",
                             fix="use distinct data, or an absolute epsilon with a cost that separates them")
    eps = epsilon * scale
    a = torch.full((n,), 1.0 / n, dtype=torch.float64, device=c.device)
    b = torch.full((m,), 1.0 / m, dtype=torch.float64, device=c.device)
    plan, log = ot.sinkhorn(a, b, c, eps, method="sinkhorn_log", numItermax=max_iter, stopThr=tol,
                            log=True, warn=False)
    err = float(log["err"][-1]) if len(log["err"]) else math.inf
    ot_cost = float((plan * c).sum())
    log_ratio = torch.log(plan.clamp_min(torch.finfo(plan.dtype).tiny)) - torch.log(a)[:, None] - torch.log(b)[None, :]
    kl = float(torch.where(plan > 0, plan * log_ratio, torch.zeros_like(plan)).sum())
    return OTSolution(f=(eps * log["log_u"]).cpu().numpy(), g=(eps * log["log_v"]).cpu().numpy(), epsilon=eps,
                      ot_cost=ot_cost, ot_value=ot_cost + eps * kl, iterations=int(log["niter"]) + 1,
                      marginal_error=err, converged=err < tol)


def calibrated_gradient(f) -> np.ndarray:
    """`g_i = f_i - (1/(N-1)) sum_{j != i} f_j`: the change of the OT value when mass moves onto candidate i
    from the others (up to the factor (N-1)/N). Sums to 0; unchanged by adding a constant to f."""
    f = np.asarray(f, dtype=np.float64)
    n = f.shape[0]
    if n < 2:
        raise TokentuneError("the calibrated gradient needs at least 2 candidates", where="candidates")
    return f - (f.sum() - f) / (n - 1)
