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


META = "tokentune_adapter.json"  # which adapter wrote a directory, with its config and the base it belongs to


def write_meta(out_dir: Path, adapter: str, base_ref: str, config, **extra) -> None:
    import json

    meta = {"adapter": adapter, "base_model_name_or_path": base_ref, "config": config.model_dump(mode="json"), **extra}
    (Path(out_dir) / META).write_text(json.dumps(meta, indent=2) + "\n")


def check_meta(in_dir: Path, adapter: str, config, shaping, *, required: bool) -> dict | None:
    """Refuse a directory written by another adapter, or with other values of the keys that shape the tensors
    (`shaping`); the error says which adapter.KEY=VALUE overrides would match it. Returns the metadata."""
    import json

    path = Path(in_dir) / META
    if not path.is_file():
        if required:
            raise TokentuneError(f"{META} not found in {in_dir}", where=str(in_dir),
                                 fix=f"point at the directory that the {adapter} adapter's save() wrote (a run's final/)")
        return None
    meta = json.loads(path.read_text())
    if meta.get("adapter") != adapter:
        raise TokentuneError(f"{in_dir} was written by the {meta.get('adapter')!r} adapter, not {adapter!r}",
                             where=str(path), fix=f"attach the adapter named in {META}")
    theirs, ours = meta.get("config", {}), config.model_dump(mode="json")
    differ = {k: theirs[k] for k in shaping if k in theirs and theirs[k] != ours.get(k)}
    if differ:
        raise TokentuneError(f"the adapter was trained with {differ}, this one is configured with "
                             f"{ {k: ours.get(k) for k in differ} }", where=str(path),
                             fix="set " + " ".join(f"adapter.{k}={v}" for k, v in differ.items()))
    return meta
