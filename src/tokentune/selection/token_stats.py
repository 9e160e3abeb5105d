"""Per-token log-probability of the label and full-vocabulary entropy, without gradients, through the
LM head in chunks at loss positions only (the logits of the batch are never materialised)."""

from __future__ import annotations

import torch

from ..objectives.base import backbone_hidden, shifted_targets


@torch.no_grad()
def token_stats(model, view, batch: dict, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprob [B, T], entropy [B, T]) aligned with `labels` (value at t scores labels[t] given < t);
    0 where labels are -100 (or the weight is 0)."""
    hidden = backbone_hidden(view, batch)
    pos, targets, _ = shifted_targets(batch)
    head = view.lm_head
    logp = torch.zeros(batch["labels"].shape, dtype=torch.float32, device=hidden.device)
    ent = torch.zeros_like(logp)
    h = hidden[pos[:, 0], pos[:, 1]]
    for s in range(0, h.shape[0], chunk_size):
        logits = head(h[s:s + chunk_size]).float()
        lsm = torch.log_softmax(logits, dim=-1)
        rows, cols = pos[s:s + chunk_size, 0], pos[s:s + chunk_size, 1] + 1
        logp[rows, cols] = lsm.gather(1, targets[s:s + chunk_size, None]).squeeze(1)
        ent[rows, cols] = -(lsm.exp() * lsm).sum(-1)
    return logp, ent
