"""GOT-D (Kang et al., ICLR 2024, "Get More for Less"): choose, from a large unlabelled pool, the records
whose extra probability mass would most decrease the OT distance between the pool and a small target set
(the most negative calibrated gradient of the OT value; see got_d_ot.py). These are the samples the pool
(a proxy of the pre-training data) under-represents relative to the target, not the ones that merely look
like it. With `contrast`, the most positive: samples that push away from a negative target set (detox).

GOT-D is offline: `tokentune select POOL --target TARGET --budget N -o OUT.jsonl` writes the chosen records
(every original field plus `got_d_score`, `got_d_rank`) for a later `tokentune train`. It is registered in
the selector slot so that `tokentune methods` and the config schema list it; used inside a training run it
stops with an error that says to run `tokentune select` instead.
"""

from __future__ import annotations

import datetime
import decimal
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..engine.atomic import atomic_write_text
from ..errors import TokentuneError
from ..registry import register
from .got_d_embed import DEFAULT_EMBEDDER, embed_texts, load_embedder, record_texts, resolve_device
from .got_d_ot import OTSolution, calibrated_gradient, require_pot, solve_ot

log = logging.getLogger(__name__)

SCORE_FIELD, RANK_FIELD = "got_d_score", "got_d_rank"


class GotDConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["got_d"] = "got_d"
    budget: int = Field(gt=0, description="how many candidate records to select")
    embedder: str = Field(DEFAULT_EMBEDDER, description="builtin:NAME, a local HF encoder dir, or a hub id (online)")
    text_field: str | None = Field(None, description="read this string field; default: detect the format")
    cost: Literal["cosine", "l2", "l1"] = "cosine"
    epsilon: float = Field(0.05, gt=0, description="entropic regularisation (times mean cost if relative)")
    relative_epsilon: bool = True
    max_iter: int = Field(2000, gt=0, description="Sinkhorn iterations at most")
    tol: float = Field(1e-6, gt=0, description="stop when the target-marginal L2 error is below this")
    contrast: bool = Field(False, description="select the most positive gradients (away from the target)")
    dedup: bool = Field(False, description="skip candidates whose text equals an already selected one")
    batch_size: int = Field(64, gt=0, description="texts per embedding batch")
    max_length: int = Field(256, gt=0, description="tokens per text for the embedder (truncated)")
    device: Literal["auto", "cpu", "cuda"] = "auto"


@register("selector", "got_d", config=GotDConfig,
          description="GOT-D (offline): pool samples whose OT-gradient to a target set is most negative; "
                      "run `tokentune select`")
class GotD:
    name = "got_d"
    needs: set[str] = set()

    def __init__(self, config: GotDConfig):
        self.config = config

    def select(self, batch: dict, signals) -> dict:
        raise TokentuneError(
            "got_d is an offline selector: it chooses records from a pool before training, not samples or "
            "tokens inside a training batch", where="selectors: got_d",
            fix=f"remove got_d from selectors, run `tokentune select POOL.jsonl --target TARGET.jsonl "
                f"--budget {self.config.budget} -o selected.jsonl`, and train on selected.jsonl")


@dataclass
class Ranking:
    order: np.ndarray  # every candidate index, best first
    scores: np.ndarray  # calibrated gradient of each candidate, in candidate order
    solution: OTSolution


def rank_candidates(x: torch.Tensor, y: torch.Tensor, *, cost: str = "cosine", epsilon: float = 0.05,
                    relative_epsilon: bool = True, max_iter: int = 2000, tol: float = 1e-6,
                    contrast: bool = False) -> Ranking:
    """Rank candidate embeddings x [N, d] against target embeddings y [M, d]: most negative calibrated
    gradient first (most positive with `contrast`); ties keep candidate order."""
    solution = solve_ot(x, y, cost=cost, epsilon=epsilon, relative_epsilon=relative_epsilon,
                        max_iter=max_iter, tol=tol)
    scores = calibrated_gradient(solution.f)
    order = np.argsort(-scores if contrast else scores, kind="stable")
    if not solution.converged:
        log.warning("Sinkhorn stopped after %d iterations with marginal error %.2e > tol %.0e; the ranking "
                    "may be rough (raise max_iter or epsilon)", solution.iterations, solution.marginal_error, tol)
    return Ranking(order, scores, solution)


def select_subset(candidates, targets, budget: int, *, cost: str = "cosine", epsilon: float = 0.05,
                  relative_epsilon: bool = True, contrast: bool = False, max_iter: int = 2000, tol: float = 1e-6,
                  embedder: str | None = None, device: str = "auto") -> list[tuple[int, float]]:
    """The `budget` best candidates as (index into candidates, calibrated gradient), best first.

    `candidates` and `targets` are both embeddings (numpy arrays or tensors, [N, d] and [M, d]) or both
    lists of texts, embedded with `embedder` (default builtin:minilm-l6)."""
    texts = [_is_texts(candidates), _is_texts(targets)]
    if texts[0] != texts[1]:
        raise TokentuneError("candidates and targets must both be texts or both be embeddings",
                             where="select_subset", fix="embed both the same way")
    dev = resolve_device(device)
    require_pot()
    if texts[0]:
        _check_budget(budget, len(candidates), "budget")  # before the embedding work
        loaded = load_embedder(embedder or DEFAULT_EMBEDDER, dev)
        x, y = embed_texts(list(candidates), loaded=loaded), embed_texts(list(targets), loaded=loaded)
    else:
        if embedder is not None:
            raise TokentuneError("embedder is set but candidates and targets are already embeddings",
                                 where="select_subset(embedder=...)", fix="pass texts, or drop embedder")
        x, y = torch.as_tensor(candidates).to(dev), torch.as_tensor(targets).to(dev)
    _check_budget(budget, x.shape[0], "budget")
    ranking = rank_candidates(x, y, cost=cost, epsilon=epsilon, relative_epsilon=relative_epsilon,
                              max_iter=max_iter, tol=tol, contrast=contrast)
    return [(int(i), float(ranking.scores[i])) for i in ranking.order[:budget]]


def _is_texts(items) -> bool:
    return isinstance(items, (list, tuple)) and len(items) > 0 and all(isinstance(t, str) for t in items)


def _check_budget(budget: int, pool: int, where: str) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise TokentuneError(f"budget must be a positive integer, got {budget!r}", where=where)
    if budget > pool:
        raise TokentuneError(f"budget {budget} is larger than the candidate pool ({pool} records)", where=where,
                             fix=f"use a budget of at most {pool}, or add candidates")


def _config(options: dict) -> GotDConfig:
    try:
        return GotDConfig(**options)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "options"
        raise TokentuneError(f"invalid {field}: {err['msg']} (got {err.get('input')!r})",
                             where=f"--{field.replace('_', '-')}", fix="see `tokentune select --help`") from None


def select_files(data: str, target: str, out: str, **options) -> dict:
    """Read the pool `data` and the `target` set (any format tokentune reads), select with GOT-D, and write
    the chosen records in rank order to `out` (JSONL) and a summary to `out`.summary.json. Returns the
    summary. `options` are GotDConfig's fields (budget is required)."""
    from ..data.readers import read_records

    cfg = _config(options)
    out_path = Path(out).expanduser()
    if out_path.suffix.lower() != ".jsonl":
        raise TokentuneError(f"the output {out!r} must be a .jsonl file (one selected record per line)",
                             where="-o/--out", fix="name the output e.g. selected.jsonl")
    start = time.perf_counter()
    pool = read_records(data, key="DATA")
    goal = read_records(target, key="--target")
    _check_budget(cfg.budget, len(pool), "--budget")
    pool_texts, pool_how = record_texts(pool, text_field=cfg.text_field)
    goal_texts, goal_how = record_texts(goal, text_field=cfg.text_field)
    if cfg.dedup and len(set(pool_texts)) < cfg.budget:
        raise TokentuneError(f"budget {cfg.budget} is larger than the {len(set(pool_texts))} distinct texts "
                             "of the pool (dedup is on)", where="--budget", fix="lower the budget, or drop --dedup")
    t_read = time.perf_counter()

    dev = resolve_device(cfg.device)
    require_pot()  # fail before the embedding work if POT is missing (its import alone takes seconds)
    loaded = load_embedder(cfg.embedder, dev)
    t_load = time.perf_counter()
    log.info("GOT-D: embedding %d candidates and %d target records with %s on %s",
             len(pool), len(goal), cfg.embedder, dev)
    x = embed_texts(pool_texts, batch_size=cfg.batch_size, max_length=cfg.max_length, loaded=loaded)
    y = embed_texts(goal_texts, batch_size=cfg.batch_size, max_length=cfg.max_length, loaded=loaded)
    t_embed = time.perf_counter()

    ranking = rank_candidates(x, y, cost=cfg.cost, epsilon=cfg.epsilon, relative_epsilon=cfg.relative_epsilon,
                              max_iter=cfg.max_iter, tol=cfg.tol, contrast=cfg.contrast)
    t_solve = time.perf_counter()

    chosen, skipped = _take(ranking.order, cfg.budget, pool_texts if cfg.dedup else None)
    lines = []
    for rank, i in enumerate(chosen, 1):
        row = {**pool[i].data, SCORE_FIELD: float(ranking.scores[i]), RANK_FIELD: rank}
        lines.append(_dumps(row, pool[i].source))
    atomic_write_text(out_path, "\n".join(lines) + "\n")
    t_write = time.perf_counter()

    sol, picked = ranking.solution, ranking.scores[chosen]
    summary = {
        "method": "got_d",
        "candidates": {"path": str(data), "records": len(pool), "text": pool_how},
        "target": {"path": str(target), "records": len(goal), "text": goal_how},
        "selected": len(chosen), "output": str(out_path),
        "config": cfg.model_dump(mode="json"),
        "embedding": {"model": cfg.embedder, "dim": int(x.shape[1]), "device": str(dev),
                      "pooling": "mean over the attention mask, L2-normalised"},
        "solver": {"library": "POT", "method": "sinkhorn_log", "epsilon_absolute": sol.epsilon,
                   "iterations": sol.iterations, "marginal_error": sol.marginal_error, "converged": sol.converged},
        "ot_cost": sol.ot_cost, "ot_value_regularised": sol.ot_value,
        "scores": {"selected_min": float(picked.min()), "selected_max": float(picked.max()),
                   "pool_min": float(ranking.scores.min()), "pool_max": float(ranking.scores.max())},
        "duplicates_skipped": skipped,
        "timings_s": {"read": t_read - start, "load": t_load - t_read, "embed": t_embed - t_load,
                      "solve": t_solve - t_embed, "write": t_write - t_solve, "total": t_write - start},
    }
    atomic_write_text(summary_path(out_path), json.dumps(summary, indent=2) + "\n")
    log.info("GOT-D: selected %d of %d in %.1f s (embed %.1f s, OT %.1f s, %d Sinkhorn iterations) -> %s",
             len(chosen), len(pool), t_write - start, t_embed - t_load, t_solve - t_embed, sol.iterations, out_path)
    return summary


def summary_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".summary.json")


def _take(order: np.ndarray, budget: int, texts: list[str] | None) -> tuple[list[int], int]:
    """The first `budget` indices of `order`; with texts, skipping texts already taken. (indices, skipped)."""
    if texts is None:
        return [int(i) for i in order[:budget]], 0
    seen: set[str] = set()
    chosen, skipped = [], 0
    for i in order:
        if texts[i] in seen:
            skipped += 1
            continue
        seen.add(texts[i])
        chosen.append(int(i))
        if len(chosen) == budget:
            break
    return chosen, skipped


def _dumps(row: dict, source: str) -> str:
    def default(value):
        if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
            return value.isoformat()
        if isinstance(value, decimal.Decimal):
            return str(value)
        raise TypeError(type(value).__name__)

    try:
        return json.dumps(row, ensure_ascii=False, default=default)
    except (TypeError, ValueError) as exc:
        raise TokentuneError(f"this record cannot be written as JSON ({exc})", where=source,
                             fix="convert binary or custom-typed fields to strings first") from None
