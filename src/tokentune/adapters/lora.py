"""LoRA (Hu et al. 2021): frozen base, trainable low-rank updates B @ A on chosen projections; saved in PEFT's
adapter format and mergeable into the base weights."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from ..errors import TokentuneError, did_you_mean
from ..models.anatomy import ADAPTER_PREFIX, ROLES
from ..registry import register
from . import peft_format
from .base import ParamGroup
from .lora_layer import LoraLinear, linear_shape
from .state_io import copy_state, require_attached, tensor_state


class LoraConfig(BaseModel):
    """LoRA options.

    targets       projection roles (q, k, v, o, gate, up, down). None = every role the model's family has
                  (GPT-2 and BERT have no gate, so it is skipped); a role named explicitly must exist. On GPT-2,
                  q, k and v are the one fused c_attn, which gets one LoRA.
    target_regex  instead of roles: full module names matched with re.fullmatch (PEFT's rule for a string),
                  e.g. '.*\\.(q|v)_proj'. Setting both targets and target_regex is an error.
    rslora        scale alpha / sqrt(r) instead of alpha / r.
    train_head    None: task heads that transformers initialises fresh (a classifier or score layer) train,
                  the causal LM head stays frozen; true: task heads train (error if the model has none);
                  false: no head trains. Trained heads are saved as PEFT `modules_to_save`.
    bias, init    fixed to PEFT's defaults ("none": biases stay frozen; A kaiming-uniform, B zero).
    """

    model_config = ConfigDict(extra="forbid")
    name: Literal["lora"] = "lora"
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] | None = None
    target_regex: str | None = None
    rslora: bool = False
    bias: Literal["none"] = "none"
    init: Literal["default"] = "default"
    train_head: bool | None = None

    @field_validator("targets")
    @classmethod
    def _known_roles(cls, targets):
        if targets is not None:
            if not targets:
                raise TokentuneError("targets is empty", where="adapter.targets",
                                     fix=f"name roles from {', '.join(ROLES)}, or omit targets for all of them")
            for role in targets:
                if role not in ROLES:
                    raise TokentuneError(f"unknown projection role {role!r}", where="adapter.targets",
                                         fix=did_you_mean(role, ROLES))
        return targets

    @field_validator("target_regex")
    @classmethod
    def _regex_compiles(cls, pattern):
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise TokentuneError(f"target_regex {pattern!r} is not a regex: {exc}", where="adapter.target_regex",
                                     fix="it is matched against full module names, e.g. '.*\\.(q|v)_proj'") from None
        return pattern

    @model_validator(mode="after")
    def _one_way_to_target(self):
        if self.targets is not None and self.target_regex is not None:
            raise TokentuneError("set adapter.targets or adapter.target_regex, not both", where="adapter",
                                 fix="roles for the usual projections, a regex for anything else")
        return self


@register("adapter", "lora", config=LoraConfig,
          description="LoRA: low-rank updates on the projections, PEFT adapter format, mergeable")
class LoraAdapter:
    name = "lora"

    def __init__(self, config: LoraConfig | None = None):
        self.config = config or LoraConfig()
        self._attached = self._merged = False

    # --- attach -----------------------------------------------------------------------------
    def attach(self, model: nn.Module, view) -> None:
        if self._attached:
            raise TokentuneError("the lora adapter is already attached", fix="create a new adapter for another model")
        cfg = self.config
        targets = self._targets(model, view)
        heads = self._heads(view)
        for name in targets:
            head = next((h for h in heads if name == h or name.startswith(h + ".")), None)
            if head is not None:
                raise TokentuneError(f"{name} is inside the task head {head!r}, which trains in full",
                                     where="adapter.target_regex",
                                     fix="exclude the head from target_regex, or set train_head: false")
        self._peft_targets = cfg.target_regex or peft_format.target_suffixes(
            list(targets), [n for n, _ in model.named_modules()])

        for n, p in model.named_parameters():
            if not n.startswith(ADAPTER_PREFIX):  # other adapters' modules (tokentune_*) are theirs to freeze
                p.requires_grad_(False)
        self.wrappers: dict[str, LoraLinear] = {}
        for name, module in targets.items():
            wrapper = LoraLinear(module, name, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, wrapper)
            self.wrappers[name] = wrapper
        self._lora_params = [(f"{n}.lora_{ab}.weight", getattr(w, f"lora_{ab}").weight)
                             for n, w in self.wrappers.items() for ab in "AB"]
        self._head_params = [(f"{h}.{n}", p) for h, m in heads.items() for n, p in m.named_parameters()]
        for _, p in self._head_params:
            p.requires_grad_(True)
        self.heads = list(heads)
        self.model, self.view = model, view
        self._attached = True

    def _targets(self, model: nn.Module, view) -> dict[str, nn.Module]:
        cfg = self.config
        if cfg.target_regex is not None:
            found = {n: m for n, m in model.named_modules()
                     if n and not n.startswith(ADAPTER_PREFIX) and re.fullmatch(cfg.target_regex, n)}
            if not found:
                linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
                raise TokentuneError(f"target_regex {cfg.target_regex!r} matches no module",
                                     where="adapter.target_regex",
                                     fix="it must match whole module names, like: " + ", ".join(linear[:3]))
        else:
            # Explicit roles must exist (modules_for_roles raises); the default takes what the family has.
            found = view.modules_for_roles(cfg.targets if cfg.targets is not None else view.roles)
        tied = view.embed_tokens.weight
        for name, module in found.items():
            linear_shape(module, name)
            if module.weight is tied:
                raise TokentuneError(f"{name} shares its weight with the input embedding (tied), so LoRA on it "
                                     "could not be merged", where="adapter.target_regex", fix=f"exclude {name}")
        return found

    def _heads(self, view) -> dict[str, nn.Module]:
        if self.config.train_head is False:
            return {}
        heads = view.task_heads
        if self.config.train_head and not heads:
            raise TokentuneError(f"train_head is true but {type(view.model).__name__} has no task head",
                                 where="adapter.train_head",
                                 fix="the causal LM head stays frozen under LoRA; use the freeze adapter "
                                     "(include_head: true) to train it")
        return heads

    # --- training state ---------------------------------------------------------------------
    def _live(self) -> None:
        require_attached(self)
        if self._merged:
            raise TokentuneError("the lora adapter was merged into the base weights; it has no separate state now",
                                 fix="save or checkpoint before merge()")

    def param_groups(self) -> list[ParamGroup]:
        self._live()
        groups = [ParamGroup("lora", list(self._lora_params))]
        if self._head_params:
            groups.append(ParamGroup("head", list(self._head_params)))
        return groups

    def state_dict(self):
        self._live()
        return tensor_state(self._lora_params + self._head_params)

    def load_state_dict(self, state) -> None:
        self._live()
        copy_state(self._lora_params + self._head_params, state, source="lora adapter state")

    # --- PEFT artefact ----------------------------------------------------------------------
    def save(self, out_dir: Path, base_ref: str) -> None:
        self._live()
        cfg = self.config
        config = {
            "peft_type": "LORA",
            "task_type": peft_format.task_type(self.model),
            "base_model_name_or_path": base_ref,
            "revision": None,
            "inference_mode": True,
            "r": cfg.r,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "use_rslora": cfg.rslora,
            "target_modules": self._peft_targets,
            "fan_in_fan_out": any(w.fan_in_fan_out for w in self.wrappers.values()),
            "bias": "none",
            "init_lora_weights": True,
            "use_dora": False,
            "modules_to_save": self.heads or None,
        }
        peft_format.write(Path(out_dir), config, self.state_dict())

    def load(self, in_dir: Path) -> None:
        """Read a PEFT LoRA adapter (ours or PEFT's) into the attached adapter; its r, alpha and rslora must
        equal this config's, its modules the attached ones."""
        self._live()
        config, state = peft_format.read(Path(in_dir))
        cfg, where = self.config, str(Path(in_dir) / peft_format.CONFIG)
        theirs = {"r": config.get("r"), "alpha": config.get("lora_alpha"), "rslora": bool(config.get("use_rslora"))}
        ours = {"r": cfg.r, "alpha": cfg.alpha, "rslora": cfg.rslora}
        differ = {k: v for k, v in theirs.items() if v != ours[k]}
        if differ:
            mine = {k: ours[k] for k in differ}
            raise TokentuneError(f"the adapter was trained with {differ}, this one is configured with {mine}",
                                 where=where,
                                 fix="set " + " ".join(f"adapter.{k}={v}" for k, v in differ.items()))
        saved = {k.rsplit(".lora_", 1)[0] for k in state if ".lora_" in k}
        if saved != set(self.wrappers):
            raise TokentuneError(
                f"the adapter wraps {len(saved)} modules, this one {len(self.wrappers)}; they differ in "
                f"{sorted(saved ^ set(self.wrappers))[:3]}", where=where,
                fix=f"target the same modules (its target_modules: {config.get('target_modules')!r})")
        copy_state(self._lora_params + self._head_params, state, source=str(Path(in_dir) / peft_format.WEIGHTS))

    @contextlib.contextmanager
    def disabled(self):
        """The base model's computation while inside (DPO's reference model, no second copy in memory)."""
        self._live()
        for w in self.wrappers.values():
            w.disabled = True
        try:
            yield
        finally:
            for w in self.wrappers.values():
                w.disabled = False

    def merge(self) -> None:
        """Fold scale * B @ A into each base weight and put the plain base layer back in its place."""
        self._live()
        for name, wrapper in self.wrappers.items():
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent), child, wrapper.merge_into_base())
        self._merged = True
