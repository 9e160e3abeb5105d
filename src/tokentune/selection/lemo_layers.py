"""Token elimination inside decoder layers: per input and per layer, the token blocks a plan drops skip the
layer (attention and MLP) and pass through on the residual stream unchanged.

The kept tokens are gathered with their own position ids and RoPE embeddings, the original layer runs on
them under the sub-mask of the model's mask among kept tokens (causal, packed segments), and its outputs
are scattered back. Eliminated tokens never enter the layer, so none of their activations at that layer is
saved for backward; their gradient flows straight through (identity)."""

from __future__ import annotations

import math

import torch

from ..errors import TokentuneError


def plan_blocks(scores: torch.Tensor, *, keep_ratio: float | None = None,
                threshold: float | None = None) -> torch.Tensor:
    """[B, nb] bool blocks to keep: the top ceil(keep_ratio * nb) per row, or those scoring >= threshold.
    Every row keeps at least its best block, so a layer is never skipped by a whole row."""
    b, nb = scores.shape
    if keep_ratio is not None:
        top = scores.topk(max(1, math.ceil(keep_ratio * nb - 1e-9)), dim=1).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)
    keep = scores >= threshold
    return keep.scatter_(1, scores.argmax(1, keepdim=True), True)


def block_to_tokens(keep_blocks: torch.Tensor, block: int, t: int) -> torch.Tensor:
    return keep_blocks.repeat_interleave(block, dim=1)[:, :t]


def _slots(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [B, k], valid [B, k]): the kept token positions of each row in order, rows with fewer kept
    tokens filled up with their first eliminated ones (valid False; they attend only to themselves and
    their outputs are thrown away), so that all rows share one width k."""
    counts = keep.sum(1)
    k = int(counts.max())
    dropped = ~keep
    filler = dropped & (dropped.cumsum(1) <= (k - counts)[:, None])
    index = (keep | filler).nonzero()[:, 1].view(keep.shape[0], k)
    return index, keep.gather(1, index)


def _sub_mask(mask: torch.Tensor | None, index: torch.Tensor, valid: torch.Tensor, kind: str,
              dtype: torch.dtype) -> torch.Tensor | None:
    """The mask among kept tokens, [B, 1, k, k], in the model's format (bool for SDPA, additive float for
    eager). None: plain causal, which the kept tokens' order preserves."""
    b, k = index.shape
    if mask is None and bool(valid.all()):
        return None
    both = valid[:, :, None] & valid[:, None, :]
    eye = torch.eye(k, dtype=torch.bool, device=index.device)[None]
    if mask is None:
        allowed = torch.where(both, index[:, :, None] >= index[:, None, :], eye)
        if kind == "bool":
            return allowed[:, None]
        zeros = torch.zeros(allowed.shape, dtype=dtype, device=index.device)
        return zeros.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
    full = mask[:, 0].expand(b, -1, -1)
    sub = full.gather(1, index[:, :, None].expand(b, k, full.shape[2])).gather(2, index[:, None, :].expand(b, k, k))
    if mask.dtype == torch.bool:
        return torch.where(both, sub, eye)[:, None]
    own = torch.zeros(eye.shape, dtype=mask.dtype, device=mask.device).masked_fill_(~eye, torch.finfo(mask.dtype).min)
    return torch.where(both, sub, own)[:, None]


def gathered_forward(inner, hidden: torch.Tensor, keep: torch.Tensor, kwargs: dict, mask_kind: str):
    """Run `inner` (the layer's own forward) on the tokens where keep [B, T] is True; the rest pass through."""
    b, t, hdim = hidden.shape
    index, valid = _slots(keep)
    k = index.shape[1]
    flat = (index + torch.arange(b, device=index.device)[:, None] * t).reshape(-1)
    rows = hidden.reshape(b * t, hdim)
    sub = rows.index_select(0, flat).view(b, k, hdim)
    take = index[:, :, None].expand(b, k, kwargs["position_embeddings"][0].shape[-1])
    kwargs = {**kwargs,
              "position_embeddings": tuple(e.expand(b, -1, -1).gather(1, take) for e in kwargs["position_embeddings"]),
              "position_ids": kwargs["position_ids"].expand(b, -1).gather(1, index),
              "attention_mask": _sub_mask(kwargs.get("attention_mask"), index, valid, mask_kind, hidden.dtype)}
    out = inner(sub, **kwargs)
    if not isinstance(out, torch.Tensor):
        raise TokentuneError(f"lemo expects decoder layers that return a tensor, got {type(out).__name__}",
                             fix="use a transformers version whose Llama-family layers return the hidden states")
    live = valid.reshape(-1)
    return rows.index_copy(0, flat[live], out.reshape(b * k, hdim)[live].to(hidden.dtype)).view(b, t, hdim)


class LayerPatch:
    """Replaces one layer's forward (as an instance attribute, so parameter names stay unchanged) by
    `state.layer_forward`; `remove()` restores the class forward. Parameter names, state dicts and the
    adapter's view of the model are untouched."""

    def __init__(self, layer, index: int, state):
        self.layer, self.index, self.state = layer, index, state
        self.inner = layer.forward
        layer.forward = self

    def __call__(self, *args, **kwargs):
        if len(args) > 1:
            raise TokentuneError("lemo expects decoder layers called with keyword arguments after the hidden states")
        hidden = args[0] if args else kwargs.pop("hidden_states")
        return self.state.layer_forward(self, hidden, kwargs)

    def remove(self) -> None:
        if self.layer.__dict__.get("forward") is self:
            del self.layer.forward
