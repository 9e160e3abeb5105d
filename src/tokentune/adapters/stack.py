"""Several adapters on one model: attached in order, each optionally frozen or initialised from a saved artefact.

ProMoT's second stage is the example: a soft prompt trained in stage 1, attached and frozen, plus full fine-tuning
(or LoRA) of the model under it. Each member is an ordinary adapter; the stack only delegates and keeps names apart:

  trainable set    exactly the parameters in the param groups of the members that are not frozen (set after every
                   member attached, so one member freezing the base does not undo another); a parameter that a frozen
                   and a trainable member both list (an encoder's classifier under a prompt and full fine-tuning)
                   trains, and one listed by two trainable members goes to the first
  names            param groups, state keys and saved directories carry the member's index: `0.prompt`,
                   `1.full`, final/`0-prompt_tuning/`, final/`1-full/` (each written by that member's own save())
  hooks            trainer hooks (on_train_start ... finalize) reach the trainable members; prepare_data,
                   before_batch/after_batch and aux_loss reach every member (they define the forward and the loss)
  merge            only when every member merges; a member that refuses stops the merge with its reason
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, field_validator
from torch import nn

from .. import registry
from ..errors import TokentuneError
from ..registry import register
from .base import ParamGroup
from .state_io import require_attached

META = "stack.json"
_MEMBER_KEYS = ("frozen", "init_from")


def _member_config(entry: dict, where: str):
    """(validated adapter config, frozen, init_from) of one member entry."""
    from ..config import _slot_config

    if not isinstance(entry, dict):
        raise TokentuneError(f"{where} must be an adapter section (a mapping with a 'name')", where=where,
                             fix="e.g. {name: prompt_tuning, frozen: true, init_from: runs/stage1/final}")
    frozen, init_from = entry.get("frozen", False), entry.get("init_from")
    if not isinstance(frozen, bool):
        raise TokentuneError(f"{where}.frozen must be true or false, got {frozen!r}", where=f"{where}.frozen")
    if init_from is not None and not isinstance(init_from, str):
        raise TokentuneError(f"{where}.init_from must be a directory path, got {init_from!r}",
                             where=f"{where}.init_from")
    if entry.get("name") == "stack":
        raise TokentuneError("a stack cannot contain a stack", where=f"{where}.name", fix="list the members flat")
    cfg = _slot_config("adapter", {k: v for k, v in entry.items() if k not in _MEMBER_KEYS}, where)
    return cfg, frozen, init_from


class StackConfig(BaseModel):
    """adapters   the members in attach order; each is an adapter section (`name` + that adapter's options) with two
               more keys: `frozen` (default false: the member's parameters stay fixed) and `init_from` (a directory
               that member's save() wrote, e.g. an earlier run's final/, loaded right after it attaches)"""

    model_config = ConfigDict(extra="forbid")
    name: Literal["stack"] = "stack"
    adapters: list[dict[str, Any]]

    @field_validator("adapters")
    @classmethod
    def _members_valid(cls, adapters):
        if not adapters:
            raise TokentuneError("a stack needs at least one member", where="adapter.adapters",
                                 fix="list adapter sections, e.g. [{name: prompt_tuning, frozen: true}, {name: full}]")
        out = []
        for i, entry in enumerate(adapters):
            cfg, frozen, init_from = _member_config(entry, f"adapter.adapters[{i}]")
            options = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else dict(cfg)
            out.append({**options, "frozen": frozen, "init_from": init_from})
        if all(m["frozen"] for m in out):
            raise TokentuneError("every member of the stack is frozen: nothing would train", where="adapter.adapters",
                                 fix="leave at least one member without frozen: true")
        return out

    def members(self) -> list[tuple[Any, bool, str | None]]:
        return [_member_config(e, f"adapter.adapters[{i}]") for i, e in enumerate(self.adapters)]


@register("adapter", "stack", config=StackConfig,
          description="several adapters on one model, each optionally frozen or initialised from a saved artefact")
class StackAdapter:
    name = "stack"

    def __init__(self, config: StackConfig):
        self.config = config
        self.members, self.frozen, self.init_from = [], [], []
        for cfg, frozen, init_from in config.members():
            name = cfg.name if isinstance(cfg, BaseModel) else cfg["name"]
            entry = registry.get("adapter", name)
            self.members.append(entry.factory(cfg if entry.config_cls else None))
            self.frozen.append(frozen)
            self.init_from.append(init_from)
        self._attached = False

    def _tag(self, i: int) -> str:
        return f"{i}-{self.members[i].name}"

    def _trainable(self):
        return [m for m, frozen in zip(self.members, self.frozen) if not frozen]

    # --- attach -----------------------------------------------------------------------------
    def attach(self, model: nn.Module, view) -> None:
        if self._attached:
            raise TokentuneError("the stack adapter is already attached", fix="create a new adapter for another model")
        for member, init_from in zip(self.members, self.init_from):
            member.attach(model, view)
            if init_from is not None:
                if not Path(init_from).is_dir():
                    raise TokentuneError(f"init_from {init_from!r} is not a directory",
                                         where="adapter.adapters[].init_from", fix="point at the directory the member's save() wrote (a run's final/)")
                member.load(Path(init_from))
        # Members attach one after another and some freeze the whole base when they do: decide once, at the end.
        trainable = {id(p) for m in self._trainable() for g in m.param_groups() for _, p in g.params}
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
        self.model = model
        self._attached = True

    # --- training state ---------------------------------------------------------------------
    def param_groups(self) -> list[ParamGroup]:
        require_attached(self)
        groups, seen = [], set()
        for i, member in enumerate(self.members):
            if self.frozen[i]:
                continue
            for g in member.param_groups():
                params = [(f"{i}.{n}", p) for n, p in g.params if id(p) not in seen]
                seen.update(id(p) for _, p in params)
                if params:
                    groups.append(ParamGroup(f"{i}.{g.name}", params, lr=g.lr, lr_scale=g.lr_scale,
                                             weight_decay=g.weight_decay))
        return groups

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every member's state (frozen ones too, so a checkpoint restores the exact model), keys `i.name`."""
        require_attached(self)
        out, storages = {}, set()
        for i, member in enumerate(self.members):
            for k, v in member.state_dict().items():
                ptr = v.untyped_storage().data_ptr()
                out[f"{i}.{k}"] = v.clone() if ptr in storages else v  # safetensors refuses shared storage
                storages.add(ptr)
        return out

    def load_state_dict(self, state) -> None:
        require_attached(self)
        parts: list[dict] = [{} for _ in self.members]
        for key, value in state.items():
            index, _, rest = key.partition(".")
            if not index.isdigit() or int(index) >= len(self.members):
                raise TokentuneError(f"state key {key!r} belongs to no member of this stack "
                                     f"({len(self.members)} members)", fix="load a state saved by a stack with the same members")
            parts[int(index)][rest] = value
        for member, part in zip(self.members, parts):
            member.load_state_dict(part)

    # --- artefact ---------------------------------------------------------------------------
    def save(self, out_dir: Path, base_ref: str) -> None:
        require_attached(self)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, member in enumerate(self.members):
            member.save(out_dir / self._tag(i), base_ref)
        meta = {"members": [{"name": m.name, "frozen": f, "dir": self._tag(i)}
                            for i, (m, f) in enumerate(zip(self.members, self.frozen))]}
        (out_dir / META).write_text(json.dumps(meta, indent=1) + "\n")

    def load(self, in_dir: Path) -> None:
        require_attached(self)
        in_dir = Path(in_dir)
        path = in_dir / META
        if not path.is_file():
            raise TokentuneError(f"{META} not found in {in_dir}", where=str(in_dir),
                                 fix="point at the final/ directory of a run trained with the stack adapter")
        saved = [m["name"] for m in json.loads(path.read_text())["members"]]
        ours = [m.name for m in self.members]
        if saved != ours:
            raise TokentuneError(f"the saved stack has members {saved}, this one {ours}", where=str(path),
                                 fix="attach a stack with the same members in the same order")
        for i, member in enumerate(self.members):
            member.load(in_dir / self._tag(i))

    def merge(self) -> None:
        """Merge every member in order. Members that cannot merge (prompts, prefixes) refuse before changing
        anything, so a stack whose first refusing member comes before any weight-changing one stays intact."""
        require_attached(self)
        for i, member in enumerate(self.members):
            try:
                member.merge()
            except TokentuneError as err:
                done = f"; members 0..{i - 1} were already merged into the in-memory model" if i else ""
                raise TokentuneError(f"stack member {i} ({member.name}) cannot be merged: {err.what}{done}",
                                     where=err.where, fix=err.fix) from None

    @contextlib.contextmanager
    def disabled(self):
        """Every member switched off at once: the base model (a reference model without a copy)."""
        require_attached(self)
        lacking = [m.name for m in self.members if getattr(m, "disabled", None) is None]
        if lacking:
            raise TokentuneError(f"stack members {lacking} cannot be switched off, so the stack cannot act as the "
                                 "reference model", where="adapter.adapters",
                                 fix="use members that can (lora, prompt_tuning, prefix_tuning, ...)")
        with contextlib.ExitStack() as stack:
            for m in self.members:
                stack.enter_context(m.disabled())
            yield

    # --- delegated hooks --------------------------------------------------------------------
    def prepare_data(self, splits, data_cfg, tokenizer, is_main: bool):
        for m in self.members:
            if hasattr(m, "prepare_data"):
                splits = m.prepare_data(splits, data_cfg, tokenizer, is_main=is_main)
        return splits

    def before_batch(self, batch: dict) -> None:
        for m in self.members:
            if hasattr(m, "before_batch"):
                m.before_batch(batch)

    def after_batch(self) -> None:
        for m in reversed(self.members):
            if hasattr(m, "after_batch"):
                m.after_batch()

    def aux_loss(self, model, view, batch):
        from ..objectives.base import ObjectiveOutput

        parts = [m.aux_loss(model, view, batch) for m in self.members if hasattr(m, "aux_loss")]
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        return ObjectiveOutput(loss_sum=sum(p.loss_sum for p in parts), weight_sum=sum(p.weight_sum for p in parts))

    def aux_weight_total(self, batch: dict):
        return sum((m.aux_weight_total(batch) for m in self.members if hasattr(m, "aux_weight_total")), 0.0)

    def _train_hook(self, name: str, *args) -> list:
        return [getattr(m, name)(*args) for m in self._trainable() if hasattr(m, name)]

    def on_train_start(self, trainer) -> None:
        self._train_hook("on_train_start", trainer)

    def on_step_start(self, trainer, step: int) -> None:
        self._train_hook("on_step_start", trainer, step)

    def after_backward(self, trainer, step: int, stats: dict) -> None:
        self._train_hook("after_backward", trainer, step, stats)

    def after_optimizer_step(self, trainer, step: int) -> None:
        self._train_hook("after_optimizer_step", trainer, step)

    def should_stop(self, trainer, step: int) -> bool:
        return any(self._train_hook("should_stop", trainer, step))

    def finalize(self, trainer) -> None:
        self._train_hook("finalize", trainer)
