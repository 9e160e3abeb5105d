"""HFT, Half Fine-Tuning (Hui et al. 2024): in every block a random half of each parameter category trains
(2 of the 4 attention projections; the FFN's 2 of 3 matrices in half of the layers and 1 of 3 in the other half;
half of the norms) and the other half keeps its value. Embeddings and the head train. A fresh half is drawn per
training stage, or per epoch."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import TokentuneError
from ..registry import register
from .base import ParamGroup
from .state_io import copy_state, read_tensors, require_attached, tensor_state, write_tensors

WEIGHTS, META = "trainable.safetensors", "tokentune_adapter.json"
ATTENTION, FFN = ("q", "k", "v", "o"), ("gate", "up", "down")


class HftConfig(BaseModel):
    """HFT options.

    reselect          "stage": one half for the whole run (a run is one training stage; give the next stage
                      `stage: N+1` and it draws a fresh half). "epoch": a fresh half at the start of every epoch
                      of the run (needs tokentune's Trainer, whose hooks apply it).
    seed              the draw's seed: the half is a pure function of (seed, stage, epoch), so a resumed or
                      reloaded run gets the same one. Change it to repeat an experiment with another half.
    stage             index of this run in a sequence of stages (SFT 0, DPO 1, continual task t ...).
    train_embeddings  every embedding table trains (token; position and token-type where the family has them).
    train_head        the parameters outside the blocks that are neither embeddings nor norms train: the LM head,
                      a classifier, BERT's pooler. A tied LM head is the token embedding, so with tied embeddings
                      train_embeddings and train_head must agree.
    """

    model_config = ConfigDict(extra="forbid")
    name: Literal["hft"] = "hft"
    reselect: Literal["stage", "epoch"] = "stage"
    seed: int = 0
    stage: int = Field(0, ge=0)
    train_embeddings: bool = True
    train_head: bool = True


@dataclass(frozen=True, eq=False)
class Piece:
    """A parameter, or its slice [start, stop) along `dim` (GPT-2's fused c_attn holds q, k and v)."""

    name: str
    param: nn.Parameter
    dim: int | None = None
    start: int = 0
    stop: int = 0

    @property
    def numel(self) -> int:
        if self.dim is None:
            return self.param.numel()
        return self.param.numel() // self.param.shape[self.dim] * (self.stop - self.start)

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.dim is None else tensor.narrow(self.dim, self.start, self.stop - self.start)


@dataclass(frozen=True, eq=False)
class Unit:
    """What trains or freezes as one: a projection (weight and bias), a norm, the embeddings, the head."""

    key: str  # "0.q", "1.down", "norm:model.norm", "embeddings", "head"
    category: str  # attention, ffn, norm, embeddings, head
    pieces: tuple[Piece, ...]

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.pieces)


def _whole(name: str, module: nn.Module) -> tuple[Piece, ...]:
    return tuple(Piece(f"{name}.{n}", p) for n, p in module.named_parameters(recurse=False))


def _fused_slice(name: str, module: nn.Module, index: int) -> tuple[Piece, ...]:
    """Piece `index` (q 0, k 1, v 2) of a fused qkv projection: nn.Linear keeps outputs in rows, GPT-2's Conv1D
    (weight [in, out]) in columns; the bias always along dim 0."""
    out_dim = 0 if isinstance(module, nn.Linear) else 1
    pieces = []
    for pname, p in module.named_parameters(recurse=False):
        dim = out_dim if pname == "weight" else 0
        if p.shape[dim] % 3:
            raise TokentuneError(f"{name}.{pname} has {p.shape[dim]} outputs, not three equal q, k, v parts",
                                 fix="HFT splits a fused qkv projection into three equal parts")
        part = p.shape[dim] // 3
        pieces.append(Piece(f"{name}.{pname}", p, dim, index * part, (index + 1) * part))
    return tuple(pieces)


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower() and next(module.parameters(recurse=False), None) is not None


def build_units(model: nn.Module, view) -> list[Unit]:
    """Every parameter of the model in exactly one unit, in a fixed order (the draw depends on it)."""
    roles = view.family.roles
    missing = [r for r in ATTENTION if not roles.get(r)]
    ffn = [r for r in FFN if roles.get(r)]
    if missing or len(ffn) not in (2, 3):
        raise TokentuneError(f"{view.model_type} lacks the q, k, v, o projections and a 2- or 3-matrix FFN that "
                             "HFT halves", fix="use a Llama-, GPT-2- or BERT-style model")
    units = []
    for i, layer in enumerate(view.layers):
        prefix = view.layer_prefix(i)
        for role in ATTENTION + tuple(ffn):
            path = roles[role][0]
            module = layer.get_submodule(path)
            fused = view.family.fused_qkv and role in ("q", "k", "v")
            pieces = _fused_slice(prefix + path, module, "qkv".index(role)) if fused else _whole(prefix + path, module)
            units.append(Unit(f"{i}.{role}", "attention" if role in ATTENTION else "ffn", pieces))
    units += [Unit(f"norm:{n}", "norm", _whole(n, m)) for n, m in model.named_modules() if _is_norm(m)]
    covered = {id(pc.param) for u in units for pc in u.pieces}
    rest = [(n, p) for n, p in model.named_parameters() if id(p) not in covered]
    inside = [n for n, _ in rest if view.layer_of(n) is not None]
    if inside:
        raise TokentuneError(f"HFT has no category (attention, FFN, norm) for {inside[:3]} inside the blocks",
                             fix="teach tokentune/models/anatomy.py this family's projection roles")
    embedding_ids = {id(p) for m in view.embeddings.values() for p in m.parameters()}
    for key, keep in (("embeddings", True), ("head", False)):
        pieces = tuple(Piece(n, p) for n, p in rest if (id(p) in embedding_ids) == keep)
        if pieces:
            units.append(Unit(key, key, pieces))
    return units


def draw_seed(seed: int, stage: int, period: int) -> int:
    """A 56-bit seed per (seed, stage, period) that no two triples share in practice."""
    return int.from_bytes(hashlib.sha256(f"hft/{seed}/{stage}/{period}".encode()).digest()[:7], "big")


def draw(units: list[Unit], num_layers: int, seed: int, stage: int, period: int) -> set[str]:
    """Keys of the block units that train: 2 of 4 attention projections per layer; for a 3-matrix FFN 2 of 3 in
    a random half of the layers and 1 of 3 in the rest (with an odd layer count the extra layer gets 2 or 1 by a
    coin flip), for a 2-matrix FFN 1 of 2 per layer; floor(n/2) of the model's n norms."""
    g = torch.Generator().manual_seed(draw_seed(seed, stage, period))

    def pick(n: int, k: int) -> list[int]:
        return torch.randperm(n, generator=g)[:k].tolist()

    keys = {u.key for u in units}
    ffn = [r for r in FFN if f"0.{r}" in keys]
    chosen = {f"{i}.{ATTENTION[j]}" for i in range(num_layers) for j in pick(4, 2)}
    if len(ffn) == 3:
        coin = int(torch.randint(2, (1,), generator=g))
        twos = set(pick(num_layers, (num_layers + coin) // 2))
        chosen |= {f"{i}.{ffn[j]}" for i in range(num_layers) for j in pick(3, 2 if i in twos else 1)}
    else:
        chosen |= {f"{i}.{ffn[j]}" for i in range(num_layers) for j in pick(2, 1)}
    norms = [u.key for u in units if u.category == "norm"]
    chosen |= {norms[j] for j in pick(len(norms), len(norms) // 2)}
    return chosen


@register("adapter", "hft", config=HftConfig,
          description="Half Fine-Tuning: a random half of each block category trains (2/4 attention, FFN "
                      "2-of-3/1-of-3, half the norms), embeddings and head train; redrawn per stage or epoch")
class HftAdapter:
    name = "hft"

    def __init__(self, config: HftConfig | None = None):
        self.config = config or HftConfig()
        self._attached = False

    # --- set-up ------------------------------------------------------------------------------
    def attach(self, model: nn.Module, view) -> None:
        if self._attached:
            raise TokentuneError("the hft adapter is already attached", fix="create a new adapter for another model")
        cfg = self.config
        if view.tied_embeddings and cfg.train_embeddings != cfg.train_head:
            raise TokentuneError("the LM head is tied to the token embedding (one tensor), so it cannot train while "
                                 "the embedding is frozen or the other way round", where="adapter.train_head",
                                 fix="set train_embeddings and train_head to the same value")
        self.model, self.view = model, view
        self.units = build_units(model, view)
        keys = {u.key for u in self.units}
        self.outside = {k for k, on in (("embeddings", cfg.train_embeddings), ("head", cfg.train_head)) if on} & keys
        self.selected = self._draw(0)
        # The optimiser is built from param_groups() once: under per-epoch re-selection it must hold every tensor
        # some epoch can train, and the Trainer hooks freeze the other half at each epoch's start.
        every = {id(pc.param) for u in self.units if u.category in ("attention", "ffn", "norm") or u.key in self.outside
                 for pc in u.pieces}
        live = self._trainable_ids(self.selected) if cfg.reselect == "stage" else every
        for p in model.parameters():
            p.requires_grad_(id(p) in live)
        self._params = [(n, p) for n, p in model.named_parameters() if id(p) in live]
        self._period, self._distributed = 0, False
        self._frozen: list[nn.Parameter] = []
        self._frozen_slices: list[tuple[Piece, torch.Tensor]] = []
        self._attached = True

    def _draw(self, period: int) -> set[str]:
        cfg = self.config
        return draw(self.units, self.view.num_layers, cfg.seed, cfg.stage, period) | self.outside

    def _trainable_ids(self, selected: set[str]) -> set[int]:
        return {id(pc.param) for u in self.units if u.key in selected for pc in u.pieces}

    # --- what trains now ---------------------------------------------------------------------
    def trainable_pieces(self) -> list[Piece]:
        """The parameters and slices the current selection trains."""
        return [pc for u in self.units if u.key in self.selected for pc in u.pieces]

    def fractions(self) -> dict[str, float]:
        """The realised trained fraction of parameters per category ("blocks": attention and FFN together). With
        GQA (k, v smaller than q, o) "half" is by matrix count, so attention is not exactly 0.5."""
        out = {}
        for name, cats in (("attention", ("attention",)), ("ffn", ("ffn",)), ("blocks", ("attention", "ffn")),
                           ("norm", ("norm",))):
            units = [u for u in self.units if u.category in cats]
            total = sum(u.numel for u in units)
            out[name] = sum(u.numel for u in units if u.key in self.selected) / total if total else 0.0
        return out

    def _describe(self) -> str:
        f, norms = self.fractions(), [u for u in self.units if u.category == "norm"]
        when = f"epoch {self._period}" if self.config.reselect == "epoch" else f"stage {self.config.stage}"
        on = sum(u.key in self.selected for u in norms)
        return (f"hft ({when}): training {f['blocks']:.1%} of the block projections' parameters (attention "
                f"{f['attention']:.1%}, FFN {f['ffn']:.1%}) and {on} of {len(norms)} norms")

    def _apply(self, period: int, trainer) -> None:
        """Make the half drawn for `period` the trained one, from this step on."""
        self.selected, self._period = self._draw(period), period
        trainable = self._trainable_ids(self.selected)
        self._frozen = [p for _, p in self._params if id(p) not in trainable]
        if not self._distributed:  # under DDP the set of grad-requiring tensors is fixed at wrap time
            for _, p in self._params:
                p.requires_grad_(id(p) in trainable)
        for p in self._frozen:  # frozen tensors hold no optimiser state; a later epoch that trains one starts afresh
            trainer.optimizer.state.pop(p, None)
        # Frozen q/k/v slices of a fused tensor that trains: their gradient is zeroed and their value restored
        # after each step (the optimiser's weight decay and moments act on the whole tensor).
        self._frozen_slices = [(pc, pc.view(pc.param.detach()).clone()) for u in self.units
                               if u.key not in self.selected for pc in u.pieces
                               if pc.dim is not None and id(pc.param) in trainable]
        if trainer.env.is_main:
            from ..engine.logging import console

            console.print(self._describe())

    # --- Trainer hooks -----------------------------------------------------------------------
    def on_train_start(self, trainer) -> None:
        self._distributed = trainer.env.distributed
        self._steps_per_epoch = trainer.schedule.steps_per_epoch
        self._period = None  # the first step (after a resume too) applies its period and snapshots frozen slices

    def on_step_start(self, trainer, step: int) -> None:
        period = step // self._steps_per_epoch if self.config.reselect == "epoch" else 0
        if period != self._period:
            self._apply(period, trainer)

    def after_backward(self, trainer, step: int, stats) -> None:
        for p in self._frozen:  # AdamW skips a tensor whose grad is None: no update, no weight decay
            p.grad = None
        for pc, _ in self._frozen_slices:
            if pc.param.grad is not None:
                pc.view(pc.param.grad).zero_()

    @torch.no_grad()
    def after_optimizer_step(self, trainer, step: int) -> None:
        for pc, value in self._frozen_slices:
            pc.view(pc.param).copy_(value)

    # --- the adapter protocol ----------------------------------------------------------------
    def param_groups(self) -> list[ParamGroup]:
        require_attached(self)
        return [ParamGroup("hft", list(self._params))]

    def state_dict(self):
        require_attached(self)
        return tensor_state(self._params)

    def load_state_dict(self, state) -> None:
        require_attached(self)
        copy_state(self._params, state, source="hft adapter state")

    def save(self, out_dir: Path, base_ref: str) -> None:
        """The tensors the optimiser held (trainable.safetensors) and the base, config and last selection (json)."""
        require_attached(self)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_tensors(out_dir / WEIGHTS, self.state_dict())
        meta = {"adapter": self.name, "base_model_name_or_path": base_ref,
                "config": self.config.model_dump(mode="json"), "parameters": [n for n, _ in self._params],
                "last_selection": {"period": self._period or 0, "units": sorted(self.selected),
                                   "fractions": self.fractions()}}
        (out_dir / META).write_text(json.dumps(meta, indent=2) + "\n")

    def load(self, in_dir: Path) -> None:
        require_attached(self)
        in_dir = Path(in_dir)
        meta_path = in_dir / META
        if meta_path.is_file() and json.loads(meta_path.read_text()).get("adapter") != self.name:
            raise TokentuneError(f"{in_dir} was not written by the hft adapter", where=str(meta_path),
                                 fix="attach the adapter named in tokentune_adapter.json")
        copy_state(self._params, read_tensors(in_dir / WEIGHTS), source=str(in_dir / WEIGHTS))

    def merge(self) -> None:
        """Nothing to fold: the trained tensors are the model's own."""
        require_attached(self)
