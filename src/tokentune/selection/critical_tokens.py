"""cDPO critical tokens (Lin et al. 2025): per-token weights from contrastive estimation between a positive
model (trained on correct solutions) and a negative one (trained on incorrect solutions).

Each label token y_t gets s_t = softmax((1+β)·z^p_t − β·z^n_t)[y_t] (critical_tokens_score.py). As weights:
rejected (negative) samples w⁻ = 1 − s_t, so tokens the negative model prefers weigh most; chosen samples
w⁺ = s_t with only_neg false, else 1 (the paper's default). The selector multiplies `loss_weights` on label
tokens by the weights of its mode and adds `critical_scores` (s_t, [B, T], 0 off labels) for objectives that
want the raw score. It runs its own two no-grad forwards (not the shared signals)."""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import TokentuneError
from ..registry import register
from .critical_tokens_models import check_same_vocab, load_contrast_pair
from .critical_tokens_score import critical_scores


class CriticalTokensConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["critical_tokens"] = "critical_tokens"
    positive: str = Field(description="run directory of the model trained on correct solutions (D+)")
    negative: str = Field(description="run directory of the model trained on incorrect solutions (D-)")
    beta: float = Field(1.0, ge=0, description="contrast strength: (1+beta)·z_pos − beta·z_neg")
    mode: Literal["rejected", "chosen"] = Field(
        "rejected", description="rejected: weights 1 − s; chosen: weights s (only_neg false) or 1")
    only_neg: bool | None = Field(None, description="mode chosen only; None = true (the paper's default)")
    share_base: bool = Field(True, description="one base + two adapter states when the runs share model and adapter")

    @model_validator(mode="after")
    def _only_neg_for_chosen(self):
        if self.mode == "rejected" and self.only_neg is not None:
            raise ValueError("only_neg applies to mode: chosen (rejected samples always get 1 − s); remove it")
        return self


def token_weights(scores: torch.Tensor, mode: str, only_neg: bool | None) -> torch.Tensor:
    """Weights from scores s in [0, 1]: rejected 1 − s; chosen s, or 1 when only_neg (None counts as true)."""
    if mode == "rejected":
        return 1 - scores
    return torch.ones_like(scores) if only_neg in (None, True) else scores


@register("selector", "critical_tokens", config=CriticalTokensConfig,
          description="cDPO: weight tokens by contrastive estimation between a positive and a negative run")
class CriticalTokens:
    name = "critical_tokens"
    needs: set[str] = set()

    def __init__(self, config: CriticalTokensConfig):
        self.config = config
        self.pair = None
        self.chunk_size = 1024

    def attach(self, session) -> None:
        if session.cfg.model.task != "causal":
            raise TokentuneError("critical_tokens scores next-token predictions; this run trains a classifier",
                                 where="selectors.critical_tokens", fix="use it with model.task: causal")
        c = self.config
        self.pair = load_contrast_pair(c.positive, c.negative, session.env, share_base=c.share_base)
        check_same_vocab(session.tokenizer, self.pair.tokenizer, where="selectors.critical_tokens.positive")
        self.chunk_size = session.cfg.train.loss_chunk_size

    def select(self, batch: dict, signals) -> dict:
        if self.pair is None:
            raise TokentuneError("the critical_tokens selector was used before attach(session) loaded its models")
        start = time.perf_counter()
        scores = critical_scores(self.pair, batch, self.config.beta, self.chunk_size)
        signals.report("signals/critical_tokens_seconds", time.perf_counter() - start)
        on_label = torch.zeros_like(batch["labels"], dtype=torch.bool)
        on_label[:, 1:] = batch["labels"][:, 1:] != -100
        weights = token_weights(scores, self.config.mode, self.config.only_neg)
        loss_weights = torch.where(on_label, batch["loss_weights"] * weights, batch["loss_weights"])
        if bool(on_label.any()):
            signals.report("select/critical_tokens_mean_score", float(scores[on_label].mean()))
            signals.report("select/critical_tokens_mean_weight", float(weights[on_label].mean()))
        return {**batch, "loss_weights": loss_weights, "critical_scores": scores}
