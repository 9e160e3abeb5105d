"""Data order: a pure function of (seed, epoch), so a resumed run sees exactly the batches it would
have seen, and N ranks together see what one process with an N-times batch sees."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Schedule:
    num_rows: int
    batch_size: int  # rows per rank per micro-batch
    grad_accum: int
    world_size: int

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.num_rows / self.rows_per_step))

    def total_steps(self, max_steps: int | None, epochs: float | None) -> int:
        if max_steps is not None:
            return max_steps
        return max(1, math.ceil((epochs or 1.0) * self.steps_per_epoch))

    def order(self, seed: int, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        return torch.randperm(self.num_rows, generator=g).tolist()

    def micro_batches(self, seed: int, epoch: int, step_in_epoch: int, rank: int) -> list[list[int]]:
        """Row indices of this rank's micro-batches for one optimiser step (a list may be empty at the
        end of an epoch; the trainer then runs a zero-weight row so every rank joins the reduction)."""
        order = self.order(seed, epoch)
        start = step_in_epoch * self.rows_per_step
        step_rows = order[start:start + self.rows_per_step]
        out = []
        per_micro = self.batch_size * self.world_size
        for m in range(self.grad_accum):
            micro = step_rows[m * per_micro:(m + 1) * per_micro]
            out.append(micro[rank * self.batch_size:(rank + 1) * self.batch_size])
        return out
