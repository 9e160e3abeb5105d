"""DSEE (Chen et al. 2021): the weight update of chosen projections is low-rank plus a very sparse residual,
ΔW = c (UV + S₂) with S₂ living on N entries chosen from the pretrained weight (GreBsmo), and the final
weights are pruned (unstructured magnitude masks on the pretrained weights, or structured head / FFN-neuron
pruning), with training continuing after the pruning to recover."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import TokentuneError, did_you_mean
from ..models.anatomy import ROLES
from ..registry import register
from .base import ParamGroup
from .dsee_layer import DseeLinear, oriented
from .dsee_phases import PruningPhases
from .dsee_support import broadcast_from_first_rank, select_support
from .lora_layer import linear_shape
from .state_io import check_meta, read_tensors, require_attached, write_meta, write_tensors

WEIGHTS = "trainable.safetensors"
_UNSTRUCTURED = ("sparsity", "prune_score", "other_sparsity")
_STRUCTURED = ("head_sparsity", "ffn_sparsity", "l1_penalty")


class DseeConfig(BaseModel):
    """DSEE options (defaults: the paper's BERT-base setting r 16, N 64, and 50 % unstructured sparsity).

    r, alpha           rank of UV and the scale numerator: c = alpha / r multiplies both UV and S₂
    num_sparse         N, the entries of S₂ per targeted matrix (0: low-rank only)
    targets            projection roles that get UV + S₂ (q, k, v, o, gate, up, down); GPT-2's fused c_attn
                       (q, k and v together) is one matrix
    sparse_init        how Ω is chosen from the pretrained weight: grebsmo (robust-PCA residual, the paper),
                       magnitude (largest |W|, the code's "omp"), random (the code's "rp")
    grebsmo_iters, grebsmo_rank_step, grebsmo_inner, grebsmo_threshold
                       the official code's heuristics: 100 outer iterations growing the rank by 5, 2 inner
                       alternations, |S| < 0.01 zeroed
    grebsmo_max_rank   the rank stops growing at this fraction of min(m, n) (at full rank S vanishes)
    pruning            unstructured | structured | none (Phase II)
    prune_at           fraction of the run's optimiser steps after which Phase II prunes; the rest of the run is
                       Phase III (recovery). 1.0 prunes after the last step (no recovery)
    sparsity           unstructured: fraction of the targeted matrices' pretrained entries set to 0, chosen
                       globally over all of them
    prune_score        unstructured: rank entries by |W + c(UV + S₂)| (merged, the paper's Algorithm 2) or by
                       |c(UV + S₂)| (update, the released script's "ABS" mode)
    other_sparsity     unstructured: fraction of every other projection's pretrained entries pruned by |W|,
                       globally over them (the code prunes key/dense with its own ratio); 0 keeps them dense
    head_sparsity      structured: fraction of attention heads removed in every block (lowest |ξ|)
    ffn_sparsity       structured: fraction of FFN neurons removed in every block (EarlyBERT's 40 %)
    l1_penalty         structured: λ of the λ‖ξ‖₁ term trained with ξ before the pruning
    train_head         None: task heads that transformers initialises fresh (classifier) train, the LM head stays
                       frozen; true: task heads train (error without one); false: none
    """

    model_config = ConfigDict(extra="forbid")
    name: Literal["dsee"] = "dsee"
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    num_sparse: int = Field(64, ge=0)
    targets: list[str] = ["q", "v"]
    sparse_init: Literal["grebsmo", "magnitude", "random"] = "grebsmo"
    grebsmo_iters: int = Field(100, gt=0)
    grebsmo_rank_step: int = Field(5, gt=0)
    grebsmo_inner: int = Field(2, gt=0)
    grebsmo_threshold: float = Field(0.01, ge=0)
    grebsmo_max_rank: float = Field(2 / 3, gt=0, lt=1)
    pruning: Literal["unstructured", "structured", "none"] = "unstructured"
    prune_at: float = Field(0.5, ge=0, le=1)
    sparsity: float = Field(0.5, ge=0, lt=1)
    prune_score: Literal["merged", "update"] = "merged"
    other_sparsity: float = Field(0.0, ge=0, lt=1)
    head_sparsity: float = Field(0.25, ge=0, lt=1)
    ffn_sparsity: float = Field(0.4, ge=0, lt=1)
    l1_penalty: float = Field(1e-4, ge=0)
    train_head: bool | None = None

    @field_validator("targets")
    @classmethod
    def _known_roles(cls, targets):
        if not targets:
            raise TokentuneError("targets is empty", where="adapter.targets",
                                 fix=f"name roles from {', '.join(ROLES)} (the paper: q, v)")
        for role in targets:
            if role not in ROLES:
                raise TokentuneError(f"unknown projection role {role!r}", where="adapter.targets",
                                     fix=did_you_mean(role, ROLES))
        return targets

    @model_validator(mode="after")
    def _options_fit_the_pruning(self):
        # A non-default value for another mode's option is a mistake (a resolved config repeats the defaults).
        own = {"unstructured": _UNSTRUCTURED + ("prune_at",), "structured": _STRUCTURED + ("prune_at",),
               "none": ()}[self.pruning]
        fields = type(self).model_fields
        stray = sorted(k for k in _UNSTRUCTURED + _STRUCTURED + ("prune_at",)
                       if k not in own and getattr(self, k) != fields[k].default)
        if stray:
            raise TokentuneError(f"{', '.join(stray)} do(es) nothing with pruning: {self.pruning}",
                                 where="adapter", fix="remove them, or choose the pruning they belong to")
        if self.pruning == "structured" and not (self.head_sparsity or self.ffn_sparsity):
            raise TokentuneError("structured pruning with head_sparsity 0 and ffn_sparsity 0 prunes nothing",
                                 where="adapter", fix="set a fraction, or pruning: none")
        return self


@register("adapter", "dsee", config=DseeConfig,
          description="DSEE: low-rank + sparse (GreBsmo support) updates, then pruning of the final weights")
class DseeAdapter(PruningPhases):
    name = "dsee"

    def __init__(self, config: DseeConfig | None = None):
        self.config = config or DseeConfig()
        self._attached = self._merged = False
        self.pruned = False

    # --- attach -----------------------------------------------------------------------------
    def attach(self, model: nn.Module, view) -> None:
        if self._attached:
            raise TokentuneError("the dsee adapter is already attached", fix="create a new adapter for another model")
        cfg = self.config
        targets = view.modules_for_roles(cfg.targets)  # raises for a role the family lacks
        for name, module in targets.items():
            n_in, n_out = linear_shape(module, name)
            if cfg.num_sparse > n_in * n_out:
                raise TokentuneError(f"num_sparse {cfg.num_sparse} exceeds the {n_out}x{n_in} entries of {name}",
                                     where="adapter.num_sparse", fix=f"use at most {n_in * n_out}")
        heads = self._heads(view)
        for p in model.parameters():
            p.requires_grad_(False)

        grebsmo = {"iters": cfg.grebsmo_iters, "rank_step": cfg.grebsmo_rank_step, "inner": cfg.grebsmo_inner,
                   "threshold": cfg.grebsmo_threshold, "max_rank_fraction": cfg.grebsmo_max_rank}
        supports = select_support([oriented(m.weight.detach(), isinstance(m, Conv1D)) for m in targets.values()],
                                  cfg.num_sparse, cfg.sparse_init, grebsmo)
        broadcast_from_first_rank(supports)
        self.wrappers: dict[str, DseeLinear] = {}
        for (name, module), support in zip(targets.items(), supports):
            wrapper = DseeLinear(module, name, cfg.r, cfg.alpha, support)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, wrapper)
            self.wrappers[name] = wrapper
        # Modules whose pretrained weight Phase II may prune (the wrapped ones hold theirs as base_layer).
        self.prunable = {n: w.base_layer for n, w in self.wrappers.items()}
        if cfg.pruning == "unstructured" and cfg.other_sparsity:
            others = {n: m for n, m in view.modules_for_roles(view.roles).items() if n not in targets}
            if not others:
                raise TokentuneError("other_sparsity is set but every projection is a target",
                                     where="adapter.other_sparsity", fix="set other_sparsity: 0")
            self.others = others
            self.prunable.update(others)
        else:
            self.others = {}
        self.masks: dict = {}
        self.structured = self._attach_structured(model, view)

        self._dsee_params = [(f"{n}.{k}", p) for n, w in self.wrappers.items()
                             for k, p in (("lora_A.weight", w.lora_A.weight), ("lora_B.weight", w.lora_B.weight),
                                          ("sparse_values", w.sparse_values))]
        self._coef_params = self.structured.named_parameters() if self.structured else []
        self._head_params = [(f"{h}.{n}", p) for h, m in heads.items() for n, p in m.named_parameters()]
        for _, p in self._dsee_params + self._coef_params + self._head_params:
            p.requires_grad_(True)
        self.heads = list(heads)
        self.model, self.view = model, view
        self._attached = True

    def _heads(self, view) -> dict[str, nn.Module]:
        if self.config.train_head is False:
            return {}
        heads = view.task_heads
        if self.config.train_head and not heads:
            raise TokentuneError(f"train_head is true but {type(view.model).__name__} has no task head",
                                 where="adapter.train_head", fix="omit train_head (the causal LM head stays frozen)")
        return heads

    # --- training state ---------------------------------------------------------------------
    def _live(self) -> None:
        require_attached(self)
        if self._merged:
            raise TokentuneError("the dsee adapter was merged into the base weights; it has no separate state now",
                                 fix="save or checkpoint before merge()")

    def param_groups(self) -> list[ParamGroup]:
        self._live()
        groups = [ParamGroup("dsee", list(self._dsee_params))]
        if self._coef_params:  # ξ: no weight decay, its only regulariser is the L1 term
            groups.append(ParamGroup("dsee_coef", list(self._coef_params), weight_decay=0.0))
        if self._head_params:
            groups.append(ParamGroup("head", list(self._head_params)))
        return groups

    # --- artefact -----------------------------------------------------------------------------
    def save(self, out_dir: Path, base_ref: str) -> None:
        """trainable.safetensors (U, V, S₂ values and Ω, ξ, the head, the packed pruning masks) and the config."""
        self._live()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_tensors(out_dir / WEIGHTS, self.state_dict())
        write_meta(out_dir, self.name, base_ref, self.config, modules=sorted(self.wrappers), pruned=self.pruned)

    def load(self, in_dir: Path) -> None:
        """Read what save() wrote; r, alpha, num_sparse, targets and pruning must equal this config's."""
        self._live()
        in_dir = Path(in_dir)
        check_meta(in_dir, self.name, self.config, ("r", "alpha", "num_sparse", "targets", "pruning"), required=True)
        self.load_state_dict(read_tensors(in_dir / WEIGHTS), source=str(in_dir / WEIGHTS))

    def merge(self) -> None:
        """Fold W ⊙ S₁ + c(UV + S₂) into each targeted weight (dense: S₁ never applies to the update), then ξ
        into the o / down weights, and put the plain layers back. Pruning is a training step (see prune()),
        not part of merging: merged logits equal unmerged ones."""
        self._live()
        for name, wrapper in self.wrappers.items():
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent), child, wrapper.merge_into_base())
        if self.structured:
            self.structured.fold_and_remove(self.model)
        self._merged = True
