"""Trainable state in and out: the checks every adapter needs when it saves or restores tensors."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import TokentuneError


def tensor_state(params: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Detached, contiguous tensors by name (safetensors refuses views and shared storage)."""
    return {name: p.detach().contiguous() for name, p in params}


def copy_state(params: list[tuple[str, nn.Parameter]], state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `params` in place; the names and shapes must match exactly."""
    own = dict(params)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise TokentuneError(
            f"saved state does not match the attached adapter: {len(missing)} missing, {len(unexpected)} unexpected"
            + (f"; missing e.g. {missing[:3]}" if missing else "")
            + (f"; unexpected e.g. {unexpected[:3]}" if unexpected else ""),
            where=source,
            fix="attach the adapter with the same config (and the same base model) that produced this state",
        )
    with torch.no_grad():
        for name, p in own.items():
            value = state[name]
            if value.shape != p.shape:
                raise TokentuneError(
                    f"{name}: saved shape {tuple(value.shape)} but the attached parameter has {tuple(p.shape)}",
                    where=source, fix="attach the adapter with the same config and base model as the saved run",
                )
            p.copy_(value.to(device=p.device, dtype=p.dtype))


def write_tensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    # metadata format=pt: transformers and PEFT expect it on the files they read.
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise TokentuneError(f"{Path(path).name} not found in {Path(path).parent}", where=str(path),
                             fix="point at the directory that the adapter's save() wrote (a run's final/ directory)")
    return load_file(str(path))


def require_attached(adapter) -> None:
    if not getattr(adapter, "_attached", False):
        raise TokentuneError(f"adapter {adapter.name!r} is not attached to a model",
                             fix="call attach(model, ModelView(model)) first")
