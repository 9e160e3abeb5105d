"""Class labels: ints are ids as they stand; names map to ids by their sorted order in the train split.

Multi-label records carry a list of labels (possibly empty); a train split with any list is multi-label, every
record's target is then a multi-hot vector over the label space (a lone label counts as a one-element list)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import TokentuneError
from .records import RecordError

_INT = re.compile(r"-?\d+")


def normalise_label(value, *, source: str, column: str) -> int | str | tuple:
    """An int, or a label name. Digit strings (CSV cells) become ints so a CSV and a JSONL of the
    same data give the same ids. A list (multi-label) becomes a tuple of those, duplicates removed."""
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, (list, tuple)) for v in value):
            raise RecordError(f"field {column!r} holds a list inside the list of labels", source=source,
                              fix="give each record a flat list of label names or ids")
        return tuple(dict.fromkeys(normalise_label(v, source=source, column=column) for v in value))
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise RecordError(f"field {column!r} (the label) is empty", source=source)
        if _INT.fullmatch(value):
            value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise RecordError(f"field {column!r} (the label) must be an integer or a string, got "
                          f"{type(value).__name__} {value!r}", source=source)
    if isinstance(value, int) and value < 0:
        raise RecordError(f"label {value} is negative; class ids start at 0", source=source)
    return value


@dataclass
class LabelSpace:
    names: list[str]
    ids: dict[str, int] | None  # None: labels are integer ids already
    multi: bool = False  # multi-label: targets are multi-hot vectors

    @classmethod
    def from_train(cls, labelled: list[tuple[int | str | tuple, str]]) -> "LabelSpace":
        """`labelled`: (normalised label, source) of every train record."""
        multi = any(isinstance(v, tuple) for v, _ in labelled)
        if multi:
            labelled = [(x, s) for v, s in labelled for x in (v if isinstance(v, tuple) else (v,))]
            if not labelled:
                raise TokentuneError("every train record has an empty list of labels", where="data.train",
                                     fix="give the records their labels")
        space = cls._single(labelled)
        space.multi = multi
        return space

    @classmethod
    def _single(cls, labelled: list[tuple[int | str, str]]) -> "LabelSpace":
        ints = [(v, s) for v, s in labelled if isinstance(v, int)]
        names = [(v, s) for v, s in labelled if isinstance(v, str)]
        if ints and names:
            raise TokentuneError(f"the train labels mix integer ids ({ints[0][1]}: {ints[0][0]}) and names "
                                 f"({names[0][1]}: {names[0][0]!r})", where=names[0][1],
                                 fix="use either class ids or class names for every record")
        if ints:
            return cls([str(i) for i in range(max(v for v, _ in ints) + 1)], None)
        ordered = sorted({v for v, _ in names})
        return cls(ordered, {n: i for i, n in enumerate(ordered)})

    def target(self, value: int | str | tuple, *, source: str) -> int | list[float]:
        """The class id (single-label), or the multi-hot vector over the label space (multi-label)."""
        if not self.multi:
            if isinstance(value, tuple):
                raise RecordError("this record has a list of labels but the train split is single-label",
                                  source=source, fix="give the train records lists of labels too (multi-label), "
                                                     "or a single label here")
            return self.id_of(value, source=source)
        hot = [0.0] * len(self.names)
        for v in value if isinstance(value, tuple) else (value,):
            hot[self.id_of(v, source=source)] = 1.0
        return hot

    def id_of(self, value: int | str, *, source: str) -> int:
        if self.ids is None:
            if isinstance(value, int) and value < len(self.names):
                return value
            raise RecordError(f"label {value!r} is not a class id seen in the train split "
                              f"(0..{len(self.names) - 1})", source=source)
        if isinstance(value, str) and value in self.ids:
            return self.ids[value]
        raise RecordError(f"label {value!r} does not occur in the train split (labels: {self.names})",
                          source=source, fix="add train records with this label, or fix the label")
