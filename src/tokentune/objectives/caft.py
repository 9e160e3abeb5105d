"""CAFT: concept-aware fine-tuning with auxiliary multi-token prediction heads (Chen et al., 2025, arXiv 2506.07833).

Besides the next-token loss, K auxiliary heads (caft_heads.py) read the hidden state at t and predict token t+1+k:

    L = L_0 + sum_{k=1..K} c · d^k · s(step) · L_k

with c = coefficient (0.01), d = decay (0.8) and s a schedule over the run (default rsine: 1 -> 0). Every L_k is a
per-token sum over the positions whose target exists, lies in the same packed record (position ids tell) and carries
loss; the engine divides everything by the main loss's token weight, so L_k is head k's mean whenever it has as many
targets as the main head (prompt/completion records with a prompt of at least K tokens: every completion token is
then the target of every head). Each head's logits go through the chunked cross-entropy of the (shared) LM head,
only at its target positions: [B, T, V] never exists.

Stage 1 of the paper (heads trained on their own, base frozen, main loss excluded, c = 1, constant schedule) is
`heads_only: true`; the `caft_heads` recipe runs it and then the task fine-tuning with the trained heads.
Evaluation reports the next-token loss as eval/loss (so perplexity stays comparable with plain SFT) and each head's
loss as eval/caft_head<k>_loss.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..adapters.base import ParamGroup
from ..adapters.soft_prompt import own_module
from ..errors import TokentuneError
from ..registry import register
from .base import ObjectiveOutput, backbone_hidden, shifted_targets, token_weight_total
from .caft_heads import ARCH_KEYS, build_heads, read_heads, write_heads
from .chunked import chunked_cross_entropy

_SCHEDULE = re.compile(r"rsine|sine|linear|constant|sine_(\d*\.?\d+)")
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class CaftConfig(BaseModel):
    """num_heads             auxiliary heads K; head k predicts token t+1+k (the paper: 4, so 5 tokens in all)
    num_layers            blocks per head (1)
    head_arch             transformer (a decoder layer per block, copied from layer init_layer) | linear
                          (x + SiLU(Wx + b), identity at init)
    separate_unembedding  each head gets a trained copy of the LM head instead of sharing it
    head_input            final (the trunk's final, normed hidden state: what CAFT fine-tuning feeds the heads) |
                          penultimate (the input of the last decoder layer: what the paper's head training reads)
    head_norm             apply the trunk's final norm (shared) to each head's output before the unembedding; the
                          code has none, which makes fresh transformer heads start at ~1000 nats per token
    init_layer            decoder layer the transformer blocks are copied from when no trained heads are loaded (-2)
    coefficient           c (None: 0.01; 1 with heads_only)
    decay                 d: head k's loss weighs c · d^k
    schedule              s(step): rsine (sin(pi/2 (T-step)/T), 1 -> 0) | sine (0 -> 1) | linear (step/T) |
                          constant | sine_<r> (sine ramp over the first fraction r, then 1); None: rsine (constant
                          with heads_only)
    heads                 trained heads to load: a directory with caft_heads.safetensors, or a run directory whose
                          final/objective holds them (e.g. the caft_heads recipe's heads/ stage)
    train_heads           None: frozen when `heads` is given (the paper's default), trained otherwise
    heads_only            stage 1: train the heads alone (every other parameter frozen, next-token loss excluded)"""

    model_config = ConfigDict(extra="forbid")
    name: Literal["caft"] = "caft"
    num_heads: int = Field(4, ge=1)
    num_layers: int = Field(1, ge=1)
    head_arch: Literal["transformer", "linear"] = "transformer"
    separate_unembedding: bool = False
    head_input: Literal["final", "penultimate"] = "final"
    head_norm: bool = False
    init_layer: int = -2
    coefficient: float | None = Field(None, ge=0)
    decay: float = Field(0.8, gt=0)
    schedule: str | None = None
    heads: str | None = None
    train_heads: bool | None = None
    heads_only: bool = False

    @field_validator("schedule")
    @classmethod
    def _schedule_known(cls, value):
        if value is None:
            return value
        m = _SCHEDULE.fullmatch(value)
        if m is None or (m.group(1) is not None and not 0 < float(m.group(1)) <= 1):
            raise TokentuneError(f"unknown CAFT schedule {value!r}", where="objective.schedule",
                                 fix="use rsine, sine, linear, constant or sine_<r> with 0 < r <= 1 (e.g. sine_0.1)")
        return value

    @model_validator(mode="after")
    def _resolve(self):
        if self.heads_only and self.train_heads is False:
            raise TokentuneError("heads_only trains the heads; train_heads: false leaves nothing to train",
                                 where="objective.train_heads", fix="remove train_heads or heads_only")
        if self.coefficient is None:
            self.coefficient = 1.0 if self.heads_only else 0.01
        if self.schedule is None:
            self.schedule = "constant" if self.heads_only else "rsine"
        return self

    @property
    def heads_trainable(self) -> bool:
        """train_heads resolved (kept None in the config so that a later stage given `heads` freezes them)."""
        return self.train_heads if self.train_heads is not None else (self.heads_only or self.heads is None)


def schedule_factor(schedule: str, step: int, total: int) -> float:
    """s(step) of the paper's code; `step` optimiser steps done (0-based index of the current one) of `total`."""
    if total <= 0:
        return 1.0
    x = step / total
    if schedule == "rsine":
        return math.sin(math.pi / 2 * (total - step) / total)
    if schedule == "sine":
        return math.sin(math.pi / 2 * x)
    if schedule == "linear":
        return x
    if schedule == "constant":
        return 1.0
    ratio = float(schedule.split("_", 1)[1])
    return math.sin(math.pi / 2 * x / ratio) if x < ratio else 1.0


def offset_targets(batch: dict, offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions [N, 2] as (row, t), targets [N], weights [N]) for predicting labels[t + offset] from position t.

    offset 1 is the next token (shifted_targets). A target must carry loss and lie in the same record as t: within a
    record position ids rise by one per token and restart at 0 in the next packed record (and in padding), so
    position_ids[t + offset] == position_ids[t] + offset exactly when t + offset is still t's record."""
    labels, weights = batch["labels"][:, offset:], batch["loss_weights"][:, offset:]
    positions = batch["position_ids"]
    same_record = (positions[:, offset:] - positions[:, :positions.shape[1] - offset]) == offset
    mask = (labels != -100) & (weights != 0) & same_record
    rows, cols = mask.nonzero(as_tuple=True)
    return torch.stack([rows, cols], 1), labels[rows, cols], weights[rows, cols].float()


class _LastLayerCall:
    """Records the arguments the trunk passes to its last decoder layer (its input = hidden_states[-2], the mask and
    rotary embeddings), so transformer heads run exactly as that layer does, packing included."""

    def __init__(self, layer):
        self.active, self.args, self.kwargs = False, None, None
        self.handle = layer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        if self.active:
            self.args, self.kwargs = args, kwargs

    @contextlib.contextmanager
    def recording(self):
        self.active, self.args, self.kwargs = True, None, None
        try:
            yield
        finally:
            self.active = False

    def take(self, batch: dict):
        """(layer input [B, T, H], other positional args, keyword args without caches); clears the record."""
        if self.kwargs is None:
            raise TokentuneError("the model's last decoder layer did not run during the forward pass",
                                 where="objective.head_arch", fix="use head_arch: linear with head_input: final")
        args, kwargs = self.args, dict(self.kwargs)
        self.args = self.kwargs = None
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if tuple(hidden.shape[:2]) != tuple(batch["input_ids"].shape):
            raise TokentuneError(f"the last decoder layer sees {tuple(hidden.shape[:2])} positions, the batch has "
                                 f"{tuple(batch['input_ids'].shape)} (virtual tokens or token elimination)",
                                 where="objective.head_arch",
                                 fix="use head_arch: linear with head_input: final, or an adapter without virtual tokens")
        for key in _CACHE_KWARGS:
            kwargs.pop(key, None)
        return hidden, tuple(args[1:]), kwargs


@register("objective", "caft", config=CaftConfig,
          description="CAFT: next-token CE + decaying multi-token auxiliary heads (t+2..t+K+1), chunked, shared LM head")
class Caft:
    name = "caft"

    def __init__(self, config: CaftConfig):
        self.config = config
        self.heads = None
        self.step, self.total_steps = 0, 0  # set by the trainer (on_step_start); 0 of 0 gives s = 1

    # --- set-up ---------------------------------------------------------------------------------
    def attach(self, model, view) -> None:
        cfg = self.config
        if not view.is_causal:
            raise TokentuneError("caft predicts future tokens and needs a causal model", where="objective.name",
                                 fix="use cross_entropy for classification heads")
        if self.heads is not None:
            raise TokentuneError("the caft objective is already attached", fix="create a new objective per model")
        if cfg.head_norm and view.final_norm is None:
            raise TokentuneError(f"{view.model_type} has no final norm to apply to the heads", where="objective.head_norm",
                                 fix="set head_norm: false")
        self._meta = {k: getattr(cfg, k) for k in (*ARCH_KEYS, "init_layer")}
        self._meta.update(hidden_size=view.lm_head.weight.shape[1], vocab_size=view.lm_head.weight.shape[0])
        heads = own_module(model, "caft_heads", build_heads(view, cfg))
        if cfg.heads is not None:
            read_heads(heads, cfg.heads, self._meta)
        own = {id(p) for p in heads.parameters()}
        if cfg.heads_only:  # stage 1: the heads learn on a frozen model (adapter parameters included)
            for p in model.parameters():
                if id(p) not in own:
                    p.requires_grad_(False)
        for p in heads.parameters():
            p.requires_grad_(cfg.heads_trainable)
        self._call = _LastLayerCall(view.layers[-1]) \
            if cfg.head_arch == "transformer" or cfg.head_input == "penultimate" else None
        self.heads = heads

    def _require(self):
        if self.heads is None:
            raise TokentuneError("the caft objective is not attached to a model (no heads)",
                                 fix="build it through build_session, or call attach(model, view) first")
        return self.heads

    def on_step_start(self, trainer, step: int) -> None:
        """The schedule's clock: the trainer calls this before each optimiser step (resume included)."""
        self.step, self.total_steps = step, trainer.total_steps

    def head_weights(self) -> list[float]:
        """w_k = c · d^k · s(step) for k = 1..K."""
        cfg = self.config
        s = schedule_factor(cfg.schedule, self.step, self.total_steps)
        return [cfg.coefficient * cfg.decay ** k * s for k in range(1, cfg.num_heads + 1)]

    # --- trained state ----------------------------------------------------------------------------
    def _trained(self) -> list:
        return [(n, p) for n, p in self._require().named_parameters() if p.requires_grad]

    def param_groups(self) -> list[ParamGroup]:
        trained = self._trained()
        return [ParamGroup("caft_heads", trained)] if trained else []

    def state_dict(self) -> dict[str, torch.Tensor]:
        from ..adapters.state_io import tensor_state

        return tensor_state(self._trained())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from ..adapters.state_io import copy_state

        copy_state(self._trained(), state, source="checkpoint (objective:: caft heads)")

    def save(self, out_dir) -> None:
        """Every head tensor (trained or not): the directory can be given as `heads` to a later run."""
        write_heads(self._require(), out_dir, self._meta)

    def load(self, in_dir) -> None:
        read_heads(self._require(), in_dir, self._meta)

    # --- the loss -----------------------------------------------------------------------------------
    def weight_total(self, batch: dict) -> torch.Tensor:
        return token_weight_total(batch)

    def __call__(self, model, view, batch: dict, *, chunk_size: int = 1024) -> ObjectiveOutput:
        heads, cfg = self._require(), self.config
        training = model.training
        with self._call.recording() if self._call is not None else contextlib.nullcontext():
            hidden = backbone_hidden(view, batch)
        layer_args, layer_kwargs = (), {}
        head_in = hidden
        if self._call is not None:
            last_in, layer_args, layer_kwargs = self._call.take(batch)
            if cfg.head_input == "penultimate":
                head_in = last_in
        pos, targets, weights = shifted_targets(batch)
        loss_sum, token_losses = hidden.new_zeros((), dtype=torch.float32), None
        if not (cfg.heads_only and training):  # stage 1 leaves the next-token loss out of training
            main = chunked_cross_entropy(hidden[pos[:, 0], pos[:, 1]], view.lm_head, targets, chunk_size)
            loss_sum, token_losses = (main * weights).sum(), main.detach()
        metrics = {}
        for k, (head, w_k) in enumerate(zip(heads.heads, self.head_weights()), start=1):
            hpos, htargets, hweights = offset_targets(batch, 1 + k)
            if head.arch == "linear":  # per-position blocks: run them at the target positions only
                out = head(head_in[hpos[:, 0], hpos[:, 1]])
            else:
                out = head(head_in, layer_args, layer_kwargs)[hpos[:, 0], hpos[:, 1]]
            if cfg.head_norm:
                out = view.final_norm(out)
            unembed = head.unembed if head.unembed is not None else view.lm_head
            head_sum = (chunked_cross_entropy(out, unembed, htargets, chunk_size) * hweights).sum()
            if training:  # always added (even at weight 0) so every head parameter gets a gradient under DDP
                loss_sum = loss_sum + w_k * head_sum
            metrics[f"caft_head{k}_loss"] = head_sum.detach()
            metrics[f"caft_head{k}_weight"] = hweights.sum()
        return ObjectiveOutput(loss_sum=loss_sum, weight_sum=weights.sum().detach(), token_losses=token_losses,
                               metrics=metrics)

    def _per_head(self, sums: dict, key: str) -> dict[str, float]:
        """Each head's mean loss over its own targets, under `key`.format(k)."""
        out = {}
        for k in range(1, self.config.num_heads + 1):
            if f"caft_head{k}_loss" in sums:
                count = max(float(sums[f"caft_head{k}_weight"]), 1e-12)
                out[key.format(k)] = float(sums[f"caft_head{k}_loss"]) / count
        return out

    def train_metrics(self, sums: dict) -> dict[str, float]:
        """Logged per step: each head's mean loss and the schedule's value s(step)."""
        return {**self._per_head(sums, "caft/head{}_loss"),
                "caft/schedule": schedule_factor(self.config.schedule, self.step, self.total_steps)}

    def eval_metrics(self, sums: dict) -> dict[str, float]:
        return self._per_head(sums, "eval/caft_head{}_loss")
