"""Masked Thought (Chen et al., ACL 2024): corrupt a random share of the response's *input* tokens while
the labels stay the original ids, so each next token must be predicted from a partly masked history.

Each response position is masked independently with probability p(step) (so a sample's count is
Binomial(|response|, p) and, given the count, the positions are uniform without replacement), re-drawn
every step from torch's global RNG, which the trainer re-seeds per step (deterministic and resume-safe).
See docs/selectors/masked_thought.md."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import TokentuneError
from ..registry import register


class MaskedThoughtConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["masked_thought"] = "masked_thought"
    rate: float = Field(0.4, ge=0, le=1, description="p_max: share of response input tokens replaced")
    warmup: bool = Field(True, description="p(step) = min(p_max, p_max·step / (warmup_fraction·total_steps + 1))")
    warmup_fraction: float = Field(0.66, gt=0, le=1, description="share of training over which p rises to p_max")
    replacement: Literal["mask_token", "pad", "random"] = Field(
        "pad", description="pad: the tokenizer's pad id; mask_token: `mask_token_id`; random: a uniform vocabulary id")
    mask_token_id: int | None = Field(None, ge=0, description="an existing token id, for replacement: mask_token")
    random_rate: float = Field(0.0, ge=0, le=1, description="share of masked positions given a random id instead")
    mask_prompt: bool = Field(False, description="also mask prompt tokens (the paper never does)")

    @model_validator(mode="after")
    def _consistent(self):
        if self.replacement == "mask_token" and self.mask_token_id is None:
            raise ValueError("replacement 'mask_token' needs mask_token_id: an existing special token of the tokenizer "
                             "(a new <mask> token would need an embedding resize, which tokentune does not do)")
        if self.replacement != "mask_token" and self.mask_token_id is not None:
            raise ValueError(f"mask_token_id is only used with replacement 'mask_token' (got '{self.replacement}')")
        if self.replacement == "random" and self.random_rate > 0:
            raise ValueError("random_rate mixes random ids into 'pad' or 'mask_token' replacement; "
                             "'random' already replaces every masked position with a random id")
        return self


def mask_rate(cfg: MaskedThoughtConfig, step: int, total_steps: int) -> float:
    """The official code's schedule: linear warm-up over the first warmup_fraction of training, then flat."""
    if not cfg.warmup:
        return cfg.rate
    return min(cfg.rate, cfg.rate * step / (cfg.warmup_fraction * total_steps + 1))


@register("selector", "masked_thought", config=MaskedThoughtConfig,
          description="Masked Thought: replace random response input tokens, keep the original labels")
class MaskedThought:
    name = "masked_thought"
    needs: set[str] = set()

    def __init__(self, config: MaskedThoughtConfig):
        self.config = config
        self.replace_id: int | None = None
        self.vocab_size: int | None = None

    def attach(self, session) -> None:
        """Resolves the replacement id and the vocabulary random ids are drawn from."""
        c = self.config
        rows = session.view.embed_tokens.num_embeddings
        # Embedding rows past the tokenizer's vocabulary (padding to a multiple) are never real tokens.
        self.vocab_size = min(len(session.tokenizer), rows)
        if c.replacement == "pad":
            self.replace_id = session.tokenizer.pad_token_id
            if self.replace_id is None:
                raise TokentuneError("masked_thought replacement 'pad' needs a tokenizer pad token",
                                     where="selectors.masked_thought.replacement",
                                     fix="use replacement: random, or mask_token with mask_token_id")
        elif c.replacement == "mask_token":
            if c.mask_token_id >= rows:
                raise TokentuneError(f"mask_token_id {c.mask_token_id} is outside the model's {rows} embeddings",
                                     where="selectors.masked_thought.mask_token_id",
                                     fix="name an existing token id of the tokenizer (e.g. an unused special token)")
            self.replace_id = c.mask_token_id

    def select(self, batch: dict, signals) -> dict:
        c = self.config
        p = mask_rate(c, signals.step, signals.total_steps)
        signals.report("select/masked_thought_p", p)
        ids = batch["input_ids"]
        candidates = (batch["sample_index"] >= 0) if c.mask_prompt else (batch["labels"] != -100)
        n_candidates = int(candidates.sum())
        if p == 0 or n_candidates == 0:  # nothing drawn: the RNG stream (dropout after us) stays untouched
            signals.report("select/masked_thought_rate", 0.0)
            return batch
        if self.vocab_size is None:
            raise RuntimeError("MaskedThought.attach(session) must run before select()")
        masked = candidates & (torch.rand(ids.shape, device=ids.device) < p)
        if c.replacement == "random":
            fresh = torch.randint(0, self.vocab_size, ids.shape, device=ids.device)
        else:
            fresh = torch.full_like(ids, self.replace_id)
            if c.random_rate > 0:
                use_random = torch.rand(ids.shape, device=ids.device) < c.random_rate
                fresh = torch.where(use_random, torch.randint(0, self.vocab_size, ids.shape, device=ids.device), fresh)
        signals.report("select/masked_thought_rate", float(masked.sum()) / n_candidates)
        return {**batch, "input_ids": torch.where(masked, fresh, ids)}
