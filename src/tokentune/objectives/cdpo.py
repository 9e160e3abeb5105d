"""cDPO, token-weighted DPO with critical tokens (Lin et al., "Critical Tokens Matter", ICML 2025).

Per-token log-ratios r_t = log π(y_t) − log π_ref(y_t) on the reply tokens are weighted before they are summed:

    z = Σ_t w⁺_t r_t(chosen) − Σ_t w⁻_t r_t(rejected),     L = −log σ(β·z)      (form: sequence, the paper)

with w⁻_t = 1 − s_t and w⁺_t = 1 (only_neg, the default) or s_t, where s_t is the contrastive-estimation score
that the critical_tokens selector puts in the batch as `critical_scores`. Without that selector (and in
evaluation, where selectors do not run) every weight is 1 and the loss is DPO's exactly.

form: token is the released code's variant: z_t = w⁺_t r⁺_t − w⁻_t r⁻_t at aligned reply positions (the k-th
reply token of the chosen and of the rejected reply; a reply that has ended contributes 0), L = mean over the
pair's positions of −log σ(β·z_t).

The weights multiply the batch's loss_weights, so the selector must leave those alone: `mode: chosen` with
only_neg unset (weights 1, scores added) — checked when the objective is bound to a run.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import ConfigDict, model_validator

from ..engine.logging import console
from ..errors import TokentuneError
from ..registry import register
from ..selection.critical_tokens import token_weights
from .preference import PreferenceObjective, PreferenceOptions, pair_losses


class CDPOConfig(PreferenceOptions):
    __doc__ = PreferenceOptions.__doc__ + """
    only_neg         true: chosen tokens weigh 1 (the paper's default); false: chosen tokens weigh s_t
    form             sequence: weighted sums, then the DPO loss (the paper); token: the released code's
                     per-position loss, averaged over the pair's reply positions"""
    model_config = ConfigDict(extra="forbid")
    name: Literal["cdpo"] = "cdpo"
    only_neg: bool = True
    form: Literal["sequence", "token"] = "sequence"

    @model_validator(mode="after")
    def _token_form_is_sigmoid(self):
        if self.form == "token" and self.loss_type != "sigmoid":
            raise ValueError("form: token is the released code's per-position sigmoid loss; use loss_type: sigmoid")
        return self


_SELECTOR_FIX = ("configure the selector as {name: critical_tokens, positive: ..., negative: ..., mode: chosen} "
                 "(only_neg unset): it then only adds critical_scores, and cdpo weighs chosen (w+) and rejected "
                 "(w- = 1 - s) rows itself; set objective.only_neg for w+")


@register("objective", "cdpo", config=CDPOConfig,
          description="cDPO: DPO with per-token weights from critical-token scores (1 - s on rejected replies)")
class CDPO(PreferenceObjective):
    name = "cdpo"

    def check_selectors(self, session) -> None:
        critical = [s for s in session.selectors if s.name == "critical_tokens"]
        for s in critical:
            if s.config.mode != "chosen" or s.config.only_neg is False:
                raise TokentuneError("the critical_tokens selector would multiply the loss weights of every row "
                                     f"by its own weights (mode: {s.config.mode}, only_neg: {s.config.only_neg}), "
                                     "on top of cdpo's per-reply weights", where="selectors.critical_tokens",
                                     fix=_SELECTOR_FIX)
        if not critical and session.splits is not None and session.env.is_main:
            console.print("[yellow]cdpo: no critical_tokens selector, so every token weighs 1: this is plain DPO")

    def token_weights(self, batch: dict, rows, cols) -> torch.Tensor:
        base = super().token_weights(batch, rows, cols)
        scores = batch.get("critical_scores")
        if scores is None:
            return base
        s = scores[:, 1:][rows, cols].float()  # critical_scores[t] scores labels[t], predicted at t - 1
        chosen = batch["is_chosen"].bool()[rows]
        return base * torch.where(chosen, token_weights(s, "chosen", self.config.only_neg),
                                  token_weights(s, "rejected", None))

    def losses(self, ratios, rows, n_rows: int, chosen, rejected) -> torch.Tensor:
        if self.config.form == "sequence":
            return super().losses(ratios, rows, n_rows, chosen, rejected)
        return token_form_losses(ratios, rows, n_rows, chosen, rejected, self.config)


def token_form_losses(ratios, rows, n_rows: int, chosen, rejected, options) -> torch.Tensor:
    """Per-pair mean over aligned reply positions k < max(n_chosen, n_rejected) of the loss of
    z_k = ratio(chosen)_k − ratio(rejected)_k (a reply shorter than k contributes 0)."""
    counts = torch.bincount(rows, minlength=n_rows)
    if chosen.numel() == 0:
        return ratios.new_zeros(0)
    rank = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
    grid = ratios.new_zeros(n_rows, int(counts.max()))
    grid = grid.index_put((rows, rank), ratios)
    z = grid[chosen] - grid[rejected]
    n = torch.maximum(counts[chosen], counts[rejected])
    valid = torch.arange(z.shape[1], device=z.device)[None, :] < n[:, None]
    per = pair_losses(z, options).masked_fill(~valid, 0)
    return per.sum(1) / n.clamp_min(1)
