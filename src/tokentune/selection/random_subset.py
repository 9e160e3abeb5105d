"""Random selection at a budget: the baseline every selector is compared against (the Q-Tuning paper's
"Random-Random"). Keeps a random `sample_ratio` of each micro-batch's samples and, within them, a random
`token_ratio` of the response tokens."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..registry import register


class RandomSubsetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["random_subset"] = "random_subset"
    sample_ratio: float = Field(1.0, gt=0, le=1)
    token_ratio: float = Field(1.0, gt=0, le=1)


def sample_spans(batch: dict) -> list[tuple[int, torch.Tensor]]:
    """(row, positions of its loss tokens) for every sample of the batch, packed rows included."""
    live = (batch["labels"] != -100) & (batch["loss_weights"] > 0)
    live[:, 0] = False
    spans = []
    for row in range(live.shape[0]):
        index = batch["sample_index"][row]
        for sample in index[live[row]].unique().tolist():
            spans.append((row, ((index == sample) & live[row]).nonzero(as_tuple=True)[0]))
    return spans


@register("selector", "random_subset", config=RandomSubsetConfig,
          description="Baseline: a random share of samples and of their response tokens")
class RandomSubset:
    name = "random_subset"
    needs: set[str] = set()

    def __init__(self, config: RandomSubsetConfig):
        self.config = config

    def select(self, batch: dict, signals) -> dict:
        spans = sample_spans(batch)
        if not spans:
            return batch
        weights = batch["loss_weights"].clone()
        keep_n = max(1, round(self.config.sample_ratio * len(spans)))
        order = torch.randperm(len(spans)).tolist()
        for rank, i in enumerate(order):
            row, positions = spans[i]
            if rank >= keep_n:
                weights[row, positions] = 0
            elif self.config.token_ratio < 1:
                k = max(1, math.ceil(self.config.token_ratio * len(positions)))
                drop = positions[torch.randperm(len(positions))[k:]]
                weights[row, drop] = 0
        return {**batch, "loss_weights": weights}
