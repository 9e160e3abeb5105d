"""Layer-wise fine-tuning: freezing presets (embeddings + head, head, last block), freezing the lower F layers,
layer-wise learning-rate decay (LLRD) and re-initialising the top R blocks (Tinn et al., 2021; Zlotchevski
et al., 2022). The pretrained tensors themselves train; nothing is added to the model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ..errors import TokentuneError
from ..registry import register
from .base import ParamGroup
from .layer_parts import PARTS, partition, pooler_of, reinitialise
from .state_io import copy_state, read_tensors, require_attached, tensor_state, write_tensors

WEIGHTS, META = "trainable.safetensors", "tokentune_adapter.json"

# Parts each preset trains (the last block is added by block index).
PRESET_PARTS = {
    "all": set(PARTS),
    "embeddings_head": {"embeddings", "pooler", "lm_head", "task_head"},
    "head": {"pooler", "lm_head", "task_head"},
    "last_block": {"pooler", "task_head"},
}


class LayerwiseConfig(BaseModel):
    """Which layers train, at which learning rate, from which starting point.

    preset             "all": every parameter (less what freeze_lower freezes); "embeddings_head": the embedding
                       tables and the heads; "head": the heads only; "last_block": the last block only. Every
                       preset trains a task head (classifier) and, on encoders, the pooler that feeds it.
    freeze_lower       F: with preset "all", the embeddings and blocks 0..F-1 are frozen (0 = nothing frozen)
    llrd_decay         ξ in (0, 1]: one optimiser group per layer, lr = train.lr · ξ^(depth from top): the top
                       block, final norm and heads ξ^0 = 1, block i ξ^(L-1-i), embeddings ξ^L. null = one group
    reinit_top         R: re-draw the top R blocks with the model's own initialiser before training
    reinit_pooler      null: re-draw the pooler too when reinit_top > 0 and the model has one; true / false force it
    reinit_seed        seed of the re-draw; null = the run's seed (train.seed). The run's RNG stream is not consumed
    include_final_norm null: the final norm trains with preset "all" only; true / false force it
    tied_as            where a tied embedding/LM-head tensor (one tensor, one group, counted once) sits for
                       freeze_lower and LLRD: "embedding" (bottom: frozen by F >= 1, lr · ξ^L) or "head" (top:
                       never frozen by F, lr · 1). Presets "embeddings_head" and "head" train it either way.
    """

    model_config = ConfigDict(extra="forbid")
    name: Literal["layerwise"] = "layerwise"
    preset: Literal["all", "embeddings_head", "head", "last_block"] = "all"
    freeze_lower: int = Field(0, ge=0)
    llrd_decay: float | None = Field(None, gt=0, le=1)
    reinit_top: int = Field(0, ge=0)
    reinit_pooler: bool | None = None
    reinit_seed: int | None = None
    include_final_norm: bool | None = None
    tied_as: Literal["embedding", "head"] = "embedding"

    @model_validator(mode="after")
    def _combinations(self):
        if self.freeze_lower and self.preset != "all":
            raise TokentuneError(f"freeze_lower applies to preset 'all'; preset {self.preset!r} freezes the blocks "
                                 "itself", where="adapter.freeze_lower", fix="set preset: all, or drop freeze_lower")
        if self.llrd_decay is not None and self.preset in ("head", "last_block"):
            raise TokentuneError(f"llrd_decay has no effect with preset {self.preset!r}: every trainable tensor "
                                 "sits at the top", where="adapter.llrd_decay",
                                 fix="drop llrd_decay, or use preset all / embeddings_head")
        if self.reinit_top and self.preset in ("head", "embeddings_head"):
            raise TokentuneError(f"reinit_top would re-draw blocks that preset {self.preset!r} freezes",
                                 where="adapter.reinit_top", fix="set reinit_top: 0, or use preset all / last_block")
        if self.reinit_top > 1 and self.preset == "last_block":
            raise TokentuneError("preset last_block trains one block, so at most that block can be re-drawn",
                                 where="adapter.reinit_top", fix="set reinit_top: 1, or use preset all")
        if self.tied_as == "head" and not self.freeze_lower and self.llrd_decay is None:
            raise TokentuneError("tied_as only decides where a tied head sits for freeze_lower and llrd_decay; "
                                 "neither is set", where="adapter.tied_as", fix="drop tied_as, or set one of them")
        return self

    def reinits_pooler(self) -> bool:
        return self.reinit_top > 0 if self.reinit_pooler is None else self.reinit_pooler


@register("adapter", "layerwise", config=LayerwiseConfig,
          description="freezing presets, freeze the lower F layers, layer-wise lr decay, re-init the top R blocks")
class LayerwiseAdapter:
    name = "layerwise"

    def __init__(self, config: LayerwiseConfig | None = None):
        self.config = config or LayerwiseConfig()
        self._attached = False

    def attach(self, model: nn.Module, view) -> None:
        if self._attached:
            raise TokentuneError("the layerwise adapter is already attached",
                                 fix="create a new adapter for another model")
        cfg, L = self.config, view.num_layers
        self._check_against(view)
        slots = partition(model, view, cfg.tied_as)
        chosen = [s for s in slots if self._trains(s, L)]
        if not chosen:
            raise TokentuneError(f"preset {cfg.preset!r} with freeze_lower {cfg.freeze_lower} leaves nothing to train "
                                 f"on this {view.model_type} model", where="adapter",
                                 fix="lower freeze_lower, or set include_final_norm / tied_as: head")
        self.reinitialised = self._reinitialise(model, view)
        for p in model.parameters():
            p.requires_grad_(False)
        for s in chosen:
            s.param.requires_grad_(True)
        self._slots, self._num_layers = chosen, L
        self.tied = view.tied_embeddings
        self._attached = True
        self._say_what_the_tied_tensor_does(slots)

    def _check_against(self, view) -> None:
        cfg, L = self.config, view.num_layers
        if cfg.freeze_lower > L:
            raise TokentuneError(f"freeze_lower {cfg.freeze_lower} but the model has {L} blocks",
                                 where="adapter.freeze_lower", fix=f"use 0..{L}")
        if cfg.reinit_top > L - cfg.freeze_lower:
            raise TokentuneError(f"reinit_top {cfg.reinit_top} with freeze_lower {cfg.freeze_lower} would re-draw a "
                                 f"frozen block (the model has {L})", where="adapter.reinit_top",
                                 fix=f"keep freeze_lower + reinit_top <= {L}")
        if cfg.tied_as == "head" and not view.tied_embeddings:
            raise TokentuneError(f"tied_as applies to tied embeddings; this {view.model_type} model's LM head is its "
                                 "own tensor", where="adapter.tied_as", fix="drop tied_as")
        if cfg.include_final_norm and view.final_norm is None:
            raise TokentuneError(f"{view.model_type} has no final norm after its blocks",
                                 where="adapter.include_final_norm", fix="drop include_final_norm")
        if cfg.reinit_pooler and pooler_of(view) is None:
            raise TokentuneError(f"this {view.model_type} model has no pooler", where="adapter.reinit_pooler",
                                 fix="drop reinit_pooler")

    def _trains(self, slot, L: int) -> bool:
        cfg = self.config
        parts = PRESET_PARTS[cfg.preset]
        if slot.part == "final_norm":
            return cfg.preset == "all" if cfg.include_final_norm is None else cfg.include_final_norm
        if slot.part == "block":
            if cfg.preset == "last_block":
                return slot.layer == L - 1
            return "block" in parts and slot.layer >= cfg.freeze_lower
        if slot.part == "embeddings" and cfg.freeze_lower:
            return False  # F >= 1 freezes the bottom layer (with it a tied head, unless tied_as: head)
        # A tied tensor is both the embedding and the LM head: a preset that names either trains it.
        return slot.part in parts or (slot.tied and bool(parts & {"embeddings", "lm_head"}))

    def _reinitialise(self, model: nn.Module, view) -> list[str]:
        cfg, L = self.config, view.num_layers
        names = [view.layer_prefix(i).rstrip(".") for i in range(L - cfg.reinit_top, L)]
        modules = [view.layers[i] for i in range(L - cfg.reinit_top, L)]
        pooler = pooler_of(view)
        if cfg.reinits_pooler() and pooler is not None:
            names.append(next(n for n, m in model.named_modules() if m is pooler))
            modules.append(pooler)
        self.seed = None
        if modules:
            # The run's seed: the session seeds torch with train.seed right before attach.
            self.seed = torch.initial_seed() if cfg.reinit_seed is None else cfg.reinit_seed
            reinitialise(model, modules, self.seed)
        return names

    def _say_what_the_tied_tensor_does(self, slots) -> None:
        """A tied LM head is the embedding tensor: say which of the two roles it was given in this run."""
        tied = next((s for s in slots if s.tied), None)
        cfg = self.config
        plain = cfg.preset == "last_block" or (cfg.preset == "all" and not cfg.freeze_lower and cfg.llrd_decay is None)
        if tied is None or plain or int(os.environ.get("RANK", "0")) != 0:
            return
        from ..engine.logging import console

        if tied.param.requires_grad:
            group = next(g for g in self.param_groups() if any(p is tied.param for _, p in g.params))
            console.print(f"layerwise: the LM head is tied to {tied.name} (one tensor): it trains once, in group "
                          f"{group.name!r} (lr × {group.lr_scale:.3g}), and moves the input embeddings with it")
        else:
            console.print(f"layerwise: the LM head is tied to {tied.name}, which freeze_lower freezes: the LM head "
                          "stays frozen (set tied_as: head to train it at the full lr)")

    def param_groups(self) -> list[ParamGroup]:
        """One group, or with llrd_decay one per layer from the bottom: embeddings, layer.0 .. layer.L-1, head."""
        require_attached(self)
        decay, L = self.config.llrd_decay, self._num_layers
        if decay is None:
            return [ParamGroup("layerwise", [(s.name, s.param) for s in self._slots])]
        groups: dict[int, ParamGroup] = {}
        for s in self._slots:
            pos = -1 if s.part == "embeddings" else s.layer if s.part == "block" else L  # bottom to top
            if pos not in groups:
                name = "embeddings" if pos < 0 else "head" if pos == L else f"layer.{pos}"
                groups[pos] = ParamGroup(name, lr_scale=decay ** s.depth(L))
            groups[pos].params.append((s.name, s.param))
        return [groups[k] for k in sorted(groups)]

    def state_dict(self):
        require_attached(self)
        return tensor_state([(s.name, s.param) for s in self._slots])

    def load_state_dict(self, state) -> None:
        require_attached(self)
        copy_state([(s.name, s.param) for s in self._slots], state, source="layerwise adapter state")

    def save(self, out_dir: Path, base_ref: str) -> None:
        """The trained tensors (trainable.safetensors) and how they were chosen (json): the resolved final-norm
        choice, the re-drawn modules and their seed, the groups' lr scales, whether the head was tied."""
        require_attached(self)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_tensors(out_dir / WEIGHTS, self.state_dict())
        meta = {"adapter": self.name, "base_model_name_or_path": base_ref,
                "config": self.config.model_dump(mode="json"),
                "final_norm_trains": any(s.part == "final_norm" for s in self._slots),
                "tied_embeddings": self.tied, "reinitialised": self.reinitialised,
                "reinit_seed": self.seed,
                "groups": {g.name: g.lr_scale for g in self.param_groups()},
                "parameters": [s.name for s in self._slots]}
        (out_dir / META).write_text(json.dumps(meta, indent=2) + "\n")

    def load(self, in_dir: Path) -> None:
        require_attached(self)
        in_dir = Path(in_dir)
        meta_path = in_dir / META
        if meta_path.is_file() and json.loads(meta_path.read_text()).get("adapter") != self.name:
            raise TokentuneError(f"{in_dir} was not written by the layerwise adapter", where=str(meta_path),
                                 fix="attach the adapter named in tokentune_adapter.json")
        self.load_state_dict(read_tensors(in_dir / WEIGHTS))

    def merge(self) -> None:
        """Nothing to fold: the trained tensors are the model's own."""
        require_attached(self)
