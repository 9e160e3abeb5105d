"""What the preference objectives (dpo, cdpo) share: the pair layout of a batch, per-token log-probabilities of
the label tokens through the chunked LM head, the frozen reference, the pairwise losses and the reward metrics.

A preference batch (data/preference.py) holds chosen and rejected rows with `is_chosen` and `pair_index`. A pair
counts when both its rows are in the batch and carry loss (a selector may have dropped one): the normaliser is
the number of such pairs, so accumulating micro-batches equals one bigger batch of pairs.

Sequence log-probabilities are sums of per-token log-probabilities of the label tokens, weighted by the batch's
`loss_weights` (1 on every label token unless a selector changed them; a weight of 0 drops the token). Only the
label token's log-probability is needed: it is minus the chunked cross-entropy, so [B, T, V] never exists.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, model_validator

from ..errors import TokentuneError
from .base import ObjectiveOutput, backbone_hidden
from .chunked import chunked_cross_entropy


class PreferenceOptions(BaseModel):
    """beta             β: strength of the implicit KL penalty (DPO's temperature on the log-ratio margin)
    loss_type        sigmoid: −log σ(β·h) (DPO); ipo: (h − 1/(2β))² (IPO, Azar et al. 2023)
    label_smoothing  ε of conservative DPO (Mitchell 2023): the preference label is wrong with probability ε,
                     loss −(1−ε)·log σ(β·h) − ε·log σ(−β·h). Not the critical-token cDPO (objective cdpo)
    reference        adapter: the frozen base is the model with the adapter switched off (no second copy; lora,
                     prompt and prefix methods); copy: a second, frozen copy of model.name (full fine-tuning)"""

    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="conservative DPO's ε (sigmoid loss only)")
    reference: Literal["adapter", "copy"] = "adapter"

    @model_validator(mode="after")
    def _smoothing_needs_sigmoid(self):
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError("label_smoothing (conservative DPO) applies to loss_type: sigmoid only")
        return self


def pair_rows(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rows [P], rejected rows [P]) of the pairs whose two rows are both present and carry loss."""
    if "is_chosen" not in batch:
        raise TokentuneError("a preference objective needs preference data (prompt, chosen, rejected records)",
                             where="data.format", fix="give records with prompt, chosen and rejected fields")
    live = ((batch["labels"][:, 1:] != -100) & (batch["loss_weights"][:, 1:] != 0)).any(1)
    is_chosen, pair = batch["is_chosen"].bool(), batch["pair_index"]
    rows = torch.arange(pair.shape[0], device=pair.device)
    n = int(pair.max()) + 1 if pair.numel() else 0
    chosen = torch.full((n,), -1, dtype=torch.long, device=pair.device)
    rejected = chosen.clone()
    chosen[pair[is_chosen & live]] = rows[is_chosen & live]
    rejected[pair[~is_chosen & live]] = rows[~is_chosen & live]
    ok = (chosen >= 0) & (rejected >= 0)
    return chosen[ok], rejected[ok]


def label_tokens(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows [N], cols [N], targets [N]) of every label token: the hidden state at (row, col) predicts
    labels[row, col + 1] (labels are unshifted)."""
    labels = batch["labels"][:, 1:]
    rows, cols = (labels != -100).nonzero(as_tuple=True)
    return rows, cols, labels[rows, cols]


def token_logps(view, batch: dict, rows, cols, targets, chunk_size: int) -> torch.Tensor:
    """log p(label token) [N] under `view`'s model; differentiable when grad is enabled."""
    hidden = backbone_hidden(view, batch)
    return -chunked_cross_entropy(hidden[rows, cols], view.lm_head, targets, chunk_size)


class Reference:
    """The frozen reference model π_ref. Its forward runs without gradients and in eval mode (no dropout,
    like TRL's disable_dropout), whatever mode the policy is in."""

    def __init__(self, adapter=None, model=None, view=None):
        if (adapter is None) == (model is None):
            raise ValueError("give the adapter to switch off, or a frozen model with its view")
        self.adapter, self.model, self.view = adapter, model, view

    @torch.no_grad()
    def logps(self, model, view, batch: dict, rows, cols, targets, chunk_size: int) -> torch.Tensor:
        from ..adapters.base import reference_mode

        if self.model is not None:
            model, view, scope = self.model, self.view, contextlib.nullcontext()
        else:
            scope = reference_mode(self.adapter)
        was_training = model.training
        model.eval()
        try:
            with scope:
                return token_logps(view, batch, rows, cols, targets, chunk_size)
        finally:
            model.train(was_training)


def bind_reference(options: PreferenceOptions, session, objective: str) -> Reference:
    """The reference for a run: the session's adapter switched off, or a frozen copy of model.name."""
    if session.cfg.model.task != "causal" or not session.view.is_causal:
        raise TokentuneError(f"{objective} compares sequence likelihoods of a causal language model",
                             where="objective.name", fix="use it with model.task: causal and a decoder model")
    if options.reference == "adapter":
        if getattr(session.adapter, "disabled", None) is None:
            raise TokentuneError(
                f"adapter {session.adapter.name!r} cannot be switched off to serve as {objective}'s reference model",
                where="objective.reference",
                fix="set objective.reference: copy (a frozen second copy of model.name in memory), or train an "
                    "adapter that can be switched off (lora, prompt_tuning, prefix_tuning, ...)")
        return Reference(adapter=session.adapter)
    from ..models.loading import load_model

    device = session.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        loaded = load_model(session.cfg.model, device=device)  # the RNG of the run is left as it was
    loaded.model.requires_grad_(False)
    return Reference(model=loaded.model.eval(), view=loaded.view)


def pair_losses(h: torch.Tensor, options: PreferenceOptions) -> torch.Tensor:
    """Per-pair (or per-position) losses of the margin h = log-ratio(chosen) − log-ratio(rejected)."""
    beta = options.beta
    if options.loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    eps = options.label_smoothing
    loss = -F.logsigmoid(beta * h)
    return (1 - eps) * loss - eps * F.logsigmoid(-beta * h) if eps else loss


class PreferenceObjective:
    """The DPO computation; subclasses choose the per-token weights (`token_weights`) and may replace the
    pairwise loss (`losses`). `bind(session)` (called by build_session) sets the reference."""

    name = "preference"
    preference = True  # build_session: preference data needs an objective that says so
    perplexity = False  # evaluation: a sequence-level loss, no perplexity

    def __init__(self, config):
        self.config = config
        self.reference: Reference | None = None

    def bind(self, session) -> None:
        self.check_selectors(session)
        self.reference = bind_reference(self.config, session, self.name)

    def check_selectors(self, session) -> None:
        """Refuse selectors whose weights would make the loss something other than this objective."""

    def weight_total(self, batch: dict) -> torch.Tensor:
        return torch.tensor(float(pair_rows(batch)[0].numel()), device=batch["labels"].device)

    def token_weights(self, batch: dict, rows, cols) -> torch.Tensor:
        """Weight of each label token's log-ratio [N]: the batch's loss_weights."""
        return batch["loss_weights"][:, 1:][rows, cols].float()

    def losses(self, ratios, rows, n_rows: int, chosen, rejected) -> torch.Tensor:
        """Per-pair losses [P] from the weighted per-token log-ratios [N] (sequence level)."""
        seq = sequence_sums(ratios, rows, n_rows)
        return pair_losses(seq[chosen] - seq[rejected], self.config)

    def __call__(self, model, view, batch: dict, *, chunk_size: int = 1024) -> ObjectiveOutput:
        if self.reference is None:
            raise TokentuneError(f"the {self.name} objective has no reference model: it is bound to a run by "
                                 "build_session (objective.bind(session))")
        chosen, rejected = pair_rows(batch)
        rows, cols, targets = label_tokens(batch)
        ref = self.reference.logps(model, view, batch, rows, cols, targets, chunk_size)
        policy = token_logps(view, batch, rows, cols, targets, chunk_size)
        ratios = (policy - ref) * self.token_weights(batch, rows, cols)
        n_rows = batch["labels"].shape[0]
        losses = self.losses(ratios, rows, n_rows, chosen, rejected)
        # 0 · Σ log p keeps the graph whole when no pair is complete (every rank joins the reduction)
        loss_sum = losses.sum() + 0 * policy.sum()
        seq = sequence_sums(ratios.detach(), rows, n_rows)
        pairs = torch.tensor(float(chosen.numel()), device=loss_sum.device)
        return ObjectiveOutput(loss_sum=loss_sum, weight_sum=pairs,
                               metrics=reward_counts(self.config.beta * seq[chosen], self.config.beta * seq[rejected]))

    def eval_metrics(self, sums: dict) -> dict:
        return summarise_rewards(sums, "eval/reward_")

    def train_metrics(self, sums: dict) -> dict:
        return summarise_rewards(sums, f"{self.name}/reward_")


def sequence_sums(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)


def reward_counts(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Sums over the pairs (summed again over batches): implicit rewards β·Σ w·(log π − log π_ref)."""
    return {"pairs": float(chosen.numel()), "reward_correct": float((chosen > rejected).sum()),
            "reward_margin": float((chosen - rejected).sum()), "reward_chosen": float(chosen.sum()),
            "reward_rejected": float(rejected.sum())}


def summarise_rewards(sums: dict, prefix: str) -> dict:
    pairs = float(sums.get("pairs", 0.0))
    if pairs == 0:
        return {}
    return {prefix + "accuracy": float(sums["reward_correct"]) / pairs,
            prefix + "margin": float(sums["reward_margin"]) / pairs,
            prefix + "chosen": float(sums["reward_chosen"]) / pairs,
            prefix + "rejected": float(sums["reward_rejected"]) / pairs}
