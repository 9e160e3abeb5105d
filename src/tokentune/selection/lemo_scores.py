"""LeMo token informativeness (spec steps 1-2), computed from one decoder layer's own query/key
projections at that layer's input, without gradients.

S^h_ij = q_i·k_j * scaling is the pre-softmax logit of head h (after RoPE, as the attention sees it).
Entries with i != j in the same packed segment count: all of them (the definition I(T_j) = Σ_{i≠j} S_ij
as written), or with `causal` only the ones the attention computes (i > j). Causal column sums favour
early blocks, which more queries see; see docs/selectors/lemo.md for what that does.
Per b x b block: I(B^S_mn) = max over the block of Σ_h max(S^h_ij, 0) / N_heads; a token block's score
is the column sum I(B^T_n) = Σ_m I(B^S_mn). Queries are processed in chunks, so at most
[B, heads, chunk, T] logits exist at once, never the T x T matrix of every head."""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] packed-segment id per token. Same rule as transformers' packed-sequence detection (a new
    segment wherever the position does not grow by 1), so it agrees with the mask the model builds."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).long().cumsum(-1)


def normed_input(layer, hidden: torch.Tensor) -> torch.Tensor:
    return layer.input_layernorm(hidden)


def layer_qk(layer, x: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(query [B, H, T, D], key [B, Hkv, T, D], scaling) of a Llama-shaped block on its normed input x,
    computed exactly as its attention does (projections incl. adapters, per-head q/k norm, RoPE)."""
    attn = layer.self_attn
    b, t, _ = x.shape
    shape = (b, t, -1, attn.head_dim)
    q, k = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape)
    if hasattr(attn, "q_norm"):  # Qwen3: RMS norm over each head's dimension, before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = position_embeddings
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    q, k = rope(q, k, cos, sin)
    return q, k, float(attn.scaling)


def block_score_matrix(query: torch.Tensor, key: torch.Tensor, scaling: float, seg: torch.Tensor,
                       block: int, chunk: int = 512, causal: bool = False) -> torch.Tensor:
    """[B, nb, nb] float32: I(B^S_mn) for query block m, key block n (0 where no entry is allowed).

    query [B, H, T, D]; key [B, Hkv, T, D] (grouped-query keys are shared by H/Hkv query heads)."""
    b, h, t, d = query.shape
    g = key.shape[1]
    nb = math.ceil(t / block)
    chunk = max(block, chunk // block * block)  # chunks start on block boundaries
    out = torch.zeros(b, nb, nb, dtype=torch.float32, device=query.device)
    idx = torch.arange(t, device=query.device)
    for s in range(0, t, chunk):
        e = min(s + chunk, t)
        ke = e if causal else t  # causal: later keys never count
        q = query[:, :, s:e].float().reshape(b, g, h // g, e - s, d)
        logits = torch.einsum("bgrqd,bgkd->bgrqk", q, key[:, :, :ke].float()) * scaling
        positive = logits.clamp_min_(0).sum((1, 2)) / h  # [B, c, ke]
        order = idx[s:e, None] > idx[None, :ke] if causal else idx[s:e, None] != idx[None, :ke]
        positive = positive * (order & (seg[:, s:e, None] == seg[:, None, :ke]))
        rows, cols = math.ceil((e - s) / block), math.ceil(ke / block)
        positive = F.pad(positive, (0, cols * block - ke, 0, rows * block - (e - s)))
        out[:, s // block:s // block + rows, :cols] = positive.view(b, rows, block, cols, block).amax((2, 4))
    return out


def block_allowed(seg: torch.Tensor, block: int, causal: bool = False) -> torch.Tensor:
    """[B, nb, nb] bool: query block m and key block n share a packed segment (and, causal, m >= n): where
    the exact matrix can be non-zero. The predictor's matrix is masked with it, like the ground truth."""
    b, t = seg.shape
    nb = math.ceil(t / block)
    padded = torch.cat([seg, seg[:, -1:].expand(b, nb * block - t)], 1).view(b, nb, block)
    first, last = padded.amin(-1), padded.amax(-1)
    # Segment ids grow along the row: the blocks share one iff neither ends before the other starts.
    shared = (first[:, :, None] <= last[:, None, :]) & (first[:, None, :] <= last[:, :, None])
    if causal:
        shared &= torch.ones(nb, nb, dtype=torch.bool, device=seg.device).tril()
    return shared


def block_embeddings(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, nb, H]: a block's representative embedding for the predictor = mean of its normed inputs."""
    b, t, hdim = x.shape
    nb = math.ceil(t / block)
    summed = F.pad(x.float(), (0, 0, 0, nb * block - t)).view(b, nb, block, hdim).sum(2)
    counts = torch.full((nb,), float(block), device=x.device)
    counts[-1] = t - (nb - 1) * block
    return summed / counts[None, :, None]


def token_block_scores(matrix: torch.Tensor) -> torch.Tensor:
    """[B, nb]: column sums I(B^T_n) = Σ_m I(B^S_mn)."""
    return matrix.sum(1)
