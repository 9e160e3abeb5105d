"""Cross-entropy through the LM head in chunks, only at positions that carry loss.

The logits of the whole batch are never materialised: the forward keeps one chunk of logits at a
time. When the head is frozen (LoRA, prompt methods) the gradient for the hidden states is computed
in the same pass and stored ([N, H], small); when the head trains, the backward recomputes each
chunk's logits instead of keeping them.
"""

from __future__ import annotations

import torch


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = h @ weight.t()
    if bias is not None:
        out = out + bias
    return out.float()


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        n = hidden.shape[0]
        losses = hidden.new_empty(n, dtype=torch.float32)
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        grad_h = torch.empty_like(hidden) if need_h and not need_w else None
        for s in range(0, n, chunk_size):
            h = hidden[s:s + chunk_size]
            t = targets[s:s + chunk_size]
            logits = _logits(h, weight, bias)
            lse = torch.logsumexp(logits, dim=-1)
            losses[s:s + chunk_size] = lse - logits.gather(1, t[:, None]).squeeze(1)
            if grad_h is not None:
                probs = torch.softmax(logits, dim=-1)
                probs[torch.arange(len(t), device=t.device), t] -= 1
                grad_h[s:s + chunk_size] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.chunk_size = chunk_size
        ctx.has_bias = bias is not None
        ctx.save_for_backward(hidden, weight, bias if bias is not None else hidden.new_empty(0), targets,
                              grad_h if grad_h is not None else hidden.new_empty(0))
        ctx.precomputed = grad_h is not None
        return losses

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, targets, grad_h_pre = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        if ctx.precomputed:
            return grad_h_pre * grad_loss[:, None].to(grad_h_pre.dtype), None, None, None, None
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b and bias is not None else None
        cs = ctx.chunk_size
        for s in range(0, hidden.shape[0], cs):
            h = hidden[s:s + cs]
            t = targets[s:s + cs]
            probs = torch.softmax(_logits(h, weight, bias), dim=-1)
            probs[torch.arange(len(t), device=t.device), t] -= 1
            probs *= grad_loss[s:s + cs, None]
            if grad_h is not None:
                grad_h[s:s + cs] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_w is not None:
                grad_w += probs.t() @ h.float()
            if grad_b is not None:
                grad_b += probs.sum(0)
        return (grad_h,
                grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None, None, None)


def chunked_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                          chunk_size: int = 1024) -> torch.Tensor:
    """Per-token cross-entropy [N] of `head(hidden)` against `targets`; hidden is [N, H]."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0 * hidden.sum()
    weight, bias = head.weight, getattr(head, "bias", None)
    if torch.is_autocast_enabled(hidden.device.type):
        # Match autocast's matmul precision (bf16 on GPU) while keeping the softmax in fp32.
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedCE.apply(hidden, weight, bias, targets, chunk_size)


def chunked_token_loss(loss_fn, hidden: torch.Tensor, *aligned: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Per-token losses [N] of any loss that needs full-vocabulary logits (KD, OTR, CAFT heads), one chunk of
    positions at a time: `loss_fn(hidden_chunk, *aligned_chunks) -> [n]` builds its logits inside, and each chunk
    is checkpointed, so the backward recomputes that chunk's logits instead of keeping [N, V] alive."""
    from torch.utils.checkpoint import checkpoint

    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0 * hidden.sum()
    out = []
    for s in range(0, hidden.shape[0], chunk_size):
        parts = [t[s:s + chunk_size] for t in (hidden, *aligned)]
        if torch.is_grad_enabled() and hidden.requires_grad:
            out.append(checkpoint(loss_fn, *parts, use_reentrant=False))
        else:
            out.append(loss_fn(*parts))
    return torch.cat(out)
