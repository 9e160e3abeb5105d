"""`tokentune critical-tokens`: score a data file once with the two contrast models and write every record
back with its scores, for a later DPO loader.

Each output line is the input record plus
  critical_token_ids  the record's token ids as the data pipeline makes them (template, EOS, truncation)
  critical_scores     one entry per token id: s_t for a label token (the score of that token given the tokens
                      before it), null where the token carries no loss (prompt, template, first token)
so critical_scores[t] belongs to critical_token_ids[t]; a loader that tokenises the record again can check the
ids and align by position. Records the pipeline drops (data.on_bad_record: drop) are not written."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import parse_overrides
from ..data.collate import collate
from ..data.config import DataConfig
from ..data.pipeline import build_data
from ..data.readers import read_records
from ..engine.atomic import atomic_write_text
from ..errors import TokentuneError
from .critical_tokens_models import contrast_run_config, load_contrast_pair
from .critical_tokens_score import critical_scores


def data_config(positive: Path, data: str, overrides: list[str]) -> DataConfig:
    """The positive run's data section (format, fields, max_length, ...) reading `data` instead, with
    data.KEY=VALUE overrides."""
    tree = contrast_run_config(positive, "positive").data.model_dump()
    tree.update(train=data, eval=None, eval_fraction=None, max_records=None)
    for key, value in parse_overrides(overrides):
        if not key.startswith("data.") or key.count(".") != 1:
            raise TokentuneError(f"override {key!r} is not a data key", where=key,
                                 fix="only data.KEY=VALUE overrides apply here, e.g. data.max_length=1024")
        tree[key.split(".", 1)[1]] = value
    try:
        return DataConfig.model_validate(tree)
    except ValueError as exc:
        raise TokentuneError(f"invalid data override: {exc}", where=" ".join(overrides)) from None


def score_file(data: str, positive: Path, negative: Path, out: Path, env, *, beta: float = 1.0,
               batch_size: int = 8, share_base: bool = True, overrides: list[str] = ()) -> dict:
    if beta < 0 or batch_size < 1:
        raise TokentuneError(f"need beta >= 0 and batch size >= 1, got beta={beta}, batch size={batch_size}",
                             where="--beta / --batch-size")
    cfg = data_config(Path(positive), data, list(overrides))
    pair = load_contrast_pair(positive, negative, env, share_base=share_base)
    chunk = contrast_run_config(Path(positive), "positive").train.loss_chunk_size
    examples = build_data(cfg, pair.tokenizer, task="causal", seed=0).train
    records = {r.source: r.data for r in read_records(cfg.train, encoding=cfg.encoding, key="DATA")}
    lines, total, n_scored = [], 0.0, 0
    for start in range(0, len(examples), batch_size):
        part = examples[start:start + batch_size]
        batch = collate(part, pair.tokenizer.pad_token_id, packed=False)
        batch = {k: v.to(env.device) for k, v in batch.items()}
        scores = critical_scores(pair, batch, beta, chunk).cpu()
        for i, ex in enumerate(part):
            row = scores[i, :len(ex.input_ids)].tolist()
            values = [None if t == 0 or label == -100 else row[t] for t, label in enumerate(ex.labels)]
            scored = [v for v in values if v is not None]
            total, n_scored = total + sum(scored), n_scored + len(scored)
            lines.append(json.dumps({**records[ex.source], "critical_token_ids": list(ex.input_ids),
                                     "critical_scores": values}, ensure_ascii=False))
    atomic_write_text(Path(out), "".join(line + "\n" for line in lines))
    return {"records": len(lines), "label_tokens": n_scored, "mean_score": total / max(n_scored, 1),
            "beta": beta, "shared_base": pair.shared, "out": str(out)}
