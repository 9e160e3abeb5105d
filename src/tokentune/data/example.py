"""The tokenised record (Example) and the last step that makes one: truncation and the loss checks."""

from __future__ import annotations

from dataclasses import dataclass

from .records import RecordError

IGNORE = -100


@dataclass
class Draft:
    """A tokenised record before truncation."""

    input_ids: list[int]
    labels: list[int]
    n_prompt: int | None = None  # leading tokens that are the generation prompt
    reference: str | None = None
    class_label: int | list[float] | None = None  # a list: multi-hot (multi-label)
    weights: list[float] | None = None  # per-token loss weights (same length as input_ids); None: 1.0


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length, unshifted (labels[t] is the target at t), -100 = no loss; labels[0] = -100
    source: str  # "train.jsonl:17"
    index: int  # position of this example in its split's list (dense, 0..n-1)
    prompt_ids: list[int] | None = None  # what generation continues from (prompt_completion, messages)
    reference: str | None = None  # the expected completion text, for exact match
    class_label: int | list[float] | None = None  # classification: class id, or multi-hot vector (multi-label)
    weights: list[float] | None = None  # per-token loss weights, aligned with labels; None: 1.0 on label tokens

    def __len__(self) -> int:
        return len(self.input_ids)


def finalize(draft: Draft, *, source: str, index: int, max_length: int, side: str,
             require_loss: bool) -> tuple[Example, bool]:
    """Truncate to max_length on `side`; returns (example, whether it was truncated)."""
    n = len(draft.input_ids)
    start, stop = (0, n) if n <= max_length else ((0, max_length) if side == "right" else (n - max_length, n))
    ids, labels = draft.input_ids[start:stop], draft.labels[start:stop]
    if not ids:
        raise RecordError("the record tokenises to no tokens", source=source)
    # Position 0 has nothing before it to predict from; in a packed row it would predict across records.
    labels[0] = IGNORE
    if require_loss and all(label == IGNORE for label in labels):
        cut = f" after truncation to data.max_length={max_length} ({n} tokens)" if n > max_length else ""
        raise RecordError(f"no token of this record carries loss{cut}", source=source,
                          fix="raise data.max_length, shorten the record, or set data.on_bad_record: drop")
    prompt = None
    if draft.n_prompt is not None:
        prompt = draft.input_ids[start:max(start, min(stop, draft.n_prompt))]
    weights = None
    if draft.weights is not None:
        if len(draft.weights) != n:
            raise ValueError(f"{source}: {len(draft.weights)} weights for {n} tokens")
        weights = draft.weights[start:stop]
    example = Example(ids, labels, source, index, prompt, draft.reference, draft.class_label, weights)
    return example, stop - start < n


@dataclass
class PreferencePair:
    """A preference record: the chosen and the rejected reply to one prompt, each a full Example (prompt +
    reply, labels on the reply only). Collated as two rows (data/preference.py); never packed."""

    chosen: Example
    rejected: Example
    source: str
    index: int  # position of this pair in its split's list; both rows carry it as their sample_index
    prompt_ids: list[int] | None = None  # the shared prompt, for generation
    reference: str | None = None  # the chosen reply's text, for exact match

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)
