"""Bi-level training of IAPT's activation coefficients (first-order DARTS, as MiLoRA §3.4 / App. A describe):
the generator weights Ω learn from training batches, the rational coefficients Θ from batches of a held-out dev
split, alternating every optimiser step.

  prepare_data           a seeded slice of the training split becomes the dev split (the rest trains Ω)
  after_backward         Θ's gradients from the training batch are dropped (grad None: AdamW skips Θ); the lr
                         of this step is noted
  after_optimizer_step   one dev micro-batch: gradients of the dev loss w.r.t. Θ only (torch.autograd.grad, so Ω
                         gets none), summed over processes, clipped like the run's, then the run's own optimiser
                         steps again: Ω has no gradient and stays put, Θ moves with its own group's lr (1e-6 by
                         default, scheduled as this step's), and its AdamW state is checkpointed with the run's.

The dev batch of step s is a pure function of s (and the rank), so resuming replays the same Θ updates.
"""

from __future__ import annotations

import dataclasses
import random

import torch

from ..errors import TokentuneError
from .base import batch_scope

DEV_SEED = 0


def split_dev(splits, fraction: float):
    """(splits with the remaining training examples, the dev examples); both re-indexed densely."""
    train = list(splits.train)
    k = max(1, round(fraction * len(train)))
    if k >= len(train):
        raise TokentuneError(f"iapt's bi-level dev split ({fraction} of {len(train)} training examples) leaves no "
                             "training examples", where="adapter.dev_fraction",
                             fix="lower adapter.dev_fraction, add training data, or set adapter.bilevel: false")
    order = list(range(len(train)))
    random.Random(DEV_SEED).shuffle(order)
    held = set(order[:k])
    keep = [dataclasses.replace(ex, index=i) for i, ex in enumerate(e for j, e in enumerate(train) if j not in held)]
    dev = [dataclasses.replace(ex, index=i) for i, ex in enumerate(e for j, e in enumerate(train) if j in held)]
    return dataclasses.replace(splits, train=keep), dev


class DevSteps:
    """Runs the Θ update of each step on the dev split through the trainer's optimiser."""

    def __init__(self, dev_examples: list, theta: list[torch.nn.Parameter]):
        self.examples, self.theta = dev_examples, theta
        self.rows: list = []
        self._lrs: list[float] = []

    def start(self, trainer) -> None:
        from ..data.packing import pack

        s = trainer.s
        self.rows = pack(self.examples, s.cfg.data.max_length) if s.packing else list(self.examples)
        in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        if not all(id(p) in in_optimizer for p in self.theta):
            raise TokentuneError("iapt's activation coefficients are not in the run's optimiser",
                                 fix="train iapt through tokentune's Trainer (it builds the optimiser from "
                                     "param_groups())")

    def drop_train_gradients(self, trainer) -> None:
        """Called between backward and the optimiser step: Θ sits this step out, and the lr the schedule gives
        this step is noted for Θ's dev update (which runs after the scheduler has already moved on)."""
        for p in self.theta:
            p.grad = None
        self._lrs = [g["lr"] for g in self._groups(trainer)]

    def _groups(self, trainer) -> list[dict]:
        own = {id(p) for p in self.theta}
        return [g for g in trainer.optimizer.param_groups if any(id(p) in own for p in g["params"])]

    def rows_for(self, step: int, rank: int, world: int, size: int) -> list:
        """The dev rows of `step` on `rank`: consecutive windows that cycle through the dev split."""
        n = len(self.rows)
        start = ((step * world + rank) * size) % n
        return [self.rows[(start + i) % n] for i in range(min(size, n))]

    def step(self, trainer, adapter, step: int) -> None:
        s, env = trainer.s, trainer.env
        batch = s.to_batch(self.rows_for(step, env.rank, env.world_size, trainer.cfg.train.batch_size))
        with s.autocast(), batch_scope(adapter, batch):
            out = s.objective(s.model, s.view, batch, chunk_size=s.cfg.train.loss_chunk_size)
        weight = env.all_reduce_sum(torch.as_tensor(out.weight_sum, dtype=torch.float32).detach()).clamp_min(1e-12)
        grads = torch.autograd.grad(out.loss_sum / weight, self.theta, allow_unused=True)
        for p, g in zip(self.theta, grads):
            p.grad = env.all_reduce_sum(torch.zeros_like(p) if g is None else g.detach())
        if trainer.cfg.train.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.theta, trainer.cfg.train.max_grad_norm)
        groups = self._groups(trainer)
        later = [g["lr"] for g in groups]
        for g, lr in zip(groups, self._lrs):
            g["lr"] = lr
        trainer.optimizer.step()  # every other parameter has grad None here: only Θ moves
        for g, lr in zip(groups, later):
            g["lr"] = lr
        for p in self.theta:
            p.grad = None
