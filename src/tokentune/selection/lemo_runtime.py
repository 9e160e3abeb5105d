"""What the patched decoder layers consult at run time: which layers eliminate, by which rule (top share
of blocks, or a per-layer threshold), with exact or predicted scores; and where the kept fractions go.

Elimination acts only in training-mode forwards (the trainer's micro-batches). Evaluation, generation and
the selection signals run in eval mode and see the full model; `force` turns elimination on in eval mode
(no dropout) for threshold tuning, and `recorder` makes every patched layer record its exact block scores
during a dense forward (calibration)."""

from __future__ import annotations

import contextlib
import math

import torch

from ..errors import TokentuneError
from .lemo_layers import LayerPatch, block_to_tokens, gathered_forward, plan_blocks
from .lemo_scores import (block_allowed, block_embeddings, block_score_matrix, layer_qk, normed_input,
                          segment_ids, token_block_scores)


@contextlib.contextmanager
def _no_dropout(modules):
    """Scores are a deterministic function of the input: LoRA dropout in the projections stays off, and
    scoring draws nothing from the random stream the training forward uses."""
    saved = [(m, m.training) for mod in modules for m in mod.modules()]
    for m, _ in saved:
        m.training = False
    try:
        yield
    finally:
        for m, was in saved:
            m.training = was


class LemoRuntime:
    def __init__(self, view, layers: list[int], *, block: int, score_chunk: int, mask_kind: str,
                 causal: bool = False, window: int | None = None, keep_ratio: float | None = None,
                 thresholds: dict[int, float] | None = None):
        self.view, self.layers, self.block, self.score_chunk = view, layers, block, score_chunk
        self.causal = causal  # scores from causal entries only (i > j) instead of all i != j
        self.window = window  # sliding-attention window: the scores assume full causal attention
        self.mask_kind = mask_kind  # "bool" (SDPA) or "float" (eager, additive)
        self.keep_ratio = keep_ratio
        self.thresholds: dict[int, float] = dict(thresholds or {})
        self.predictors: dict = {}
        self.force = False
        self.recorder = None
        self.record_inputs = False  # calibration also records the predictors' inputs when they are trained
        self.sink = None  # the Signals of the step being trained: its report() collects the kept fractions
        self.loss_weights = None  # loss_on_eliminated false: this micro-batch's weights, zeroed where tokens skip
        self._loss_before = 0.0
        self.fractions: dict[int, float] = {}
        self.last_keep: dict[int, float] = {}
        self.patches = [LayerPatch(view.layers[i], i, self) for i in layers]

    def remove(self) -> None:
        for patch in self.patches:
            patch.remove()
        self.patches = []

    @contextlib.contextmanager
    def forced(self, thresholds: dict[int, float] | None = None):
        saved = dict(self.thresholds)
        self.force = True
        self.thresholds.update(thresholds or {})
        try:
            yield
        finally:
            self.force, self.thresholds = False, saved

    # --- one layer's forward ---------------------------------------------------------------------
    def layer_forward(self, patch: LayerPatch, hidden: torch.Tensor, kwargs: dict):
        inner, layer, i = patch.inner, patch.layer, patch.index
        generating = kwargs.get("cache") is not None or kwargs.get("use_cache")
        if generating or (self.recorder is None and not (layer.training or self.force)):
            return inner(hidden, **kwargs)
        if self.window is not None and hidden.shape[1] > self.window:
            raise TokentuneError(f"lemo's block scores assume full causal attention; this model slides a "
                                 f"{self.window}-token window over {hidden.shape[1]} tokens",
                                 where="data.max_length", fix=f"keep sequences within {self.window} tokens")
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = torch.arange(hidden.shape[1], device=hidden.device)[None]
        if self.recorder is not None:
            with torch.no_grad():
                self.recorder(i, **self.exact(layer, hidden, kwargs, inputs=self.record_inputs))
            return inner(hidden, **kwargs)
        rule = self.rule(i)
        if rule.get("keep_ratio", 0) >= 1 or rule.get("threshold", 0) == -math.inf:
            self.drop_loss(i, None)
            self.report(i, 1.0)
            return inner(hidden, **kwargs)
        with torch.no_grad():
            scores = self.scores(layer, i, hidden, kwargs)
        keep = block_to_tokens(plan_blocks(scores, **rule), self.block, hidden.shape[1])
        self.drop_loss(i, keep)
        self.report(i, float(keep.float().mean()))
        if bool(keep.all()):
            return inner(hidden, **kwargs)
        return gathered_forward(inner, hidden, keep, kwargs, self.mask_kind)

    def rule(self, i: int) -> dict:
        if self.keep_ratio is not None:
            return {"keep_ratio": self.keep_ratio}
        return {"threshold": self.thresholds[i]}

    # --- scores ----------------------------------------------------------------------------------
    def exact(self, layer, hidden: torch.Tensor, kwargs: dict, inputs: bool = False) -> dict:
        """Exact block scores: {"matrix": [B, nb, nb], "scores": [B, nb]} (+ predictor inputs)."""
        seg = segment_ids(kwargs["position_ids"].expand(hidden.shape[0], -1))
        with _no_dropout([layer.self_attn.q_proj, layer.self_attn.k_proj]):
            x = normed_input(layer, hidden)
            q, k, scaling = layer_qk(layer, x, kwargs["position_embeddings"])
        matrix = block_score_matrix(q, k, scaling, seg, self.block, self.score_chunk, self.causal)
        out = {"matrix": matrix, "scores": token_block_scores(matrix)}
        if inputs:
            out.update(emb=block_embeddings(x, self.block), allowed=block_allowed(seg, self.block, self.causal))
        return out

    def scores(self, layer, i: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        predictor = self.predictors.get(i)
        if predictor is None:
            return self.exact(layer, hidden, kwargs)["scores"]
        seg = segment_ids(kwargs["position_ids"].expand(hidden.shape[0], -1))
        emb = block_embeddings(normed_input(layer, hidden), self.block)
        return predictor.token_scores(emb, block_allowed(seg, self.block, self.causal))

    def drop_loss(self, i: int, keep: torch.Tensor) -> None:
        """loss_on_eliminated false: the hidden state of a skipped token t predicts labels[t + 1]; that weight
        goes to 0. After the last eliminating layer the weights are released (they belong to one forward)."""
        w = self.loss_weights
        if w is None:
            return
        if i == self.layers[0]:
            self._loss_before = float((w[:, 1:] != 0).sum())
        if keep is not None:
            w[:, 1:].masked_fill_(~keep[:, :-1].to(w.device), 0)
        if i == self.layers[-1]:
            if self.sink is not None and self._loss_before:
                self.sink.report("select/lemo_loss_tokens_kept", float((w[:, 1:] != 0).sum()) / self._loss_before)
            self.loss_weights = None

    # --- metrics ---------------------------------------------------------------------------------
    def report(self, i: int, fraction: float) -> None:
        """Kept-token fraction of layer i; after the last eliminating layer, the mean over all layers
        (layers that do not eliminate count as 1)."""
        self.fractions[i] = fraction
        if self.sink is not None:
            self.sink.report(f"select/lemo_keep_layer_{i}", fraction)
        if i == self.layers[-1]:
            n = self.view.num_layers
            mean = (sum(self.fractions.values()) + n - len(self.fractions)) / n
            if self.sink is not None:
                self.sink.report("select/lemo_keep", mean)
            self.last_keep, self.fractions = {**self.fractions, "mean": mean}, {}
