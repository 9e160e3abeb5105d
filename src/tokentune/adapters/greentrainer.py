"""GreenTrainer (Huang et al., ICLR 2024): train, in each period, the parameter tensors that promise the most
loss reduction for a backward-pass FLOPs budget ρ_bp derived from the overall target ρ.

At the first step of every period (default: every 2 epochs, the reference code's `interval`), on that step's
real micro-batches: trace the FLOPs model (greentrainer_flops), take one optimiser step from w₀ and read the
gradient g at the new point, I_k = −Σ g_k ⊙ Δw_k (normalised by max |I|), restore weights, gradients, optimiser
state and RNG, then choose the tensors exactly (greentrainer_select) and set requires_grad accordingly.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import TokentuneError
from ..registry import register
from .base import ParamGroup
from .full import FullAdapter, FullConfig
from .greentrainer_flops import TensorCosts, trace_costs
from .greentrainer_select import backward_rho, quantise, reachable, select_tensors, selection_cost
from .state_io import require_attached

MASK_KEY, STEP_KEY = "greentrainer.mask", "greentrainer.selected_at"
LOG_FILE, META_FILE = "greentrainer.jsonl", "greentrainer.json"


class GreenTrainerConfig(BaseModel):
    """GreenTrainer's options.

    rho            target FLOPs of the run (forward + backward) as a fraction of full fine-tuning (0.5 and 0.7
                   in the paper); the backward budget is ρ_bp = ρ(1 + t_fp/t_bp) − t_fp/t_bp (0.05 if ≤ 0)
    interval       re-select every `interval` periods of `interval_unit`, at the period's first step
    interval_unit  "epoch" (reference: every 2 epochs) or "step"
    resolution     Tq: costs are scaled so that Σ(t_dy + t_dw) = Tq and floored to integers (reference 1000)
    """

    model_config = ConfigDict(extra="forbid")
    name: Literal["greentrainer"] = "greentrainer"
    rho: float = Field(0.5, gt=0, le=1)
    interval: int = Field(2, gt=0)
    interval_unit: Literal["epoch", "step"] = "epoch"
    resolution: int = Field(1000, ge=10, le=1_000_000)


def probe_importance(params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                     loss_backward: Callable[[], None]) -> torch.Tensor:
    """I_k = −Σ g_k(w₀ + Δw) ⊙ Δw_k per tensor, with Δw one optimiser step at each group's peak learning rate
    (the scheduled one may be 0 during warm-up). Weights, gradients and optimiser state (moments, step counts,
    learning rates) are restored bit for bit; only `params` may require grad while this runs."""
    w0 = [p.detach().clone() for p in params]
    saved = copy.deepcopy(optimizer.state_dict())
    try:
        for group in optimizer.param_groups:
            group["lr"] = group.get("initial_lr", group["lr"])
        optimizer.zero_grad(set_to_none=True)
        loss_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_backward()  # gradient at w₀ + Δw
        with torch.no_grad():
            out = torch.stack([-(p.grad.double() * (p.double() - w.double())).sum() if p.grad is not None
                               else torch.zeros((), dtype=torch.float64, device=p.device)
                               for p, w in zip(params, w0)])
    finally:
        with torch.no_grad():
            for p, w in zip(params, w0):
                p.copy_(w)
        optimizer.zero_grad(set_to_none=True)
        optimizer.load_state_dict(saved)
    return out.cpu()


@register("adapter", "greentrainer", config=GreenTrainerConfig,
          description="GreenTrainer: periodically train the tensors with the most loss reduction per backward FLOP")
class GreenTrainerAdapter:
    name = "greentrainer"

    def __init__(self, config: GreenTrainerConfig | None = None):
        self.config = config or GreenTrainerConfig()
        self._attached = False
        self.last_selection: dict | None = None

    # --- the adapter protocol: a full fine-tune whose trainable subset the hooks choose ----------
    def attach(self, model: nn.Module, view) -> None:
        """Every tensor trains until the first selection (which needs data: the first step's batch)."""
        if self._attached:
            raise TokentuneError("the greentrainer adapter is already attached",
                                 fix="create a new adapter for another model")
        self._full = FullAdapter(FullConfig())
        self._full.attach(model, view)
        self.model, self.view = model, view
        self._params = list(self._full._params)  # every parameter, a tied weight once
        self._selected_at = -1
        self._attached = True

    def param_groups(self) -> list[ParamGroup]:
        """All tensors, so the optimiser holds each one; frozen ones get no gradient and AdamW skips them."""
        require_attached(self)
        return [ParamGroup("greentrainer", list(self._params))]

    def state_dict(self) -> dict[str, torch.Tensor]:
        require_attached(self)
        mask = torch.tensor([p.requires_grad for _, p in self._params], dtype=torch.uint8)
        return {**self._full.state_dict(), MASK_KEY: mask, STEP_KEY: torch.tensor([self._selected_at])}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        require_attached(self)
        state = dict(state)
        mask, at = state.pop(MASK_KEY, None), state.pop(STEP_KEY, None)
        if mask is None or at is None or mask.numel() != len(self._params):
            raise TokentuneError("saved state lacks GreenTrainer's selection (or it is for another model)",
                                 where="greentrainer adapter state",
                                 fix="resume with the adapter and model that wrote the checkpoint")
        self._full.load_state_dict(state)
        for (_, p), keep in zip(self._params, mask.tolist()):
            p.requires_grad_(bool(keep))
        self._selected_at = int(at.item())

    def save(self, out_dir: Path, base_ref: str) -> None:
        """The whole model (any tensor may have trained), plus the config and last selection (json)."""
        require_attached(self)
        self._full.save(out_dir, base_ref)
        meta = {"adapter": self.name, "config": self.config.model_dump(mode="json"),
                "last_selection": self.last_selection}
        (Path(out_dir) / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")

    def load(self, in_dir: Path) -> None:
        require_attached(self)
        self._full.load(in_dir)

    def merge(self) -> None:
        """Nothing to fold: the trained tensors are the model's own."""
        require_attached(self)

    # --- training hooks --------------------------------------------------------------------
    def on_train_start(self, trainer) -> None:
        if trainer.env.distributed:
            raise TokentuneError(
                "greentrainer changes which tensors require grad during training, which DDP does not allow "
                "(its reducer fixes the set of gradients at wrap time)", where="adapter: greentrainer",
                fix="train greentrainer in one process")

    def on_step_start(self, trainer, step: int) -> None:
        cfg = self.config
        period = cfg.interval * (trainer.schedule.steps_per_epoch if cfg.interval_unit == "epoch" else 1)
        if self._selected_at >= 0 and (step % period or step == self._selected_at):
            return
        device = trainer.env.device
        # The probe must not move the RNG the step's own batches and dropout are drawn from.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self.last_selection = self.select(trainer.s, trainer.micro_batches(step), trainer.optimizer, step)
        if trainer.env.is_main:
            with open(Path(trainer.run_dir) / LOG_FILE, "a") as fh:
                fh.write(json.dumps(self.last_selection) + "\n")
            from ..engine.logging import console

            sel = self.last_selection
            console.print(f"greentrainer step {step}: {sel['selected']}/{sel['tensors']} tensors train, "
                          f"backward FLOPs {sel['backward_fraction']:.3f} of full (rho_bp {sel['rho_bp']:.3f})")

    # --- one selection ---------------------------------------------------------------------
    def costs(self, session, batches: list[dict]) -> TensorCosts:
        """The FLOPs model of one step on `batches` (input side first)."""
        from ..objectives.base import shifted_targets

        def head_rows(batch):
            if "class_labels" in batch or not self.view.is_causal:
                return 0
            return int(shifted_targets(batch)[1].numel())

        with session.autocast():
            return trace_costs(self.model, self.view, batches, self._forward(session), head_rows)

    def select(self, session, batches: list[dict], optimizer, step: int) -> dict:
        """Score and choose the tensors on `batches`; set requires_grad; return a summary."""
        require_attached(self)
        costs = self.costs(session, batches)
        rho_bp = backward_rho(self.config.rho, costs.t_fp, costs.t_bp)
        dy_q, dw_q = quantise(costs.t_dy[::-1], costs.t_dw[::-1], self.config.resolution)  # output side first
        budget = int(rho_bp * int(dy_q.sum() + dw_q.sum()))
        candidates = reachable(dy_q, dw_q, budget)[::-1]  # input side first again
        probed = [p for p, c in zip(costs.params, candidates) if c]
        for _, p in self._params:
            p.requires_grad_(False)
        for p in probed:
            p.requires_grad_(True)
        raw = probe_importance(probed, optimizer, self._loss_backward(session, batches)) if probed else torch.zeros(0)
        importance = np.zeros(len(costs.params))
        importance[np.flatnonzero(candidates)] = raw.numpy()
        scale = np.abs(importance).max()
        importance = importance / scale if scale > 0 else importance
        value, mask_out, budget = select_tensors(dy_q, dw_q, importance[::-1], rho_bp)
        mask = mask_out[::-1]
        chosen = {id(p) for p, m in zip(costs.params, mask) if m}
        for _, p in self._params:
            p.requires_grad_(id(p) in chosen)
            p.grad = None
        self._selected_at = step
        return {"step": step, "rho": self.config.rho, "rho_bp": rho_bp, "budget_units": budget,
                "used_units": int(selection_cost(dy_q, dw_q, mask_out)),
                "backward_fraction": costs.backward_fraction(mask),
                "flops_fraction": (costs.t_fp + costs.backward_fraction(mask) * costs.t_bp) / (costs.t_fp + costs.t_bp),
                "importance": value, "tensors": len(costs.params), "selected": int(mask.sum()),
                "probed": len(probed), "names": [n for n, m in zip(costs.names, mask) if m]}

    def _forward(self, session):
        chunk = session.cfg.train.loss_chunk_size
        return lambda batch: session.objective(self.model, self.view, batch, chunk_size=chunk)

    def _loss_backward(self, session, batches):
        """The step's loss (normalised by its total weight, as the trainer does), backpropagated."""
        forward = self._forward(session)
        total = sum(float(session.objective.weight_total(b)) for b in batches)

        def run():
            for batch in batches:
                with session.autocast():
                    loss = forward(batch).loss_sum / max(total, 1e-12)
                loss.backward()
        return run
