"""Checkpoints: trainable state, optimiser, scheduler, RNG states and data position, written atomically.

A directory `checkpoints/step-N/` exists only once it is complete (it is renamed into place), so a run
killed at any moment resumes from its last complete checkpoint.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import TokentuneError
from .atomic import atomic_dir

_STEP = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, *, adapter_state: dict, optimizer, scheduler, trainer_state: dict,
                    rank_rng: dict, keep: int) -> Path:
    final = Path(run_dir) / "checkpoints" / f"step-{step}"
    with atomic_dir(final) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in adapter_state.items()}, tmp / "adapter_state.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rank_rng, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and
             (p / "trainer_state.json").exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, map_location) -> dict:
    try:
        return {
            "adapter_state": load_file(str(path / "adapter_state.safetensors"), device=str(map_location)),
            "optimizer": torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True),
            "scheduler": torch.load(path / "scheduler.pt", weights_only=True),
            "rng": torch.load(path / "rng.pt", weights_only=False),  # our own file: python/numpy RNG tuples
            "trainer_state": json.loads((path / "trainer_state.json").read_text()),
        }
    except (OSError, RuntimeError, ValueError) as exc:
        raise TokentuneError(f"checkpoint {path} is unreadable: {exc}",
                             fix="delete that step directory to resume from the one before") from None
