"""LT-SFT (Ansell et al. 2022): lottery-ticket sparse fine-tuning. Inside one trainer run, each iteration trains
every maskable parameter (phase 1), keeps the K entries that moved most from the pretrained values, resets the
model to the iteration's starting values, and trains again with gradients masked to those entries (phase 2).
The artefact is a sparse difference vector (sparse_diff.py) that composes with others by addition."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import TokentuneError
from ..registry import register
from .base import ParamGroup
from .sparse_diff import SparseDiff
from .state_io import copy_state, require_attached, tensor_state


class LtSftConfig(BaseModel):
    """LT-SFT options (names follow the reference code's SftArguments).

    ft_params_num            K, the number of entries the diff may change (wins over the proportion)
    ft_params_proportion     K as a share of the maskable entries when ft_params_num is unset (reference: 0.01)
    n_ft_iterations          selection iterations; iteration i adds K/n new entries (the first K mod n add one more)
    full_ft_fraction         share of each iteration's steps spent in phase 1 (full fine-tuning); the reference
                             scripts give both phases the same budget, so 0.5. Each phase gets at least one step.
    full_l1_reg, sparse_l1_reg   lambda of the L1 pull toward the pretrained values, lambda * sum|theta - theta0| / N
                             (N = every parameter of the model), in phase 1 and phase 2
    apply_reg_to_sparse_only the L1 term covers only maskable parameters, not the task head
    freeze_embeddings        embedding tables neither train nor enter the diff (a tied LM head with them)
    freeze_layer_norm        norm weights and biases neither train nor enter the diff (the reference scripts'
                             --freeze_layer_norm)
    train_head               None: a task head that transformers initialises fresh (classifier, score) trains in
                             full and is saved as absolute values; true: the same, error if there is none; false:
                             it stays frozen. Every other parameter (an untied LM head too) is maskable.
    lr_schedule              per_phase: each phase restarts warm-up and decay over its own steps, as the reference's
                             fresh scheduler per phase; whole_run: the run's one schedule continues across phases
    drop_below               entries whose |change| is at most this are left out of the saved diff (reference 1e-7)
    base_diffs               sparse diffs applied to the base model before training (a source-language SFT under a
                             task SFT, the reference's --lang_ft); their absolute values are not applied
    """

    model_config = ConfigDict(extra="forbid")
    name: Literal["lt_sft"] = "lt_sft"
    ft_params_num: int | None = Field(None, gt=0)
    ft_params_proportion: float = Field(0.01, gt=0, le=1)
    n_ft_iterations: int = Field(1, ge=1)
    full_ft_fraction: float = Field(0.5, gt=0, lt=1)
    full_l1_reg: float = Field(0.0, ge=0)
    sparse_l1_reg: float = Field(0.0, ge=0)
    apply_reg_to_sparse_only: bool = False
    freeze_embeddings: bool = False
    freeze_layer_norm: bool = False
    train_head: bool | None = None
    lr_schedule: Literal["per_phase", "whole_run"] = "per_phase"
    drop_below: float = Field(1e-7, ge=0)
    base_diffs: list[str] = []


@dataclass(frozen=True)
class Phase:
    iteration: int
    phase: int  # 1: full fine-tuning, 2: sparse fine-tuning
    start: int  # first optimiser step
    steps: int


def phase_plan(total_steps: int, iterations: int, full_fraction: float) -> list[Phase]:
    """Split the run's steps into iterations (the first total mod n get one more step), each into two phases."""
    if total_steps < 2 * iterations:
        raise TokentuneError(f"lt_sft needs at least 2 steps per iteration: {iterations} iteration(s), "
                             f"{total_steps} step(s)", where="train.max_steps / train.epochs",
                             fix="train longer or lower adapter.n_ft_iterations")
    plan, start = [], 0
    for i in range(iterations):
        steps = total_steps // iterations + (1 if i < total_steps % iterations else 0)
        full = min(steps - 1, max(1, round(steps * full_fraction)))
        plan += [Phase(i, 1, start, full), Phase(i, 2, start + full, steps - full)]
        start += steps
    return plan


def top_k_masks(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Exactly the k largest scores over all tensors together (negative = not eligible). Ties at the threshold
    go to the entries that come first (tensor order, then flat order), so the choice is deterministic."""
    flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
    if not torch.isfinite(flat).all():
        raise TokentuneError("a parameter changed to inf or NaN during phase 1", where="train.lr",
                             fix="lower the learning rate or set train.max_grad_norm")
    eligible = int((flat >= 0).sum())
    if k > eligible:
        raise TokentuneError(f"asked to select {k} entries but only {eligible} are not selected yet",
                             where="adapter.ft_params_num")
    threshold = flat.kthvalue(flat.numel() - k + 1).values
    chosen = flat > threshold
    ties = (flat == threshold).nonzero().squeeze(1)[: k - int(chosen.sum())]
    chosen[ties] = True
    out, offset = {}, 0
    for name, s in scores.items():
        out[name] = chosen[offset: offset + s.numel()].view(s.shape)
        offset += s.numel()
    return out


@register("adapter", "lt_sft", config=LtSftConfig,
          description="LT-SFT: full fine-tuning, keep the K most-changed entries, reset, train only those; "
                      "a composable sparse diff")
class LtSftAdapter:
    name = "lt_sft"

    def __init__(self, config: LtSftConfig | None = None):
        self.config = config or LtSftConfig()
        self._attached = False

    # --- attach -------------------------------------------------------------------------------
    def attach(self, model: nn.Module, view) -> None:
        if self._attached:
            raise TokentuneError("the lt_sft adapter is already attached", fix="create a new adapter for another model")
        cfg = self.config
        for path in cfg.base_diffs:  # theta0 is the base with these applied (the reference's --lang_ft)
            SparseDiff.load(Path(path)).apply(model, with_absolute=False)
        heads = {id(p) for m in self._heads(view).values() for p in m.parameters()}
        frozen = set()
        if cfg.train_head is False:
            frozen |= {id(p) for m in view.task_heads.values() for p in m.parameters()}
        if cfg.freeze_embeddings:
            frozen |= {id(p) for m in view.embeddings.values() for p in m.parameters()}
        if cfg.freeze_layer_norm:
            frozen |= {id(p) for m in model.modules() if "norm" in type(m).__name__.lower() for p in m.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) not in frozen)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # a tied weight once
        self._maskable = [(n, p) for n, p in trainable if id(p) not in heads]
        self._head = [(n, p) for n, p in trainable if id(p) in heads]
        self.num_maskable = sum(p.numel() for _, p in self._maskable)
        if not self.num_maskable:
            raise TokentuneError("lt_sft has no maskable parameter left", where="adapter",
                                 fix="unset freeze_embeddings / freeze_layer_norm")
        self.k = cfg.ft_params_num or int(cfg.ft_params_proportion * self.num_maskable)
        if not 0 < self.k <= self.num_maskable:
            raise TokentuneError(f"K = {self.k} but the model has {self.num_maskable} maskable entries",
                                 where="adapter.ft_params_num / ft_params_proportion",
                                 fix=f"choose K between 1 and {self.num_maskable}")
        self._theta0 = {n: p.detach().clone() for n, p in trainable}
        self._num_params = sum(p.numel() for p in model.parameters())  # the L1 normaliser, as the reference
        self.model, self.view = model, view
        self.iteration, self.phase = 0, 1
        self.mask: dict[str, torch.Tensor] | None = None
        self._start: dict[str, torch.Tensor] | None = None  # values at the start of iteration >= 1
        self._plan: list[Phase] | None = None
        self._diff: SparseDiff | None = None  # the diff the model was set to by finalize() or load()
        self._attached = True

    def _heads(self, view) -> dict[str, nn.Module]:
        if self.config.train_head is False:
            return {}
        heads = view.task_heads
        if self.config.train_head and not heads:
            raise TokentuneError(f"train_head is true but {type(view.model).__name__} has no task head",
                                 where="adapter.train_head", fix="omit train_head (the LM head is maskable)")
        return heads

    def param_groups(self) -> list[ParamGroup]:
        require_attached(self)
        groups = [ParamGroup("lt_sft", list(self._maskable))]
        if self._head:
            groups.append(ParamGroup("head", list(self._head)))
        return groups

    # --- training hooks -----------------------------------------------------------------------
    def on_train_start(self, trainer) -> None:
        cfg, t = self.config, trainer.cfg.train
        self._plan = phase_plan(trainer.total_steps, cfg.n_ft_iterations, cfg.full_ft_fraction)
        if cfg.lr_schedule == "per_phase":
            from ..engine.optim import lr_lambda

            parts = [(ph.start, lr_lambda(t.schedule, t.warmup_steps or int(round(t.warmup_ratio * ph.steps)),
                                          ph.steps)) for ph in self._plan]

            def factor(step: int) -> float:
                start, f = next(p for p in reversed(parts) if step >= p[0])
                return f(step - start)

            sched = trainer.scheduler
            sched.lr_lambdas = [factor] * len(sched.lr_lambdas)
            for group, base in zip(trainer.optimizer.param_groups, sched.base_lrs):
                group["lr"] = base * factor(sched.last_epoch)
            sched._last_lr = [g["lr"] for g in trainer.optimizer.param_groups]

    def on_step_start(self, trainer, step: int) -> None:
        target = next(ph for ph in reversed(self._plan) if step >= ph.start)
        now = (self.iteration, self.phase)
        if now == (target.iteration, target.phase):
            return
        following = (self.iteration, 2) if self.phase == 1 else (self.iteration + 1, 1)
        if step != target.start or following != (target.iteration, target.phase):
            raise TokentuneError(f"lt_sft state is iteration {now[0]} phase {now[1]} but step {step} belongs to "
                                 f"iteration {target.iteration} phase {target.phase}", where="--resume",
                                 fix="resume with the same train length, batch size and adapter config")
        if target.phase == 2:
            self._select_and_reset(target.iteration)
        else:
            self._start = {n: p.detach().clone() for n, p in self._maskable + self._head}
            self.iteration, self.phase = target.iteration, 1
        trainer.optimizer.state.clear()  # a fresh optimiser per phase, as the reference
        self._diff = None

    def _select_and_reset(self, iteration: int) -> None:
        cfg = self.config
        new = self.k // cfg.n_ft_iterations + (1 if iteration < self.k % cfg.n_ft_iterations else 0)
        with torch.no_grad():
            scores = {}
            for n, p in self._maskable:
                score = (p.detach().float() - self._theta0[n].float()).abs()
                if self.mask is not None:
                    score[self.mask[n]] = -1.0  # already selected in an earlier iteration
                scores[n] = score
            chosen = top_k_masks(scores, new)
            self.mask = {n: m if self.mask is None else m | self.mask[n] for n, m in chosen.items()}
            start = self._start or self._theta0
            for n, p in self._maskable + self._head:
                p.copy_(start[n])
        self._empty = {n: not bool(m.any()) for n, m in self.mask.items()}
        self.phase = 2

    def after_backward(self, trainer, step: int, stats: dict) -> None:
        cfg = self.config
        lam = cfg.full_l1_reg if self.phase == 1 else cfg.sparse_l1_reg
        if lam:  # d/dtheta of lam * sum|theta - theta0| / N, added once per optimiser step
            params = self._maskable if cfg.apply_reg_to_sparse_only else self._maskable + self._head
            with torch.no_grad():
                for n, p in params:
                    pull = torch.sign(p.detach() - self._theta0[n]) * (lam / self._num_params)
                    p.grad = pull.to(p.dtype) if p.grad is None else p.grad.add_(pull)
        if self.phase == 2:
            for n, p in self._maskable:
                if p.grad is None:
                    continue
                if self._empty[n]:
                    p.grad = None  # AdamW skips it: no update, no weight decay
                else:
                    p.grad.mul_(self.mask[n])

    def after_optimizer_step(self, trainer, step: int) -> None:
        # Masked gradients leave unselected entries unmoved, except AdamW's decoupled weight decay: undo it there.
        if self.phase == 2 and any(g["weight_decay"] for g in trainer.optimizer.param_groups):
            with torch.no_grad():
                for n, p in self._maskable:
                    if not self._empty[n]:
                        p.copy_(torch.where(self.mask[n], p, self._theta0[n]))

    def finalize(self, trainer) -> None:
        """Set the model to exactly theta0 + the saved diff, so the final evaluation sees the artefact."""
        last = self._plan[-1]
        if (self.iteration, self.phase) != (last.iteration, last.phase):
            raise TokentuneError(f"the run ended in iteration {self.iteration} phase {self.phase}, before the last "
                                 "sparse phase", where="train", fix="let the run reach its configured length")
        self._set_to(self.diff())

    # --- the diff -------------------------------------------------------------------------------
    def diff(self, base_ref: str | None = None) -> SparseDiff:
        """phi = theta - theta0 on the selected entries (|change| > drop_below), head as absolute values."""
        require_attached(self)
        if self.mask is None:
            raise TokentuneError("lt_sft has not selected its entries yet (the run is still in phase 1)",
                                 fix="train through the first phase boundary before saving")
        if self._diff is not None:
            diff = self._diff
        else:
            diff = SparseDiff.between({n: self._theta0[n] for n, _ in self._maskable}, dict(self._maskable),
                                      mask=self.mask, drop_below=self.config.drop_below, absolute=dict(self._head))
        classifier = bool(self.view.task_heads)
        meta = {"adapter": self.name, "task": "classification" if classifier else "causal", "k": self.k,
                "num_maskable": self.num_maskable, "config": self.config.model_dump(mode="json")}
        if classifier:
            meta["id2label"] = {str(i): v for i, v in self.model.config.id2label.items()}
        if base_ref is not None:
            meta["base_model_name_or_path"] = base_ref
        return SparseDiff(diff.deltas, diff.shapes, diff.absolute, meta)

    def _set_to(self, diff: SparseDiff) -> None:
        with torch.no_grad():
            for n, p in self._maskable:
                p.copy_(self._theta0[n])
        diff.apply(self.model)
        self._diff = diff

    def save(self, out_dir: Path, base_ref: str) -> None:
        """sparse_diff.safetensors + sparse_diff.json (see sparse_diff.py)."""
        self.diff(base_ref).save(Path(out_dir))

    def load(self, in_dir: Path) -> None:
        """Set the model to theta0 + the diff in `in_dir`; its support becomes the mask."""
        require_attached(self)
        diff = SparseDiff.load(Path(in_dir))
        maskable, head = dict(self._maskable), {n for n, _ in self._head}
        stray = sorted(set(diff.deltas) - set(maskable)) + sorted(set(diff.absolute) ^ head)
        if stray:
            raise TokentuneError(f"the diff does not fit this adapter's parameters, e.g. {stray[:3]}",
                                 where=str(in_dir), fix="attach lt_sft with the config and base it was trained with")
        self._set_to(diff)
        self.mask = {n: torch.zeros(p.shape, dtype=torch.bool, device=p.device) for n, p in self._maskable}
        for n, (idx, _) in diff.deltas.items():
            self.mask[n].view(-1)[idx.to(self.mask[n].device)] = True
        self._empty = {n: not bool(m.any()) for n, m in self.mask.items()}
        self.iteration, self.phase = self.config.n_ft_iterations - 1, 2

    def merge(self) -> None:
        """Nothing to fold: the diff is applied to the model's own weights."""
        require_attached(self)

    # --- checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable values, the phase, the mask once selected, and the iteration's start values (iteration >= 1)."""
        require_attached(self)
        state = {f"param/{n}": t for n, t in tensor_state(self._maskable + self._head).items()}
        state["lt_sft/phase"] = torch.tensor([self.iteration, self.phase], dtype=torch.int64)
        for n, m in (self.mask or {}).items():
            state[f"mask/{n}"] = m.contiguous()
        for n, t in (self._start or {}).items():
            state[f"start/{n}"] = t.contiguous()
        return state

    def load_state_dict(self, state) -> None:
        require_attached(self)
        own = self._maskable + self._head
        part = {k.split("/", 1)[0] for k in state}
        if part - {"param", "lt_sft", "mask", "start"} or "lt_sft/phase" not in state:
            raise TokentuneError("this state was not written by the lt_sft adapter", where="adapter state",
                                 fix="resume with the adapter the run was trained with")
        copy_state(own, {k[6:]: v for k, v in state.items() if k.startswith("param/")}, source="lt_sft state")
        self.iteration, self.phase = (int(x) for x in state["lt_sft/phase"].tolist())
        masks = {k[5:]: v.bool() for k, v in state.items() if k.startswith("mask/")}
        if masks:
            self.mask = {n: torch.zeros(p.shape, dtype=torch.bool, device=p.device) for n, p in self._maskable}
            copy_state(list(self.mask.items()), masks, source="lt_sft mask")
            self._empty = {n: not bool(m.any()) for n, m in self.mask.items()}
        elif self.phase == 2:
            raise TokentuneError("lt_sft state is in phase 2 but holds no mask", where="adapter state")
        else:
            self.mask = None
        starts = {k[6:]: v for k, v in state.items() if k.startswith("start/")}
        self._start = None
        if starts:
            self._start = {n: torch.empty_like(p) for n, p in own}
            copy_state(list(self._start.items()), starts, source="lt_sft start values")
        self._diff = None
