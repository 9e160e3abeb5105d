"""LeMo / JENGA contextual token sparsity (Wang et al., arXiv 2501.09767): in every chosen decoder layer,
per input, the token blocks whose informativeness (attention logits they receive, lemo_scores.py) is
low skip the layer and ride the residual stream unchanged, so their activations at that layer are never
stored for backward. Loss is still computed on every token. A memory saver for long-context LoRA
fine-tuning; it changes no sample or token weights.

Pieces: lemo_scores.py (block scores), lemo_layers.py (gather / run / scatter), lemo_runtime.py (what
the patched layers consult), lemo_predictor.py (optional score predictors), lemo_calibrate.py."""

from __future__ import annotations

import logging
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import TokentuneError
from ..objectives.base import backbone_hidden
from ..registry import register
from . import lemo_calibrate as calib
from .lemo_runtime import LemoRuntime

log = logging.getLogger(__name__)
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
_WHERE = "selectors[lemo]"


class LemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["lemo"] = "lemo"
    block_size: int = Field(64, gt=0, description="tokens per block (the paper uses 64)")
    mode: Literal["threshold", "ratio"] = "threshold"
    keep_ratio: float = Field(0.5, gt=0, le=1, description="ratio mode: share of blocks each layer keeps")
    thresholds: float | list[float] | None = Field(
        None, description="threshold mode: one value, or one per eliminating layer; None = calibrated mean")
    causal_scores: bool = Field(False, description="score from causal logits only (i > j) instead of all i != j")
    layers: list[int] | Literal["all"] | None = Field(
        None, description="decoder layers that eliminate (negative = from the end); None = all but the first")
    calibration_batches: int = Field(4, gt=0)
    tune_steps: int = Field(0, ge=0, description="finite-difference threshold adjustment steps (threshold mode)")
    tune_eps: float = Field(0.1, gt=0, description="ε, in units of the starting threshold")
    tune_lr: float = Field(1.0, gt=0, description="η, relative threshold change per nat of loss per unit")
    predictor: bool = False
    predictor_rank: int = Field(16, gt=0)
    predictor_epochs: int = Field(300, gt=0)
    predictor_lr: float = Field(1e-2, gt=0)
    score_chunk: int = Field(512, gt=0, description="queries per chunk when computing exact scores")
    loss_on_eliminated: bool = Field(
        True, description="false: a token that skipped any layer in this forward carries no loss (its final state "
                          "misses those layers); the normaliser, fixed before the forward, still counts it")

    @model_validator(mode="after")
    def _consistent(self):
        given = self.model_fields_set
        if self.mode == "ratio" and given & {"thresholds", "tune_steps", "tune_eps", "tune_lr"}:
            raise ValueError("thresholds and tune_* apply to mode: threshold, not mode: ratio")
        if self.mode == "threshold" and "keep_ratio" in given:
            raise ValueError("keep_ratio applies to mode: ratio (set mode: ratio, or use thresholds)")
        if not self.predictor and given & {"predictor_rank", "predictor_epochs", "predictor_lr"}:
            raise ValueError("predictor_* options need predictor: true")
        if not self.tune_steps and given & {"tune_eps", "tune_lr"}:
            raise ValueError("tune_eps / tune_lr need tune_steps > 0")
        values = self.thresholds if isinstance(self.thresholds, list) else [self.thresholds]
        if self.tune_steps and any(v is not None and not math.isfinite(v) for v in values):
            raise ValueError("threshold tuning needs finite thresholds")
        return self


@register("selector", "lemo", config=LemoConfig,
          description="LeMo/JENGA: low-informativeness token blocks skip each layer (less activation memory)")
class Lemo:
    name = "lemo"
    needs: set[str] = set()

    def __init__(self, config: LemoConfig):
        self.config = config
        self.runtime: LemoRuntime | None = None
        self.calibration: dict = {}

    # --- installation ----------------------------------------------------------------------------
    @property
    def calibrates(self) -> bool:
        """Whether installing needs calibration batches (threshold means, predictor fitting)."""
        return self.config.predictor or (self.config.mode == "threshold" and self.config.thresholds is None)

    def attach(self, session) -> None:
        if session.splits is None:  # no training in this session (eval / generate): nothing to eliminate
            return
        train, n = session.cfg.train, self.config.calibration_batches * session.cfg.train.batch_size
        bs = train.batch_size
        batches, heldout = [], []
        if self.calibrates:
            rows = session.train_rows()[:n]
            batches = [session.to_batch(rows[i:i + bs]) for i in range(0, len(rows), bs)]
        if self.config.tune_steps:  # held-out: the eval split when there is one
            heldout = list(session.eval_batches(list(session.splits.eval)[:n], bs)) if session.splits.eval else batches

        def loss_fn(batch):
            out = session.objective(session.model, session.view, batch, chunk_size=train.loss_chunk_size)
            return float(out.loss_sum), float(out.weight_sum)

        with session.autocast():
            self.install(session.model, session.view, batches, heldout=heldout, loss_fn=loss_fn)

    def install(self, model, view, batches=(), *, heldout=(), loss_fn=None) -> None:
        """Patch the layers and calibrate on `batches` (Batch dicts) where the config needs it.
        loss_fn(batch) -> (loss sum, weight sum) and `heldout` are for threshold tuning."""
        cfg = self.config
        window = _check_model(model, view)
        layers = _resolve_layers(cfg.layers, view.num_layers)
        given = None
        if cfg.mode == "threshold" and cfg.thresholds is not None:
            values = cfg.thresholds if isinstance(cfg.thresholds, list) else [cfg.thresholds] * len(layers)
            if len(values) != len(layers):
                raise TokentuneError(f"{len(values)} thresholds for {len(layers)} eliminating layers",
                                     where=f"{_WHERE}.thresholds", fix="give one value, or one per eliminating layer")
            given = dict(zip(layers, values))
        if cfg.tune_steps and (loss_fn is None or not heldout):
            raise TokentuneError("threshold tuning needs held-out batches and a loss", where=f"{_WHERE}.tune_steps")
        if self.calibrates and not batches:
            raise TokentuneError("lemo needs calibration batches (threshold means or predictor fitting)",
                                 where=_WHERE, fix="train with a non-empty training split")
        self.detach()
        impl = getattr(model.config, "_attn_implementation", None)
        self.runtime = LemoRuntime(
            view, layers, block=cfg.block_size, score_chunk=cfg.score_chunk,
            mask_kind="float" if impl == "eager" else "bool", causal=cfg.causal_scores, window=window,
            keep_ratio=cfg.keep_ratio if cfg.mode == "ratio" else None, thresholds=given)
        if self.calibrates or cfg.tune_steps:
            was_training = model.training
            model.eval()
            try:
                self._calibrate(view, batches, heldout, loss_fn, given)
            finally:
                model.train(was_training)
            log.info("lemo calibration: %s", self.calibration)

    def _calibrate(self, view, batches, heldout, loss_fn, given) -> None:
        cfg, rt = self.config, self.runtime
        if self.calibrates:
            records = calib.record(rt, lambda b: backbone_hidden(view, b), batches, inputs=cfg.predictor)
            exact = calib.exact_means(records)
            self.calibration["exact_mean_scores"] = exact
            if cfg.predictor:
                calib.fit_predictors(rt, records, rank=cfg.predictor_rank, epochs=cfg.predictor_epochs,
                                     lr=cfg.predictor_lr)
            if cfg.mode == "threshold" and given is None:
                rt.thresholds = calib.mean_thresholds(rt, records)
            if cfg.predictor:
                self.calibration["predictor_recall"] = calib.predictor_recall(rt, records, None if given else exact)
        if cfg.tune_steps:
            self.calibration["tuning"] = calib.tune_thresholds(rt, loss_fn, heldout, steps=cfg.tune_steps,
                                                               eps=cfg.tune_eps, lr=cfg.tune_lr)
        self.calibration["thresholds"] = dict(rt.thresholds)

    def detach(self) -> None:
        if self.runtime is not None:
            self.runtime.remove()
            self.runtime = None

    # --- per micro-batch -----------------------------------------------------------------------
    def select(self, batch: dict, signals) -> dict:
        if self.runtime is None:
            raise TokentuneError("the lemo selector was not attached to a training session",
                                 fix="build the run with tokentune train (or call install(model, view, ...))")
        self.runtime.sink = signals  # the layers report their kept fractions into this step's metrics
        batch = dict(batch)
        if not self.config.loss_on_eliminated:  # the layers zero the weights of the tokens they skip (a copy)
            batch["loss_weights"] = batch["loss_weights"].clone()
            self.runtime.loss_weights = batch["loss_weights"]
        return batch


def _check_model(model, view) -> int | None:
    """Refuses what lemo cannot do right; returns the smallest sliding-attention window (None: none)."""
    if view.model_type not in SUPPORTED:
        raise TokentuneError(f"lemo does not support {view.model_type!r} models", where=_WHERE,
                             fix=f"lemo works on Llama-shaped decoders with RoPE: {', '.join(SUPPORTED)}")
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in ("tokentune", "sdpa", "eager"):
        raise TokentuneError(f"lemo builds its own masks for SDPA or eager attention, not {impl!r}",
                             where="model.attn_implementation", fix="use tokentune, sdpa or eager")
    if getattr(model, "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing")
               else "is_gradient_checkpointing", False):
        raise TokentuneError("lemo and gradient checkpointing cannot be combined (recomputation would re-plan)",
                             where="model.gradient_checkpointing", fix="turn one of them off")
    # Mistral applies config.sliding_window to every layer; Qwen2/3 set it per attention module.
    windows = [getattr(layer.self_attn, "sliding_window", None) for layer in view.layers]
    if view.model_type == "mistral":
        windows.append(getattr(model.config, "sliding_window", None))
    windows = [w for w in windows if w]
    return min(windows) if windows else None


def _resolve_layers(layers, n: int) -> list[int]:
    # Default: not layer 0, where skipping hurts most (measured; docs/selectors/lemo.md).
    if layers is None or layers == "all":
        return list(range(1 if layers is None else 0, n))
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise TokentuneError(f"layers {bad} out of range for a {n}-layer model", where=f"{_WHERE}.layers")
    out = sorted({i % n for i in layers})
    if not out:
        raise TokentuneError("lemo needs at least one eliminating layer", where=f"{_WHERE}.layers")
    return out
