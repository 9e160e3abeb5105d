"""Data: read records, tokenise them into masked examples, pack and collate them into batches."""

from .collate import collate
from .config import DataConfig
from .example import Example
from .packing import PackedRow, pack, packing_enabled
from .pipeline import Splits, build_data, split_off
from .readers import read_records
from .records import Record, RecordError
from .summary import DataSummary, SplitSummary

__all__ = [
    "DataConfig", "DataSummary", "Example", "PackedRow", "Record", "RecordError", "SplitSummary", "Splits",
    "build_data", "collate", "pack", "packing_enabled", "read_records", "split_off",
]
