"""Greedy packing: whole examples, in order, into rows of at most max_length tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import TokentuneError
from .example import Example


@dataclass
class PackedRow:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)  # restart at 0 for each example
    sample_index: list[int] = field(default_factory=list)  # example.index of each token
    seq_lens: list[int] = field(default_factory=list)  # length of each example in the row
    weights: list[float] = field(default_factory=list)  # per-token loss weights (1.0 where an example has none)

    def __len__(self) -> int:
        return len(self.input_ids)

    def add(self, example: Example) -> None:
        n = len(example.input_ids)
        self.input_ids += example.input_ids
        self.labels += example.labels
        self.position_ids += range(n)
        self.sample_index += [example.index] * n
        self.seq_lens.append(n)
        self.weights += example.weights if example.weights is not None else [1.0] * n


def pack(examples: list[Example], max_length: int) -> list[PackedRow]:
    """Deterministic: a row is closed as soon as the next example does not fit; no example is split."""
    rows: list[PackedRow] = []
    row = PackedRow()
    for ex in examples:
        if ex.class_label is not None:
            raise ValueError("classification examples are not packed: each row needs its own class label")
        if len(ex) > max_length:
            raise ValueError(f"example {ex.source} has {len(ex)} tokens > max_length {max_length}; "
                             "pack with the max_length the examples were built with")
        if row.input_ids and len(row) + len(ex) > max_length:
            rows.append(row)
            row = PackedRow()
        row.add(ex)
    if row.input_ids:
        rows.append(row)
    return rows


def packing_enabled(cfg, task: str, fmt: str | None = None) -> bool:
    """data.packing, resolved: None packs causal training data; classification and preference data (`fmt`, the
    detected format) never pack."""
    if fmt == "preference":
        if cfg.packing:
            raise TokentuneError("preference data is not packed: each pair needs its chosen and rejected rows",
                                 where="data.packing", fix="remove data.packing or set it to false")
        return False
    if task == "classification" or fmt == "classification":  # text + label rows (verbalizer: causal task too)
        if cfg.packing:
            raise TokentuneError("packing does not apply to classification (one label per row)",
                                 where="data.packing", fix="remove data.packing or set it to false")
        return False
    return True if cfg.packing is None else cfg.packing
