"""Freeze: train only the parameters chosen by name patterns, by block index, or by part (embeddings,
head, final norm); everything else keeps its pretrained value."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator
from torch import nn

from ..errors import TokentuneError
from ..models.anatomy import ADAPTER_PREFIX
from ..registry import register
from .base import ParamGroup
from .state_io import copy_state, read_tensors, require_attached, tensor_state, write_tensors

WEIGHTS, META = "trainable.safetensors", "tokentune_adapter.json"


class FreezeConfig(BaseModel):
    """Which parameters train.

    train                regexes searched (re.search) in parameter names, e.g. ["mlp", "norm$"]
    layers               blocks: "20-29", "0-3,10", or a list of indices where negatives count from the end
    include_embeddings   every embedding table trains (a tied LM head is that same tensor, so it trains too)
    include_head         None: a task head that transformers initialised fresh (classifier, score) trains and
                         the LM head stays frozen; true: every head trains (LM head included); false: none
    include_final_norm   the norm after the last block trains

    Inside blocks, `train` and `layers` combine as AND (`train: [mlp], layers: [-2, -1]` = the MLPs of the last
    two blocks); `layers` alone trains whole blocks. Outside blocks the patterns and include_* flags add up.
    """

    model_config = ConfigDict(extra="forbid")
    name: Literal["freeze"] = "freeze"
    train: list[str] = []
    layers: list[int] | str | None = None
    include_embeddings: bool = False
    include_head: bool | None = None
    include_final_norm: bool = False

    @field_validator("train")
    @classmethod
    def _patterns_compile(cls, train):
        for i, pattern in enumerate(train):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise TokentuneError(f"train pattern {pattern!r} is not a regex: {exc}", where=f"adapter.train[{i}]",
                                     fix="escape dots and brackets, e.g. 'mlp\\.down_proj'") from None
        return train

    @field_validator("layers")
    @classmethod
    def _layers_parse(cls, layers):
        if isinstance(layers, str):
            _parse_layer_string(layers)
        return layers


def _parse_layer_string(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise TokentuneError(f"layers {text!r} is not a list of ranges", where="adapter.layers",
                                 fix="write e.g. '20-29' or '0-3,10', or a list like [-2, -1] for the last two blocks")
        first = int(m.group(1))
        out.extend(range(first, int(m.group(2) or first) + 1))
    return out


def resolve_layers(layers: list[int] | str, num_layers: int) -> set[int]:
    """Block indices in [0, num_layers); list entries may count from the end."""
    raw = _parse_layer_string(layers) if isinstance(layers, str) else list(layers)
    if not raw:
        raise TokentuneError("layers is empty", where="adapter.layers", fix="name at least one block, or omit layers")
    out = set()
    for i in raw:
        if not -num_layers <= i < num_layers:
            raise TokentuneError(f"layer {i} does not exist: the model has {num_layers} blocks", where="adapter.layers",
                                 fix=f"use indices 0..{num_layers - 1}, or -{num_layers}..-1 from the end")
        out.add(i % num_layers)
    return out


@register("adapter", "freeze", config=FreezeConfig,
          description="train only chosen parameters (name patterns, block ranges, embeddings, head); the rest frozen")
class FreezeAdapter:
    name = "freeze"

    def __init__(self, config: FreezeConfig | None = None):
        self.config = config or FreezeConfig()
        self._attached = False

    def attach(self, model: nn.Module, view) -> None:
        if self._attached:
            raise TokentuneError("the freeze adapter is already attached", fix="create a new adapter for another model")
        chosen = self._select(model, view)
        for n, p in model.named_parameters():
            if not n.startswith(ADAPTER_PREFIX):  # other adapters' modules (tokentune_*) are theirs to freeze
                p.requires_grad_(False)
        for _, p in chosen:
            p.requires_grad_(True)
        self._params = chosen
        self._attached = True

    def _select(self, model: nn.Module, view) -> list[tuple[str, nn.Parameter]]:
        cfg = self.config
        # A tied weight appears once; other adapters' modules (tokentune_*) are never selected.
        named = [(n, p) for n, p in model.named_parameters() if not n.startswith(ADAPTER_PREFIX)]
        patterns = [re.compile(p) for p in cfg.train]
        layers = resolve_layers(cfg.layers, view.num_layers) if cfg.layers is not None else None

        # Parameters of the parts named by the include_* flags, by identity (a tied head is the embedding).
        parts: set[int] = set()
        if cfg.include_embeddings:
            parts |= {id(p) for m in view.embeddings.values() for p in m.parameters()}
        if cfg.include_head is None:
            parts |= {id(p) for m in view.task_heads.values() for p in m.parameters()}
        elif cfg.include_head:
            parts |= {id(p) for m in view.heads.values() for p in m.parameters()}
        if cfg.include_final_norm:
            if view.final_norm is None:
                raise TokentuneError(f"{view.model_type} has no final norm after its blocks",
                                     where="adapter.include_final_norm", fix="set include_final_norm: false")
            parts |= {id(p) for p in view.final_norm.parameters()}

        def wanted(name: str, p: nn.Parameter) -> bool:
            index = view.layer_of(name)
            if index is not None and layers is not None:
                return index in layers and (not patterns or any(r.search(name) for r in patterns))
            return id(p) in parts or any(r.search(name) for r in patterns)

        chosen = [(n, p) for n, p in named if wanted(n, p)]
        names = [n for n, _ in chosen]
        for raw, rx in zip(cfg.train, patterns):
            if not any(rx.search(n) for n in names):
                scope = f" inside layers {cfg.layers}" if layers is not None else ""
                raise TokentuneError(
                    f"train pattern {raw!r} matches no parameter{scope}",
                    where="adapter.train",
                    fix="parameter names look like: " + ", ".join(n for n, _ in named[:2] + named[-3:]),
                )
        if layers is not None and patterns and not any(view.layer_of(n) is not None for n in names):
            raise TokentuneError(f"no parameter inside layers {cfg.layers} matches the train patterns",
                                 where="adapter.layers",
                                 fix="drop `train` to train whole blocks; use include_head / include_embeddings "
                                     "for parts outside the blocks")
        if not chosen:
            raise TokentuneError("the freeze adapter selects no parameter to train", where="adapter",
                                 fix="set train patterns, layers, or include_embeddings / include_head / "
                                     "include_final_norm")
        return chosen

    def param_groups(self) -> list[ParamGroup]:
        require_attached(self)
        return [ParamGroup("freeze", list(self._params))]

    def state_dict(self):
        require_attached(self)
        return tensor_state(self._params)

    def load_state_dict(self, state) -> None:
        require_attached(self)
        copy_state(self._params, state, source="freeze adapter state")

    def save(self, out_dir: Path, base_ref: str) -> None:
        """The trained tensors (trainable.safetensors) and which base and config they belong to (json)."""
        require_attached(self)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_tensors(out_dir / WEIGHTS, self.state_dict())
        meta = {"adapter": self.name, "base_model_name_or_path": base_ref,
                "config": self.config.model_dump(mode="json"), "parameters": [n for n, _ in self._params]}
        (out_dir / META).write_text(json.dumps(meta, indent=2) + "\n")

    def load(self, in_dir: Path) -> None:
        require_attached(self)
        in_dir = Path(in_dir)
        meta_path = in_dir / META
        if meta_path.is_file() and json.loads(meta_path.read_text()).get("adapter") != self.name:
            raise TokentuneError(f"{in_dir} was not written by the freeze adapter", where=str(meta_path),
                                 fix="attach the adapter named in tokentune_adapter.json")
        copy_state(self._params, read_tensors(in_dir / WEIGHTS), source=str(in_dir / WEIGHTS))

    def merge(self) -> None:
        """Nothing to fold: the trained tensors are the model's own."""
        require_attached(self)
