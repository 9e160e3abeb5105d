"""DataConfig + tokenizer -> tokenised train/eval examples and a summary of what happened."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from ..errors import TokentuneError
from .chat import check_chat_tokenizer
from .config import DataConfig
from .example import Example, finalize
from .formats import detect_format, extract
from .labels import LabelSpace
from .readers import read_records
from .records import Record, RecordError
from .summary import DataSummary, SplitSummary
from .tokenize import drafter

EVAL_SPLITS = ("validation", "eval", "test")  # DatasetDict splits data.eval may name, first present wins


@dataclass
class Splits:
    train: list[Example]
    eval: list[Example] | None
    summary: DataSummary
    label_names: list[str] | None  # classification: class id -> name
    format: str


def build_data(cfg: DataConfig, tokenizer, *, task: Literal["causal", "classification"], seed: int) -> Splits:
    train = read_records(cfg.train, encoding=cfg.encoding, key="data.train", limit=cfg.max_records)
    evals = None
    if cfg.eval is not None:
        evals = read_records(cfg.eval, encoding=cfg.encoding, key="data.eval", limit=cfg.max_records,
                             splits=EVAL_SPLITS)
    elif cfg.eval_fraction is not None:
        train, evals = split_off(train, cfg.eval_fraction, seed)
    fmt = detect_format(train[0], cfg.fields) if cfg.format == "auto" else cfg.format
    _check_task(fmt, task)
    eos_id = _check_tokenizer(fmt, tokenizer, cfg)

    parts = {"train": train} if evals is None else {"train": train, "eval": evals}
    summaries = {name: SplitSummary(records=len(records)) for name, records in parts.items()}
    items = {name: _extract(records, fmt, cfg, summaries[name]) for name, records in parts.items()}
    labels = None
    if fmt == "classification":
        labels = LabelSpace.from_train([(c["label"], rec.source) for rec, c in items["train"]])
    examples = {}
    for name in parts:
        examples[name] = _encode(items[name], fmt, tokenizer, cfg, eos_id, labels, summaries[name])
        if not examples[name]:
            s = summaries[name]
            raise TokentuneError(f"the {name} split has no usable records: all {s.records} were dropped",
                                 where=cfg.eval if name == "eval" and cfg.eval else cfg.train,
                                 fix="fix these records (the first 20):\n  " + "\n  ".join(s.dropped_sources))
    return Splits(train=examples["train"], eval=examples.get("eval"), summary=DataSummary(fmt, summaries),
                  label_names=labels.names if labels else None, format=fmt)


def split_off(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, eval): a seeded shuffle picks round(fraction * n) records (at least 1) as eval; both keep
    file order."""
    n = len(records)
    k = max(1, round(fraction * n))
    if k >= n:
        raise TokentuneError(f"data.eval_fraction={fraction} of {n} records leaves no training records",
                             where="data.eval_fraction", fix="lower data.eval_fraction, or add records")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def _check_task(fmt: str, task: str) -> None:
    if fmt == "classification" and task != "classification":
        raise TokentuneError(
            "the data is classification (text + label) but the model is trained as a causal LM",
            where="data.format", fix="for a causal model use prompt_completion (the label text as completion), "
                                     "data.format: text to ignore the label, model.task: classification, "
                                     "or objective verbalizer (label-word likelihood)")
    if task == "classification" and fmt != "classification":
        raise TokentuneError(f"a classification model needs text + label records; the data is {fmt}",
                             where="data.format",
                             fix="map your columns with data.fields: {text: ..., label: ...}, or model.task: causal")


def _check_tokenizer(fmt: str, tokenizer, cfg: DataConfig) -> int | None:
    """The EOS id to append (None: none appended); fails early on what the format cannot do without."""
    if fmt == "messages":
        check_chat_tokenizer(tokenizer)
    if not cfg.add_eos or fmt not in ("text", "prompt_completion", "preference"):
        return None
    if tokenizer.eos_token_id is None:
        raise TokentuneError("data.add_eos is on but the tokenizer has no EOS token, so the model "
                             "cannot learn where to stop", where="data.add_eos",
                             fix="use a tokenizer with an eos_token, or set data.add_eos: false")
    return tokenizer.eos_token_id


def _extract(records: list[Record], fmt: str, cfg: DataConfig, summary: SplitSummary) -> list[tuple[Record, dict]]:
    out = []
    for rec in records:
        try:
            out.append((rec, extract(rec, fmt, cfg.fields)))
        except RecordError as err:
            _bad(err, cfg, summary)
    return out


def _encode(items, fmt, tokenizer, cfg: DataConfig, eos_id, labels, summary: SplitSummary) -> list[Example]:
    if fmt == "preference":  # two sequences per record: PreferencePairs (preference.py)
        from .preference import encode_pairs

        return encode_pairs(items, tokenizer, cfg, eos_id, summary, lambda err: _bad(err, cfg, summary))
    draft = drafter(fmt, items, tokenizer, eos_id=eos_id, assistant_only=cfg.assistant_only, labels=labels)
    examples: list[Example] = []
    for i, (rec, _) in enumerate(items):
        try:
            example, truncated = finalize(draft(i), source=rec.source, index=len(examples),
                                          max_length=cfg.max_length, side=cfg.truncation_side,
                                          require_loss=fmt != "classification")
        except RecordError as err:
            _bad(err, cfg, summary)
            continue
        examples.append(example)
        summary.keep(example, truncated)
    return examples


def _bad(err: RecordError, cfg: DataConfig, summary: SplitSummary) -> None:
    if cfg.on_bad_record == "error":
        raise err
    summary.drop(err)
