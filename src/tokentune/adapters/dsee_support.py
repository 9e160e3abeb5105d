"""DSEE's sparse support Ω: which N entries of each pretrained matrix get a trainable sparse update.

The default decomposes the pretrained weight GreBsmo-style (robust PCA: W ≈ UV + S with a greedily grown
rank and a hard-thresholded sparse part S) and keeps the N largest |S|; only the indices are kept. The
official code's alternatives ("omp": largest |W|, "rp": random) are here too.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Stacked matrices per batched GreBsmo call: bounds memory (about 256 MB of fp32 per operand).
_BATCH_ELEMENTS = 1 << 26


def orthonormal_basis(p: Tensor) -> Tensor:
    """An orthonormal basis of the columns of p [..., m, k]. GreBsmo only uses U Uᵀ (a projection), so any basis
    does: Cholesky-QR twice in fp64 (matrix products, several times faster than Householder on a CPU), falling
    back to Householder QR where p is too ill-conditioned for it."""
    x = p.double()
    for _ in range(2):
        r, info = torch.linalg.cholesky_ex(x.mT @ x, upper=True)
        if bool(info.any()):
            return torch.linalg.qr(p).Q
        x = torch.linalg.solve_triangular(r, x, upper=True, left=False)
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    if float((x.mT @ x - eye).abs().max()) > 1e-6:
        return torch.linalg.qr(p).Q
    return x.to(p.dtype)


@torch.no_grad()
def grebsmo_scores(weights: Tensor, *, iters: int, rank_step: int, inner: int, threshold: float,
                   max_rank_fraction: float) -> Tensor:
    """|W - UV| after the GreBsmo iterations, for a batch of matrices [B, m, n] (fp32).

    As in the official code: start from rank 1 (V random), alternate `inner` times
    U = orth((W - S) Vᵀ), V = Uᵀ (W - S), S = hard_threshold(W - UV), then grow V by `rank_step` rows of the
    residual's R factor, `iters` times. The rank stops growing at max_rank_fraction · min(m, n): at full
    rank UV = W and S vanishes, which would leave no residual to rank. The top-N of the returned score is
    the top-N of |S| whenever S has at least N entries above the threshold (thresholding keeps the order),
    and still ranks the entries when it has fewer.
    """
    b, m, n = weights.shape
    w = weights
    cap = max(1, min(int(max_rank_fraction * min(m, n)), min(m, n) - 1))
    v = torch.randn(b, 1, n).to(w)  # drawn on the CPU generator: the same support on every device
    uv = torch.zeros_like(w)
    for _ in range(iters):
        s = torch.zeros_like(w)
        for _ in range(inner):
            low = w - s
            u = orthonormal_basis(low @ v.mT)
            v = u.mT @ low
            uv = u @ v
            resid = w - uv
            s = torch.where(resid.abs() >= threshold, resid, torch.zeros_like(resid))
        rank = v.shape[-2]
        if rank >= cap:
            break
        grow = min(rank_step, cap - rank)
        # The first rows of QR(E).R, as the code takes them, without factorising all of E:
        # R[:g] = Q[:, :g]ᵀ E, and Householder's first g columns of Q depend on E's first g columns only.
        e = w - uv - s
        v = torch.cat([v, torch.linalg.qr(e[..., :grow]).Q.mT @ e], dim=-2)
    return (w - uv).abs()


@torch.no_grad()
def select_support(matrices: list[Tensor], num_sparse: int, method: str, grebsmo: dict) -> list[Tensor]:
    """For each matrix ([out, in], any dtype), the sorted flat indices (int64) of its N chosen entries."""
    if num_sparse == 0:
        return [torch.zeros(0, dtype=torch.long, device=m.device) for m in matrices]
    out: list[Tensor | None] = [None] * len(matrices)
    by_shape: dict[tuple, list[int]] = {}
    for i, m in enumerate(matrices):
        by_shape.setdefault((tuple(m.shape), m.device), []).append(i)
    for (shape, _), members in by_shape.items():
        chunk = max(1, _BATCH_ELEMENTS // (shape[0] * shape[1]))
        for start in range(0, len(members), chunk):
            part = members[start:start + chunk]
            stacked = torch.stack([matrices[i].float() for i in part])
            if method == "grebsmo":
                scores = grebsmo_scores(stacked, **grebsmo)
            elif method == "magnitude":
                scores = stacked.abs()
            else:  # random
                scores = torch.rand(stacked.shape).to(stacked)
            top = scores.flatten(1).topk(num_sparse, dim=1).indices.sort(dim=1).values
            for row, i in zip(top, part):
                out[i] = row.clone()
    return out


def broadcast_from_first_rank(tensors: list[Tensor]) -> None:
    """Every process must train the same Ω (the code broadcasts rank 0's masks); a no-op in one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            if t.numel():
                dist.broadcast(t, 0)
