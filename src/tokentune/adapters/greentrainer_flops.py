"""GreenTrainer's FLOPs model: for every parameter tensor, the cost of its weight gradient (t_dw) and of
passing activation gradients through the op that owns it (t_dy), plus the forward cost of the step.

The rules are the reference code's (OPT/BLOOM), written per module type so that one model covers Llama,
GPT-2 and BERT. Units are multiply-accumulates, as in the reference; only ratios matter.

  linear (nn.Linear, GPT-2 Conv1D), R input rows:  forward R·in·out (+ R·out bias)
                                   t_dy = R·in·out on the weight, 0 on the bias
                                   t_dw = R·in·out (weight), R·out (bias)
  norm (LayerNorm, RMSNorm), width D:  forward R·D per tensor, t_dy = R·D on the weight, t_dw = R·D each
  embedding:                        forward R·D, t_dy = 0, t_dw = numel (the table update, reference D·V)
  attention core (before o), B·T² query-key pairs, width Dq:  forward 2·B·T²·Dq, t_dy += 4·B·T²·Dq
  LM head applied by the loss (chunked CE, loss positions only): a linear op at the top with R = loss positions;
                                   tied to the embedding, its t_dw adds to the embedding's t_dw (reference:
                                   t_dw = B·N·D·V + D·V) and its dX goes to the output-most tensor's t_dy.

Where each cost sits in the chain matters, because t_dy is paid from the output down to (and including) the
deepest selected tensor. Tensors are ordered by first use in a traced forward pass. An op's dX cost sits on its
own weight when the op first uses it, and otherwise (a tied head, the attention core) on the tensor placed last
before the op runs, so that it is paid exactly when some tensor below the op is selected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import TokentuneError


@dataclass
class TensorCosts:
    """Per-tensor costs, input side first (index 0 is the tensor used first in the forward pass)."""

    names: list[str]
    params: list[nn.Parameter]
    t_dy: np.ndarray
    t_dw: np.ndarray
    t_fp: float  # forward cost of the whole step

    @property
    def t_bp(self) -> float:
        """Backward cost of full fine-tuning: every t_dy and every t_dw."""
        return float(np.sum(self.t_dy) + np.sum(self.t_dw))

    def backward_fraction(self, mask) -> float:
        """Backward cost of training the tensors in `mask` (input side first) over full fine-tuning's,
        with t_dy paid from the output down to the deepest selected tensor (the reference's accounting)."""
        m = np.asarray(mask, dtype=np.float64)
        reached = np.maximum.accumulate(m)  # input side first: 1 from the deepest selected tensor upwards
        return float(np.sum(reached * self.t_dy + m * self.t_dw)) / self.t_bp


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _is_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__ and all(p.dim() == 1 for p in module.parameters(recurse=False))


def op_costs(module: nn.Module, x: torch.Tensor) -> tuple[float, float, list[float]]:
    """(forward, dX, [t_dw per direct parameter]) of one call of `module` on input `x`."""
    params = list(module.named_parameters(recurse=False))
    if isinstance(module, nn.Embedding):
        rows = x.numel()
        return float(rows * module.embedding_dim), 0.0, [float(p.numel()) for _, p in params]
    rows = x.numel() // max(1, x.shape[-1])
    if _is_linear(module):
        mac = float(rows * module.weight.numel())
        dws = [mac if name == "weight" else float(rows * p.numel()) for name, p in params]
        return mac + sum(dws[1:]), mac, dws
    if _is_norm(module):
        per = float(rows * x.shape[-1])
        return per * len(params), per, [per] * len(params)
    raise TokentuneError(
        f"GreenTrainer has no FLOPs rule for {type(module).__name__} (a module that owns parameters)",
        where="adapter: greentrainer",
        fix="its FLOPs model covers linear (nn.Linear, Conv1D), norm and embedding modules; use another adapter "
            "for this architecture, or teach tokentune/adapters/greentrainer_flops.py the module's rule")


@dataclass
class _Chain:
    """Accumulates costs per tensor while the ops of one or more micro-batches are replayed in order."""

    name_of: dict[int, str]
    order: list[nn.Parameter] = field(default_factory=list)
    index: dict[int, int] = field(default_factory=dict)
    t_dy: list[float] = field(default_factory=list)
    t_dw: list[float] = field(default_factory=list)
    t_fp: float = 0.0
    seen: set[int] = field(default_factory=set)  # tensors used so far in this micro-batch
    top: int | None = None  # the tensor placed last in this micro-batch

    def new_batch(self) -> None:
        self.seen, self.top = set(), None

    def op(self, params: list[nn.Parameter], fwd: float, dx: float, dws: list[float]) -> None:
        self.t_fp += fwd
        fresh = bool(params) and id(params[0]) not in self.seen
        for p, dw in zip(params, dws):
            if id(p) not in self.index:
                self.index[id(p)] = len(self.order)
                self.order.append(p)
                self.t_dy.append(0.0)
                self.t_dw.append(0.0)
            k = self.index[id(p)]
            self.t_dw[k] += dw
            if id(p) not in self.seen:
                self.seen.add(id(p))
                self.top = k
        target = self.index[id(params[0])] if fresh else self.top
        if dx and target is not None:
            self.t_dy[target] += dx

    def result(self) -> TensorCosts:
        return TensorCosts([self.name_of[id(p)] for p in self.order], list(self.order),
                           np.asarray(self.t_dy, dtype=np.float64), np.asarray(self.t_dw, dtype=np.float64),
                           self.t_fp)


def _first_tensor(args, kwargs) -> torch.Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise TokentuneError("GreenTrainer could not see the input of a module while tracing the forward pass")


def trace_costs(model: nn.Module, view, batches: list[dict], forward, head_rows) -> TensorCosts:
    """Run `forward(batch)` (no grad) on every micro-batch with hooks that record each parameter-owning module's
    call, and the attention core before every o projection; return the per-tensor costs summed over the batches.

    head_rows(batch): rows the LM head sees when the loss applies it itself (chunked cross-entropy), or 0."""
    chain = _Chain({id(p): n for n, p in model.named_parameters()})
    try:
        head = view.lm_head
    except TokentuneError:  # a classifier model: its head is an ordinary module call
        head = None
    o_modules = {id(m) for m in view.modules_for_roles(["o"]).values()}
    calls = {"head": 0}

    def hook(module, args, kwargs):
        x = _first_tensor(args, kwargs)
        if id(module) in o_modules:  # the attention core runs between q/k/v and o
            seq = x.shape[-2] if x.dim() >= 3 else x.numel() // x.shape[-1]
            pairs = (x.numel() // x.shape[-1]) * seq
            chain.op([], 2.0 * pairs * x.shape[-1], 4.0 * pairs * x.shape[-1], [])
        if module is head:
            calls["head"] += 1
        own = [p for _, p in module.named_parameters(recurse=False)]
        if own:
            fwd, dx, dws = op_costs(module, x)
            chain.op(own, fwd, dx, dws)

    owners = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None or m is head]
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in owners]
    try:
        with torch.no_grad():
            for batch in batches:
                chain.new_batch()
                calls["head"] = 0
                forward(batch)
                rows = head_rows(batch) if head is not None and calls["head"] == 0 else 0
                if rows:  # the loss applied the head's weight itself, at `rows` positions
                    own = [p for _, p in head.named_parameters(recurse=False)]
                    fwd, dx, dws = op_costs(head, torch.empty(rows, head.weight.shape[-1], device="meta"))
                    chain.op(own, fwd, dx, dws)
    finally:
        for h in handles:
            h.remove()
    if not chain.order:
        raise TokentuneError("GreenTrainer traced no parameter-owning module in the forward pass",
                             where="adapter: greentrainer")
    return chain.result()
