"""The adapter protocol. Nothing here assumes LoRA: prompt, prefix and sparse methods fit too."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class ParamGroup:
    """Trainable parameters that share optimiser settings. `lr_scale` multiplies the run's lr
    (or `lr` sets it outright), so DePT's two learning rates or LLRD are just several groups."""

    name: str
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    lr: float | None = None
    lr_scale: float = 1.0
    weight_decay: float | None = None


@runtime_checkable
class Adapter(Protocol):
    """One adapter method attached to one model.

    attach(model, view)   change the model in place (wrap modules, freeze the base, add parameters)
    param_groups()        the trainable parameters, grouped; everything else has requires_grad False
    state_dict()          the trainable state (names are stable across processes), for checkpoints
    load_state_dict(sd)   restore it
    save(dir, base_ref)   write the final artefact (LoRA: PEFT format) into `dir`
    load(dir)             read what save() wrote back into the attached adapter
    merge()               fold the adapter into the base weights in place (TokentuneError if undefined)
    """

    name: str

    def attach(self, model: nn.Module, view) -> None: ...

    def param_groups(self) -> list[ParamGroup]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def save(self, out_dir: Path, base_ref: str) -> None: ...

    def load(self, in_dir: Path) -> None: ...

    def merge(self) -> None: ...


@contextlib.contextmanager
def batch_scope(adapter, batch: dict):
    """Lets an adapter see the batch around the objective's forward (optional `before_batch(batch)` /
    `after_batch()`): input-dependent prompts (IAPT) need to know which tokens are the instruction."""
    before, after = getattr(adapter, "before_batch", None), getattr(adapter, "after_batch", None)
    if before is not None:
        before(batch)
    try:
        yield
    finally:
        if after is not None:
            after()


def reference_mode(adapter):
    """A context in which the model computes as its frozen base: the adapter's optional `disabled()`.
    DPO-style losses use it for the reference model instead of a second copy of the weights."""
    fn = getattr(adapter, "disabled", None)
    if fn is None:
        from ..errors import TokentuneError

        raise TokentuneError(f"adapter {adapter.name!r} cannot be switched off to act as the reference model",
                             where="adapter", fix="use an adapter that can (lora, prompt_tuning, prefix_tuning, ...)"
                             " or an objective option that keeps a separate reference copy")
    return fn()


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
