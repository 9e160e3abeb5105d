"""Tokenise records into drafts: ids plus the unshifted loss labels each format asks for."""

from __future__ import annotations

from typing import Callable

from .chat import draft_messages
from .example import IGNORE, Draft
from .labels import LabelSpace
from .records import Record

_CHUNK = 1024  # texts per tokenizer call: batching lets the Rust tokenizer work in parallel


def encode_texts(tokenizer, texts: list[str], *, special: bool) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(texts), _CHUNK):
        # verbose=False: no "longer than the model maximum" warning; finalize() truncates.
        out.extend(tokenizer(texts[i:i + _CHUNK], add_special_tokens=special, verbose=False)["input_ids"])
    return out


def draft_text(ids: list[int], eos_id: int | None) -> Draft:
    ids = _with_eos(ids, eos_id)
    return Draft(ids, list(ids))


def draft_prompt_completion(prompt_ids: list[int], completion_ids: list[int], completion: str,
                            eos_id: int | None) -> Draft:
    # Tokenised apart so the loss boundary is exact and generation sees exactly these prompt tokens.
    completion_ids = _with_eos(completion_ids, eos_id)
    return Draft(list(prompt_ids) + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids,
                 n_prompt=len(prompt_ids), reference=completion)


def draft_classification(ids: list[int], class_label: int | list[float]) -> Draft:
    # The loss reads class_label (an id, or a multi-hot vector for multi-label data); no token is a target.
    return Draft(list(ids), [IGNORE] * len(ids), class_label=class_label)


def _with_eos(ids: list[int], eos_id: int | None) -> list[int]:
    ids = list(ids)
    if eos_id is not None and (not ids or ids[-1] != eos_id):
        ids.append(eos_id)
    return ids


def drafter(fmt: str, items: list[tuple[Record, dict]], tokenizer, *, eos_id: int | None,
            assistant_only: bool, labels: LabelSpace | None) -> Callable[[int], Draft]:
    """A function from item position to its Draft (may raise RecordError). Plain texts are tokenised
    up front in batches; chat records one at a time (each needs several template renders)."""
    canons = [c for _, c in items]
    if fmt == "text":
        ids = encode_texts(tokenizer, [c["text"] for c in canons], special=True)
        return lambda i: draft_text(ids[i], eos_id)
    if fmt == "prompt_completion":
        prompts = encode_texts(tokenizer, [c["prompt"] for c in canons], special=True)
        completions = encode_texts(tokenizer, [c["completion"] for c in canons], special=False)
        return lambda i: draft_prompt_completion(prompts[i], completions[i], canons[i]["completion"], eos_id)
    if fmt == "classification":
        ids = encode_texts(tokenizer, [c["text"] for c in canons], special=True)
        return lambda i: draft_classification(ids[i], labels.target(canons[i]["label"], source=items[i][0].source))
    return lambda i: draft_messages(canons[i]["messages"], tokenizer, assistant_only=assistant_only,
                                    source=items[i][0].source)
