"""LiST's data: the K labelled records per class (data.train, or drawn from it with recipe.few_shot), the unlabelled
texts, and the random batches the self-training stage draws from each (a fresh permutation per pass, as a
RandomSampler; the last batch of a pass may be smaller, as the code's DataLoader without drop_last)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..data.formats import column, extract
from ..data.readers import read_records
from ..data.records import RecordError
from ..errors import TokentuneError


def split_few_shot(data_cfg, per_class: int, seed: int, out_dir: Path) -> tuple[Path, list[str]]:
    """data.train as a pool: `per_class` records of each label (a seeded draw) are written, as they are, to
    out_dir/labelled.jsonl; the texts of the others are returned (the unlabelled pool, labels dropped)."""
    records = read_records(data_cfg.train, encoding=data_cfg.encoding, key="data.train", limit=data_cfg.max_records)
    rows = []
    for rec in records:
        try:
            fields = extract(rec, "classification", data_cfg.fields)
        except RecordError:
            if data_cfg.on_bad_record == "error":
                raise
            continue
        rows.append({"text": fields["text"], "label": fields["label"], "record": rec.data})
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    taken: dict = {}
    labelled, rest = [], []
    for i in order:
        label = rows[i]["label"]
        if not isinstance(label, (str, int)):
            raise TokentuneError("few-shot sampling needs one label per record", where="data.train")
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            labelled.append(rows[i]["record"])  # as written, so data.fields still applies
        else:
            rest.append(rows[i]["text"])
    short = {k: v for k, v in taken.items() if v < per_class}
    if short:
        raise TokentuneError(f"data.train has fewer than {per_class} records of label(s) {sorted(map(str, short))}",
                             where="recipe.few_shot.per_class", fix="lower per_class")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "labelled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in labelled))  # in the draw's (shuffled) order
    return path, rest


def read_unlabelled(path: str, data_cfg) -> list[str]:
    """The texts of `path` (field `text`, or data.fields.text); any label in the records is ignored."""
    key = column("text", data_cfg.fields)
    texts = []
    for rec in read_records(path, encoding=data_cfg.encoding, key="recipe.unlabelled"):
        value = rec.data.get(key)
        if not isinstance(value, str) or not value.strip():
            if data_cfg.on_bad_record == "drop":
                continue
            raise TokentuneError(f"an unlabelled record needs a non-empty string field {key!r}", where=rec.source,
                                 fix="give every record a text (map the column with data.fields.text)")
        texts.append(value)
    return texts


def pick(texts: list[str], limit: int | None, seed: int) -> list[str]:
    """A seeded random subset of `limit` texts (all of them when limit is None), in a fixed order."""
    if limit is None or limit >= len(texts):
        return list(texts)
    return random.Random(seed).sample(texts, limit)


class Batches:
    """Index batches over n items, forever: each pass a new seeded permutation, cut into batches."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n == 0:
            raise TokentuneError("nothing to draw batches from", where="recipe")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.passes, self._queue = 0, []

    def next(self) -> list[int]:
        if not self._queue:
            order = list(range(self.n))
            random.Random(self.seed * 1_000_003 + self.passes).shuffle(order)
            self._queue = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
            self.passes += 1
        return self._queue.pop(0)

    @property
    def per_pass(self) -> int:
        return -(-self.n // self.batch_size)
