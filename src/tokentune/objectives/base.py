"""The objective protocol and the forward helpers every objective shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class ObjectiveOutput:
    loss_sum: torch.Tensor  # sum over loss positions of per-token loss x weight (scalar, differentiable)
    weight_sum: torch.Tensor  # sum of those weights in this micro-batch (scalar, no grad)
    token_losses: torch.Tensor | None = None  # [N] per-token losses (detached), for probes and selectors
    # summed over evaluation batches; tensors (per-label counts) are summed too, for the objective's eval_metrics()
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)


class Objective(Protocol):
    """Optional, duck-typed: `attach(model, view)` (after the adapter: load a teacher, add modules with
    soft_prompt.own_module), `param_groups()` (trained modules of its own, e.g. CAFT's heads: optimised with the
    adapter's groups), `state_dict()` / `load_state_dict(state)` (checkpointed under `objective::`),
    `save(dir)` / `load(dir)` (final/objective/ of a run), `on_step_start(trainer, step)` (before each optimiser
    step: schedules over the run, e.g. CAFT's head weights)."""

    name: str

    def weight_total(self, batch: dict) -> torch.Tensor:
        """This micro-batch's share of the normaliser (known before the forward pass)."""

    def __call__(self, model, view, batch: dict, *, chunk_size: int) -> ObjectiveOutput: ...


def shifted_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions [N, 2] as (row, t) of hidden states that predict, targets [N], weights [N]).

    Labels are unshifted (labels[t] is predicted from position t-1), so the hidden state at t-1
    carries the loss for labels[t]."""
    labels = batch["labels"][:, 1:]
    weights = batch["loss_weights"][:, 1:]
    mask = (labels != -100) & (weights != 0)
    rows, cols = mask.nonzero(as_tuple=True)
    return torch.stack([rows, cols], 1), labels[rows, cols], weights[rows, cols].float()


def token_weight_total(batch: dict) -> torch.Tensor:
    labels, weights = batch["labels"][:, 1:], batch["loss_weights"][:, 1:]
    return weights.float().masked_fill(labels == -100, 0).sum()


def backbone_hidden(view, batch: dict) -> torch.Tensor:
    """Final hidden states [B, T, H] of the transformer body (no LM head: the loss applies it in chunks).

    Causal models get position ids and no 2-D mask: transformers then builds a block-diagonal causal
    mask for packed rows (positions restart per record; right padding is its own segment)."""
    kwargs = dict(input_ids=batch["input_ids"], use_cache=False)
    if view.is_causal:
        kwargs["position_ids"] = batch["position_ids"]
    else:
        kwargs["attention_mask"] = batch["attention_mask"]
    out = view.backbone(**kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
