"""A raw record with its location, and the error for one bad record (droppable with on_bad_record: drop)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import TokentuneError


@dataclass
class Record:
    data: dict
    source: str  # "train.jsonl:17" (1-based line) or "train.parquet[row 5]" (0-based row)


class RecordError(TokentuneError):
    """A problem confined to one record. The pipeline raises it, or drops and reports the record."""

    def __init__(self, what: str, *, source: str, fix: str | None = None):
        super().__init__(what, where=source, fix=fix)
        self.source = source
