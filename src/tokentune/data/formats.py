"""Which format a data set is in, and each record's fields for it, checked."""

from __future__ import annotations

from ..errors import TokentuneError
from .chat import check_messages
from .labels import normalise_label
from .records import Record, RecordError

# Canonical fields each format reads, in the order auto-detection tries them.
FORMAT_FIELDS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "classification": ("text", "label"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),  # last: records of the other formats are detected as before
}
_EXPECTED = ("messages | prompt + completion | text + label (classification; a list of labels, or `labels`: "
             "multi-label) | text | prompt + chosen + rejected (preference)")
_MAPPING_HINT = ("map your columns with data.fields, e.g. fields: {prompt: question, completion: answer}, "
                 "or set data.format")


def column(canon: str, fields: dict[str, str], data: dict | None = None) -> str:
    """The record's column for a canonical field. Multi-label records may say `labels` (a list) for `label`."""
    if canon in fields:
        return fields[canon]
    if canon == "label" and data is not None and canon not in data and isinstance(data.get("labels"), list):
        return "labels"
    return canon


def detect_format(record: Record, fields: dict[str, str]) -> str:
    for fmt, needed in FORMAT_FIELDS.items():
        if all(column(c, fields, record.data) in record.data for c in needed):
            return fmt
    raise TokentuneError(
        f"cannot tell the data format: the first record has fields {sorted(record.data)}; "
        f"expected one of {_EXPECTED}", where=record.source, fix=_MAPPING_HINT)


def extract(record: Record, fmt: str, fields: dict[str, str]) -> dict:
    """The record's canonical fields for `fmt`, type-checked (RecordError names the record)."""
    if fmt == "preference":  # prompt and replies may be strings or message lists
        from .preference import extract_preference

        return extract_preference(record, fields)
    out = {}
    for canon in FORMAT_FIELDS[fmt]:
        col = column(canon, fields, record.data)
        if col not in record.data:
            mapped = f" (data.fields.{canon})" if col != canon else ""
            raise RecordError(f"missing field {col!r}{mapped} needed by format {fmt}; the record has "
                              f"{sorted(record.data)}", source=record.source, fix=_MAPPING_HINT)
        out[canon] = _checked(canon, record.data[col], source=record.source, column=col)
    return out


def _checked(canon: str, value, *, source: str, column: str):
    if canon == "messages":
        return check_messages(value, source=source, column=column)
    if canon == "label":
        return normalise_label(value, source=source, column=column)
    if not isinstance(value, str):
        raise RecordError(f"field {column!r} must be a string, got {type(value).__name__} {value!r:.60}",
                          source=source)
    # An empty prompt is legal (unconditional generation); empty text or completion is a data bug.
    if canon != "prompt" and not value.strip():
        raise RecordError(f"field {column!r} is empty", source=source)
    return value
