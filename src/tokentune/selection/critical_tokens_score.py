"""cDPO's contrastive estimation score of each label token,

    s_t = softmax_v((1 + β)·z^p_t − β·z^n_t)[y_t]

from the logits z^p (positive model) and z^n (negative model) at the position that predicts y_t. Small s_t:
the token is much likelier under the negative model, i.e. critical. Computed without gradients, through the
two LM heads in chunks at label positions only (the [B, T, V] logits are never materialised)."""

from __future__ import annotations

import torch

from ..objectives.base import backbone_hidden


def contrastive_scores(z_pos: torch.Tensor, z_neg: torch.Tensor, targets: torch.Tensor, beta: float) -> torch.Tensor:
    """[N] scores from logits [N, V] of the two models and target ids [N] (in fp32). Adding a constant to a
    row of either logits leaves the score unchanged, so log-probabilities may be passed instead."""
    z = (1 + beta) * z_pos.float() - beta * z_neg.float()
    return torch.log_softmax(z, dim=-1).gather(1, targets[:, None]).squeeze(1).exp()


@torch.no_grad()
def critical_scores(pair, batch: dict, beta: float, chunk_size: int = 1024) -> torch.Tensor:
    """[B, T] aligned with `labels`: the value at t scores labels[t] given the tokens before t (in its packed
    segment); 0 where labels[t] is -100. Every label token is scored, whatever its current loss weight."""
    labels = batch["labels"]
    rows, cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)
    targets = labels[:, 1:][rows, cols]
    scores = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    if rows.numel() == 0:
        return scores
    hidden = {}
    for which in ("positive", "negative"):
        with pair.side(which) as side, side.autocast():
            hidden[which] = backbone_hidden(side.view, batch)[rows, cols]
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=labels.device)
    for s in range(0, rows.shape[0], chunk_size):
        logits = {}
        for which in ("positive", "negative"):  # the head too may belong to the swapped state
            with pair.side(which) as side, side.autocast():
                logits[which] = side.view.lm_head(hidden[which][s:s + chunk_size]).float()
        out[s:s + chunk_size] = contrastive_scores(logits["positive"], logits["negative"],
                                                   targets[s:s + chunk_size], beta)
    scores[rows, cols + 1] = out.to(scores.device)
    return scores
