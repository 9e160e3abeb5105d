"""LeMo calibration, once when the selector attaches, on the first training micro-batches (dense forwards
in eval mode, no gradients):

1. record every eliminating layer's exact block scores (and, for predictors, block embeddings);
2. fit the pattern predictors (spec step 6) and measure their recall on the last calibration batch
   (held out from fitting when there are two or more);
3. initialise each layer's threshold to the mean token-block score of that layer (spec Alg. 1,
   "profiling"), over the scores used at run time (the predicted ones when predictors are on);
4. optionally adjust the thresholds by finite differences of held-out accuracy (spec Alg. 1)."""

from __future__ import annotations

import torch

from .lemo_layers import plan_blocks
from .lemo_predictor import recall, train_predictor


def record(runtime, forward, batches, *, inputs: bool) -> dict[int, list[dict]]:
    """Per eliminating layer, one record per batch: {"matrix", "scores"} (+ "emb", "allowed")."""
    records: dict[int, list[dict]] = {i: [] for i in runtime.layers}

    def keep(i, **fields):
        records[i].append(fields)

    runtime.recorder, runtime.record_inputs = keep, inputs
    try:
        with torch.no_grad():
            for batch in batches:
                forward(batch)
    finally:
        runtime.recorder, runtime.record_inputs = None, False
    return records


def _mean(tensors) -> float:
    return float(torch.cat([t.reshape(-1) for t in tensors]).mean())


def exact_means(records) -> dict[int, float]:
    return {i: _mean([r["scores"] for r in recs]) for i, recs in records.items()}


def fit_predictors(runtime, records, *, rank: int, epochs: int, lr: float) -> None:
    for i, recs in records.items():
        fit_on = recs[:-1] if len(recs) > 1 else recs
        runtime.predictors[i] = train_predictor([(r["emb"], r["allowed"], r["matrix"]) for r in fit_on],
                                                rank, epochs, lr, seed=i)


def predicted(runtime, i: int, rec: dict) -> torch.Tensor:
    return runtime.predictors[i].token_scores(rec["emb"], rec["allowed"])


def mean_thresholds(runtime, records) -> dict[int, float]:
    """T_l = mean token-block score of layer l over the calibration batches."""
    return {i: _mean([predicted(runtime, i, r) if i in runtime.predictors else r["scores"] for r in recs])
            for i, recs in records.items()}


def predictor_recall(runtime, records, exact_thresholds: dict[int, float] | None) -> dict[int, float]:
    """Per layer: share of the blocks kept under exact scores that predicted scores keep too, on the last
    calibration batch. Each side uses its own threshold (exact_thresholds for the exact scores, the
    run's thresholds for the predicted ones), or the run's keep ratio."""
    out = {}
    for i, recs in records.items():
        rec = recs[-1]
        if runtime.keep_ratio is not None:
            true_rule = pred_rule = {"keep_ratio": runtime.keep_ratio}
        else:
            true_rule = {"threshold": (exact_thresholds or runtime.thresholds)[i]}
            pred_rule = {"threshold": runtime.thresholds[i]}
        out[i] = recall(plan_blocks(predicted(runtime, i, rec), **pred_rule), plan_blocks(rec["scores"], **true_rule))
    return out


@torch.no_grad()
def tune_thresholds(runtime, loss_fn, batches, *, steps: int, eps: float, lr: float) -> list[dict]:
    """Alg. 1's adjustment, in units of the starting threshold T0_l (so ε and η mean the same in every
    layer whatever its score scale): with u_l = T_l / T0_l and acc = −(held-out mean loss under
    elimination), G_l = (acc(u_l + ε) − acc(u_l − ε)) / 2ε and u_l ← u_l + η·G_l, all layers at once.
    Costs 2 · layers · steps passes over the held-out batches. Returns the per-step history."""
    base = dict(runtime.thresholds)
    units = {i: 1.0 for i in runtime.layers if base[i] > 0}

    def loss_at(u: dict[int, float]) -> float:
        total = weight = 0.0
        with runtime.forced({i: base[i] * u[i] for i in u}):
            for batch in batches:
                s, w = loss_fn(batch)
                total, weight = total + s, weight + w
        return total / max(weight, 1e-12)

    history = []
    for _ in range(steps):
        grads = {i: (loss_at({**units, i: units[i] - eps}) - loss_at({**units, i: units[i] + eps})) / (2 * eps)
                 for i in units}
        units = {i: units[i] + lr * grads[i] for i in units}
        history.append({"loss": loss_at(units), "relative_thresholds": dict(units)})
    runtime.thresholds.update({i: base[i] * units[i] for i in units})
    return history
