"""Attention probabilities of one layer, reduced per query: the mass each token puts on a chosen set of
keys (e.g. the prompt), averaged over heads. Captured through the attention hook, computed in query
chunks so the T x T matrix of all heads is never held at once."""

from __future__ import annotations

import math

import torch

from ..models.attention import add_attention_hook


def segments(position_ids: torch.Tensor) -> torch.Tensor:
    """Segment id per token: a new segment starts wherever the position restarts at 0."""
    return (position_ids == 0).long().cumsum(-1)


class QKCapture:
    """Attention hook that stores (query, key) of one layer during a forward."""

    def __init__(self):
        self.query = self.key = None

    def __call__(self, module, query, key, value, mask, kwargs):
        self.query, self.key = query.detach(), key.detach()
        self.scaling = kwargs.get("scaling") or 1.0 / math.sqrt(query.shape[-1])
        return query, key, value, mask

    def install(self, view, layer: int):
        return add_attention_hook(view, layer % view.num_layers, self)


@torch.no_grad()
def mass_on_keys(query: torch.Tensor, key: torch.Tensor, scaling: float, position_ids: torch.Tensor,
                 key_mask: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """[B, T]: for each query i, mean over heads of Σ_{j in key_mask, j ≤ i, same segment} softmax_j(q_i·k_j).

    query [B, H, T, D], key [B, Hkv, T, D] (grouped-query keys are repeated to H heads)."""
    b, h, t, _ = query.shape
    if key.shape[1] != h:
        key = key.repeat_interleave(h // key.shape[1], dim=1)
    seg = segments(position_ids)
    idx = torch.arange(t, device=query.device)
    out = torch.zeros(b, t, dtype=torch.float32, device=query.device)
    for s in range(0, t, chunk):
        q = query[:, :, s:s + chunk].float()
        scores = torch.einsum("bhqd,bhkd->bhqk", q, key.float()) * scaling
        allowed = (idx[None, s:s + chunk, None] >= idx[None, None, :]) & (seg[:, s:s + chunk, None] == seg[:, None, :])
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[:, s:s + chunk] = (probs * key_mask[:, None, None, :].float()).sum(-1).mean(1)
    return out
