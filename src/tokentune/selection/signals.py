"""Signals: the per-batch scores selectors ask for, computed lazily, once per micro-batch, and shared.

A selector declares what it needs in `needs` (a set of strings):
  "current"          per-token log p(label) and entropy under the current model (no grad)
  "history"          the same under the history model (initial trainable weights, or their EMA)
  "attention:L"      query/key of layer L captured in the current-model pass, for `attention_mass`
The context runs the extra forward passes, counts their cost (passes, tokens, seconds, estimated FLOPs)
and reports it with the step's metrics, together with what the selectors kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..errors import TokentuneError
from .attention_mass import QKCapture, mass_on_keys
from .history import HistoryWeights
from .token_stats import token_stats


@dataclass
class TokenStats:
    logprob: torch.Tensor  # [B, T], aligned with labels; 0 where no loss
    entropy: torch.Tensor  # [B, T]


class SelectionContext:
    """Run-level state shared by all selectors: history weights, step, cost counters."""

    def __init__(self, session, selectors, total_steps: int):
        self.session = session
        self.selectors = selectors
        self.total_steps = total_steps
        self.step = 0
        self.needs: set[str] = set().union(*(getattr(s, "needs", set()) for s in selectors))
        self.history = None
        if "history" in self.needs:
            modes = {getattr(s, "history_mode", ("base", 0.99)) for s in selectors if "history" in getattr(s, "needs", ())}
            if len(modes) > 1:
                raise TokentuneError(f"selectors ask for different history models: {sorted(modes)}",
                                     where="selectors", fix="give them the same history mode and EMA alpha")
            mode, alpha = modes.pop()
            params = [p for g in session.adapter.param_groups() for _, p in g.params]
            self.history = HistoryWeights(params, mode, alpha)
        self.n_params = sum(p.numel() for p in session.model.parameters())
        self._reset()

    def _reset(self) -> None:
        self.cost = {"forwards": 0, "tokens": 0, "seconds": 0.0}
        self.kept = {"samples_before": 0, "samples_after": 0, "tokens_before": 0.0, "tokens_after": 0.0}
        self.extra: dict[str, list[float]] = {}

    def signals(self, batch: dict) -> Signals:
        return Signals(self, batch)

    def after_optimizer_step(self) -> None:
        if self.history is not None:
            self.history.update()

    def record_kept(self, batch: dict, when: str) -> None:
        """Count samples and loss tokens with weight > 0; when is "before" or "after" selection."""
        self.kept[f"samples_{when}"] += _count_samples(batch)
        self.kept[f"tokens_{when}"] += float((batch["loss_weights"][:, 1:] > 0).logical_and(
            batch["labels"][:, 1:] != -100).sum())

    def metrics(self) -> dict[str, float]:
        """This step's selection metrics (then reset)."""
        k = self.kept
        out = {
            "select/samples_kept": k["samples_after"] / max(k["samples_before"], 1),
            "select/loss_tokens_kept": k["tokens_after"] / max(k["tokens_before"], 1),
            "signals/forwards": self.cost["forwards"],
            "signals/seconds": round(self.cost["seconds"], 4),
            # Forward cost ~ 2 FLOPs per parameter per token (attention's quadratic part not counted).
            "signals/est_gflops": 2 * self.n_params * self.cost["tokens"] / 1e9,
        }
        for key, values in self.extra.items():
            out[key] = sum(values) / len(values)
        self._reset()
        return out


def _count_samples(batch: dict) -> int:
    weights = batch["loss_weights"] * (batch["labels"] != -100)
    index = batch["sample_index"]
    keys = set()
    for row in range(index.shape[0]):
        live = weights[row] > 0
        keys.update((row, int(i)) for i in index[row][live].unique().tolist())
    return len(keys)


class Signals:
    """What one micro-batch's selectors can ask about it. Everything is computed in eval mode (no dropout)
    and without gradients."""

    def __init__(self, ctx: SelectionContext, batch: dict):
        self.ctx, self.batch = ctx, batch
        self.metrics: dict[str, float] = {}
        self._current: TokenStats | None = None
        self._history: TokenStats | None = None
        self._qk: dict[int, QKCapture] = {}

    @property
    def step(self) -> int:
        return self.ctx.step

    @property
    def total_steps(self) -> int:
        return self.ctx.total_steps

    def _forward(self) -> TokenStats:
        s = self.ctx.session
        layers = sorted({int(n.split(":", 1)[1]) for n in self.ctx.needs if n.startswith("attention:")})
        captures, handles = {}, []
        for layer in layers:
            captures[layer] = QKCapture()
            handles += captures[layer].install(s.view, layer)
        was_training = s.model.training
        s.model.eval()
        start = time.perf_counter()
        try:
            with s.autocast():
                logp, ent = token_stats(s.model, s.view, self.batch, s.cfg.train.loss_chunk_size)
        finally:
            for h in handles:
                h.remove()
            s.model.train(was_training)
        self.ctx.cost["forwards"] += 1
        self.ctx.cost["tokens"] += int(self.batch["attention_mask"].sum())
        self.ctx.cost["seconds"] += time.perf_counter() - start
        self._qk.update(captures)
        return TokenStats(logp, ent)

    def current(self) -> TokenStats:
        if self._current is None:
            self._current = self._forward()
        return self._current

    def history(self) -> TokenStats:
        if self.ctx.history is None:
            raise TokentuneError("a selector asked for history signals without declaring needs={'history'}")
        if self._history is None:
            with self.ctx.history.swapped_in():
                self._history = self._forward()
        return self._history

    def attention_mass(self, layer: int, key_mask: torch.Tensor) -> torch.Tensor:
        """[B, T]: mean over heads of the attention each query puts on keys where key_mask is True
        (causal, within its packed segment), from the current-model pass at `layer`."""
        if f"attention:{layer}" not in self.ctx.needs:
            raise TokentuneError(f"attention of layer {layer} was not declared in the selector's needs")
        self.current()
        cap = self._qk[layer]
        return mass_on_keys(cap.query, cap.key, cap.scaling, self.batch["position_ids"], key_mask)

    def report(self, key: str, value: float) -> None:
        """A selector's own per-step metric (averaged over the step's micro-batches)."""
        self.ctx.extra.setdefault(key, []).append(float(value))
