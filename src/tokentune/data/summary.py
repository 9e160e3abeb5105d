"""What the pipeline read, kept, dropped and truncated, per split."""

from __future__ import annotations

from dataclasses import dataclass, field

from .example import IGNORE, Example
from .records import RecordError

MAX_LISTED = 20  # dropped records named one by one; the rest are counted


@dataclass
class SplitSummary:
    records: int = 0  # read from the file
    examples: int = 0  # kept
    dropped: int = 0
    dropped_sources: list[str] = field(default_factory=list)  # "train.jsonl:3: missing field 'text' ..."
    truncated: int = 0
    tokens: int = 0
    loss_tokens: int = 0

    def drop(self, err: RecordError) -> None:
        self.dropped += 1
        if len(self.dropped_sources) < MAX_LISTED:
            self.dropped_sources.append(f"{err.source}: {err.what}")

    def keep(self, example: Example, truncated: bool) -> None:
        self.examples += 1
        self.truncated += truncated
        self.tokens += len(example.input_ids)
        self.loss_tokens += sum(label != IGNORE for label in example.labels)

    def to_dict(self) -> dict:
        return {"records": self.records, "examples": self.examples, "dropped": self.dropped,
                "dropped_sources": list(self.dropped_sources),
                "dropped_unlisted": self.dropped - len(self.dropped_sources),
                "truncated": self.truncated, "tokens": self.tokens, "loss_tokens": self.loss_tokens}


@dataclass
class DataSummary:
    format: str
    splits: dict[str, SplitSummary]  # "train", and "eval" when there is one

    def to_dict(self) -> dict:
        return {"format": self.format, **{name: s.to_dict() for name, s in self.splits.items()}}

    def render(self):
        from rich.table import Table

        table = Table(title=f"data ({self.format})")
        table.add_column("")
        for name in self.splits:
            table.add_column(name, justify="right")
        for row in ("records", "examples", "dropped", "truncated", "tokens", "loss_tokens"):
            table.add_row(row.replace("_", " "), *(f"{getattr(s, row):,}" for s in self.splits.values()))
        dropped = [src for s in self.splits.values() for src in s.dropped_sources]
        if dropped:
            unlisted = sum(s.dropped - len(s.dropped_sources) for s in self.splits.values())
            more = f"\n... and {unlisted} more" if unlisted else ""
            table.caption = "dropped:\n" + "\n".join(dropped) + more
        return table
