"""Pseudo-labels: confidence from the black box's label scores, and the reliable set (v1's Stage 1, and every
re-labelling): admitted iff confidence >= threshold AND, when per_class_fraction is set, within the top fraction
(ceil) of the examples predicted as its class, ranked by confidence."""

from __future__ import annotations

import math

import torch


def confidence(scores: torch.Tensor, kind: str = "max_prob") -> tuple[torch.Tensor, torch.Tensor]:
    """([N] confidence, [N] predicted class) from [N, C] label scores: softmax over the classes, then the top
    probability (max_prob) or the top-1 minus top-2 probability (margin)."""
    probs = torch.softmax(scores.double(), -1)
    top = probs.topk(min(2, probs.shape[-1]), dim=-1)
    pred = top.indices[:, 0]
    if kind == "max_prob":
        return top.values[:, 0], pred
    if kind == "margin":
        return top.values[:, 0] - top.values[:, 1], pred
    raise ValueError(f"unknown confidence {kind!r}")


def select_reliable(conf: torch.Tensor, pred: torch.Tensor, *, threshold: float,
                    per_class_fraction: float | None) -> torch.Tensor:
    """[N] bool: the examples admitted to the reliable pseudo-labelled set."""
    keep = conf >= threshold
    if per_class_fraction is None:
        return keep
    ranked = torch.zeros_like(keep)
    for c in pred.unique().tolist():
        members = (pred == c).nonzero().flatten()
        n = math.ceil(per_class_fraction * members.numel())
        order = torch.sort(conf[members], descending=True, stable=True).indices
        ranked[members[order[:n]]] = True
    return keep & ranked


class PseudoLabels:
    """Per unlabelled text: its pseudo-label (class id), confidence, and whether it is in the seed set (Stage 1)
    and in the current reliable pool (the training queries and the demonstration pool)."""

    def __init__(self, n: int):
        self.label = torch.full((n,), -1, dtype=torch.long)
        self.conf = torch.zeros(n, dtype=torch.float64)
        self.seed = torch.zeros(n, dtype=torch.bool)
        self.reliable = torch.zeros(n, dtype=torch.bool)

    def pool(self) -> list[int]:
        return self.reliable.nonzero().flatten().tolist()

    def counts(self, num_classes: int) -> list[int]:
        return torch.bincount(self.label[self.reliable], minlength=num_classes).tolist()
