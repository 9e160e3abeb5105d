"""Read a data file (or a datasets directory) into records that remember where they came from."""

from __future__ import annotations

import codecs
import csv
import importlib
import json
from pathlib import Path

from ..errors import TokentuneError
from .records import Record

SUPPORTED = (".jsonl", ".json", ".csv", ".parquet")
DATA_EXTRA = "pip install tokentune[data]"


def read_records(path: str, *, encoding: str = "utf-8", key: str = "data.train", limit: int | None = None,
                 splits: tuple[str, ...] = ("train",)) -> list[Record]:
    """Every record of `path`, in file order (at most `limit`). `key` is the config key named in errors;
    `splits` are the DatasetDict split names to use, first present wins."""
    p = Path(path).expanduser()
    if not p.exists():
        raise TokentuneError(f"data file {path!r} does not exist", where=f"{key}: {path}",
                             fix=f"point {key} at an existing file or datasets directory")
    if p.is_dir():
        records = _read_dataset_dir(p, path, limit, splits)
    else:
        suffix = p.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}
        if suffix == ".parquet":
            records = _read_parquet(p, path, limit)
        elif suffix in readers:
            text_encoding = _reading_encoding(encoding)
            try:
                records = readers[suffix](p, path, text_encoding, limit)
            except UnicodeDecodeError:
                raise _decode_error(p, path, encoding) from None
        else:
            raise TokentuneError(f"unsupported data file type {p.suffix or '(no extension)'!r}",
                                 where=f"{key}: {path}",
                                 fix=f"use one of {', '.join(SUPPORTED)} or a datasets.save_to_disk directory")
    if not records:
        raise TokentuneError(f"{path} holds no records", where=f"{key}: {path}", fix="add data or fix the path")
    return records


def _reading_encoding(encoding: str) -> str:
    # utf-8-sig reads plain UTF-8 too, and drops the BOM that spreadsheet exports put before the header.
    return "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding


def _decode_error(p: Path, name: str, encoding: str) -> TokentuneError:
    raw = p.read_bytes()  # only on this error path: decoding it whole gives the absolute offset
    try:
        raw.decode(encoding)
        offset = 0
    except UnicodeDecodeError as exc:
        offset = exc.start
    line = raw.count(b"\n", 0, offset) + 1
    return TokentuneError(
        f"{name} is not valid {encoding}: byte 0x{raw[offset]:02x} at byte offset {offset} (line {line})",
        where=f"{name}:{line}", fix="set data.encoding to the file's encoding, e.g. data.encoding: latin-1")


def _object(obj, source: str) -> Record:
    if not isinstance(obj, dict):
        raise TokentuneError(f"expected a JSON object with named fields, got {type(obj).__name__}",
                             where=source, fix='write each record as {"field": value, ...}')
    return Record(obj, source)


def _read_jsonl(p: Path, name: str, encoding: str, limit: int | None) -> list[Record]:
    out = []
    with open(p, encoding=encoding) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TokentuneError(f"malformed JSON on line {lineno}: {exc.msg} (column {exc.colno})",
                                     where=f"{name}:{lineno}", fix="fix or remove that line") from None
            out.append(_object(obj, f"{name}:{lineno}"))
            if limit is not None and len(out) >= limit:
                break
    return out


def _read_json(p: Path, name: str, encoding: str, limit: int | None) -> list[Record]:
    with open(p, encoding=encoding) as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as exc:
            raise TokentuneError(f"malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
                                 where=f"{name}:{exc.lineno}", fix="fix the JSON, or use .jsonl") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        raise TokentuneError(f"{name} must hold a list of records or {{\"data\": [...]}}", where=name,
                             fix="wrap the records in a JSON list")
    doc = doc[:limit] if limit is not None else doc
    return [_object(obj, f"{name}[record {i}]") for i, obj in enumerate(doc)]


def _read_csv(p: Path, name: str, encoding: str, limit: int | None) -> list[Record]:
    # Long documents in one cell are normal for training data; the default cap is 128 KiB.
    csv.field_size_limit(2**31 - 1)
    out = []
    with open(p, encoding=encoding, newline="") as f:
        rows = csv.reader(f)
        try:
            header = next(rows, None)
            if not header:
                return []
            if len(set(header)) != len(header):
                dupes = sorted({h for h in header if header.count(h) > 1})
                raise TokentuneError(f"duplicate column names in the header: {dupes}", where=f"{name}:1",
                                     fix="give every column a distinct name")
            last = rows.line_num
            for cells in rows:
                start, last = last + 1, rows.line_num  # a quoted cell may span lines: name the first
                if not cells:
                    continue
                if len(cells) != len(header):
                    raise TokentuneError(f"row has {len(cells)} fields, the header has {len(header)}",
                                         where=f"{name}:{start}",
                                         fix="quote cells that contain the delimiter, or fix the row")
                out.append(Record(dict(zip(header, cells)), f"{name}:{start}"))
                if limit is not None and len(out) >= limit:
                    break
        except csv.Error as exc:
            raise TokentuneError(f"malformed CSV: {exc}", where=f"{name}:{rows.line_num}") from None
    return out


def _require(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TokentuneError(f"reading {what} needs the optional package {module.split('.')[0]!r}",
                             fix=DATA_EXTRA) from None


def _read_parquet(p: Path, name: str, limit: int | None) -> list[Record]:
    pq = _require("pyarrow.parquet", ".parquet files")
    try:
        table = pq.read_table(p)
    except Exception as exc:  # pyarrow raises several types for a damaged or foreign file
        raise TokentuneError(f"could not read {name} as parquet: {exc}", where=name) from None
    if limit is not None:
        table = table.slice(0, limit)
    return [Record(row, f"{name}[row {i}]") for i, row in enumerate(table.to_pylist())]


def _read_dataset_dir(p: Path, name: str, limit: int | None, splits: tuple[str, ...]) -> list[Record]:
    datasets = _require("datasets", "a datasets directory")
    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError:
        raise TokentuneError(f"{name} is a directory but not one saved by datasets.save_to_disk", where=name,
                             fix="point at a data file, or save the dataset with Dataset.save_to_disk") from None
    label = name
    if isinstance(ds, datasets.DatasetDict):
        split = next((s for s in splits if s in ds), None)
        if split is None:
            raise TokentuneError(f"{name} holds splits {sorted(ds)}, none of {list(splits)}", where=name,
                                 fix="save the split under one of those names, or point at a single Dataset")
        ds, label = ds[split], f"{name}[{split}]"
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [Record(row, f"{label}[row {i}]") for i, row in enumerate(ds.to_list())]
