"""Reference ("history") weights for selectors: the trainable parameters at their initial values
(= the base model for LoRA and prompt methods, whose updates start at zero) or an EMA of them.

The reference shares the frozen weights with the model; only the trainable tensors are stored again, and
a forward under the reference swaps them in and back. No second model in memory."""

from __future__ import annotations

from contextlib import contextmanager

import torch


class HistoryWeights:
    def __init__(self, params: list[torch.nn.Parameter], mode: str = "base", alpha: float = 0.99):
        if mode not in ("base", "ema"):
            raise ValueError(mode)
        self.params = params
        self.mode, self.alpha = mode, alpha
        self.values = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        """After an optimiser step: EMA moves toward the current weights; base stays put."""
        if self.mode == "ema":
            for value, p in zip(self.values, self.params):
                value.mul_(self.alpha).add_(p.detach(), alpha=1 - self.alpha)

    @contextmanager
    def swapped_in(self):
        current = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, value in zip(self.params, self.values):
                p.copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.params, current):
                    p.copy_(value)
