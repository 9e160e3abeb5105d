"""ssToken (Qin et al., ICLR 2026): per sample, keep the loss on the top ρ of its response tokens by

    Score = γ · MinMax(REL) + (1 − γ) · Attn

REL (retrospective excess loss) = log p_current − log p_history of the token; Attn = the attention the
token puts on its sample's prompt at one layer (mean over heads; already in [0, 1]). No separately
trained reference model: the history model is the initial trainable weights (the base model for LoRA,
as in the released code) or their EMA. All tokens still go through the forward pass."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import TokentuneError
from ..registry import register
from .random_subset import sample_spans

# REL ranges narrower than this (nats) are numerical noise, not a ranking: min-max would blow them up.
_FLAT = 1e-6
_EMA_ALPHA = 0.99


class SSTokenConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["sstoken"] = "sstoken"
    ratio: float = Field(0.6, gt=0, le=1, description="share ρ of each sample's response tokens that keep their loss")
    gamma: float = Field(0.5, ge=0, le=1, description="weight of min-max REL; 1 − gamma weighs the attention score")
    attention_layer: int = Field(-1, description="decoder layer whose attention scores the prompt (-1 = last)")
    history: Literal["base", "ema"] = Field("base", description="history model: initial weights, or their EMA")
    ema_alpha: float | None = Field(None, gt=0, lt=1, description=f"EMA decay per optimiser step ({_EMA_ALPHA}); ema only")
    warmup_steps: int = Field(0, ge=0, description="first optimiser steps scored by attention only (gamma = 0)")

    @model_validator(mode="after")
    def _alpha_needs_ema(self):
        if self.ema_alpha is not None and self.history != "ema":
            raise ValueError("ema_alpha applies only to history: ema (set history: ema, or remove ema_alpha)")
        return self


def keep_count(ratio: float, n: int) -> int:
    """ceil(ratio · n), immune to float noise (0.55 · 100 = 55.00000000000001 must keep 55, not 56)."""
    return math.ceil(round(ratio * n, 9))


def min_max(x: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1]; a flat input (all equal within _FLAT) maps to all zeros, as the released code's
    `/(max − min + 1e-8)` gives for exact ties."""
    lo, hi = x.min(), x.max()
    if float(hi - lo) <= _FLAT:
        return torch.zeros_like(x)
    return (x - lo) / (hi - lo)


def prompt_keys(batch: dict) -> torch.Tensor:
    """Keys that count as prompt: real tokens without a label. Attention mass is taken within each query's
    own packed segment and causally, so this is the prompt of the query's own sample, before it."""
    return (batch["labels"] == -100) & (batch["attention_mask"] > 0)


@register("selector", "sstoken", config=SSTokenConfig,
          description="ssToken: per sample, the top-ρ response tokens by retrospective excess loss and prompt attention")
class SSToken:
    name = "sstoken"

    def __init__(self, config: SSTokenConfig):
        self.config = config
        self.layer = config.attention_layer
        # Only the passes the fused score can use: gamma 0 never reads REL, gamma 1 never reads attention.
        self.needs: set[str] = {"current"}
        if config.gamma > 0:
            self.needs.add("history")
        if config.gamma < 1 or config.warmup_steps > 0:
            self.needs.add(f"attention:{self.layer}")
        self.history_mode = (config.history, config.ema_alpha or _EMA_ALPHA)

    def attach(self, session) -> None:
        if not session.view.is_causal:
            raise TokentuneError("sstoken scores next-token response tokens and needs a causal language model",
                                 where="selectors", fix="remove sstoken for encoder / classification models")
        n = session.view.num_layers
        if not -n <= self.layer < n:
            raise TokentuneError(f"attention_layer {self.layer} does not exist: the model has {n} layers",
                                 where="selectors.sstoken.attention_layer", fix=f"use a layer in [{-n}, {n - 1}]")

    def gamma_at(self, step: int) -> float:
        return 0.0 if step < self.config.warmup_steps else self.config.gamma

    def scores(self, batch: dict, signals, gamma: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(REL [B, T], Attn [B, T]) aligned with labels; each None when gamma gives it no weight."""
        rel = attn = None
        if gamma > 0:
            rel = signals.current().logprob - signals.history().logprob
        if gamma < 1:
            # Row t of the attention matrix is the query of token t itself (the released code's alignment).
            attn = signals.attention_mass(self.layer, prompt_keys(batch))
        return rel, attn

    def select(self, batch: dict, signals) -> dict:
        spans = sample_spans(batch)
        if not spans:
            return batch
        gamma = self.gamma_at(signals.step)
        rel, attn = self.scores(batch, signals, gamma)
        weights = batch["loss_weights"].clone()
        for row, pos in spans:
            score = torch.zeros(len(pos), dtype=torch.float32, device=pos.device)
            if rel is not None:
                score += gamma * min_max(rel[row, pos].float())
            if attn is not None:
                score += (1 - gamma) * attn[row, pos].float()
            # Stable sort: equal scores keep the earlier token first, so ties are deterministic.
            order = torch.sort(score, descending=True, stable=True).indices
            weights[row, pos[order[keep_count(self.config.ratio, len(pos)):]]] = 0
        if rel is not None:
            signals.report("select/sstoken_rel_mean", _mean_over(rel, spans))
        if attn is not None:
            signals.report("select/sstoken_attn_mean", _mean_over(attn, spans))
        return {**batch, "loss_weights": weights}


def _mean_over(values: torch.Tensor, spans) -> float:
    return float(torch.cat([values[row, pos].float() for row, pos in spans]).mean())
