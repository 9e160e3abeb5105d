"""TRD's token alignment: which student tokens and which teacher tokens stand for the same piece of text.

The student and the teacher tokenise differently, so relations are compared over shared *units* of one text:

  1. the record's text is recovered from the student's own token ids by incremental decoding, which gives every
     student token the character span it produced (tokens that only together make a character, e.g. the bytes of
     one UTF-8 character, share one span); the student's special tokens (BOS, <|im_start|>, EOS ...) produce no
     text: each run of ordinary tokens between them is decoded on its own and the runs are joined by a newline;
  2. the teacher tokenises that text with its own (fast) tokenizer, offsets on; its special tokens ([CLS], [SEP])
     have no span and take no part;
  3. units are character spans of the text:
       word     words and punctuation runs (regex \\w+|[^\\w\\s]+), so both sides' subword splits are pooled away
       teacher  the teacher's tokens themselves (the spec's direction: student resampled onto the teacher's grid)
     every token whose span overlaps a unit belongs to it; a unit is kept when both sides have a token in it
     (a text longer than the teacher's maximum length loses the units past its end).

Pooling is a plain mean over a unit's tokens (trd.py does it after the projection, as the spec orders).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import TokentuneError

WORD = re.compile(r"\w+|[^\w\s]+")
RUN_JOIN = "\n"  # what a student special token becomes between two runs of text


@dataclass(frozen=True)
class RecordAlignment:
    """One record's alignment. `student` / `teacher`: int arrays [k, 2] of (token index, unit index) pairs;
    student token indices count from the record's first token, teacher ones index `teacher_ids`."""

    text: str
    teacher_ids: list[int]
    student: np.ndarray
    teacher: np.ndarray
    num_units: int


def _run_spans(ids: list[int], tokenizer, offset: int) -> tuple[str, list[tuple[int, int]]]:
    """Incremental decoding of one run of ordinary tokens: (text, span per token, shifted by `offset`).

    decode(window) - decode(window without the newest tokens) is the newest tokens' text; the window keeps one token
    of context so that tokenizers that drop a leading space at the start of a decode (SentencePiece) still give the
    space to the right token. A decode ending in U+FFFD is an incomplete character: its tokens wait for the next."""
    def decode(part):
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    text, spans = "", [(0, 0)] * len(ids)
    prefix, read = 0, 0
    for k in range(len(ids)):
        before = decode(ids[prefix:read])
        after = decode(ids[prefix:k + 1])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            piece = after[len(before):]
            for j in range(read, k + 1):
                spans[j] = (offset + len(text), offset + len(text) + len(piece))
            text += piece
            prefix, read = read, k + 1
    if read < len(ids):  # a run that ends inside a character: its last tokens get what they decode to
        piece = decode(ids[prefix:])[len(decode(ids[prefix:read])):]
        for j in range(read, len(ids)):
            spans[j] = (offset + len(text), offset + len(text) + len(piece))
        text += piece
    return text, spans


def student_text(ids: list[int], tokenizer) -> tuple[str, np.ndarray]:
    """(text, spans [n, 2]): the record's text and each student token's character span; special tokens get the
    empty span (-1, -1)."""
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    spans = np.full((len(ids), 2), -1, dtype=np.int64)
    text, k = "", 0
    while k < len(ids):
        if ids[k] in special:
            k += 1
            continue
        end = k
        while end < len(ids) and ids[end] not in special:
            end += 1
        if text:
            text += RUN_JOIN
        piece, run = _run_spans(ids[k:end], tokenizer, len(text))
        spans[k:end] = run
        text += piece
        k = end
    return text, spans


def teacher_tokens(text: str, tokenizer, max_length: int) -> tuple[list[int], np.ndarray]:
    """(teacher ids with the teacher's special tokens, spans [m, 2]; (-1, -1) for special or empty tokens)."""
    if not getattr(tokenizer, "is_fast", False):
        raise TokentuneError(f"the teacher's tokenizer ({type(tokenizer).__name__}) gives no character offsets",
                             where="objective.teacher", fix="use a teacher with a fast tokenizer (tokenizer.json)")
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True, truncation=True,
                    max_length=max_length)
    spans = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    drop = np.asarray(enc["special_tokens_mask"], dtype=bool) | (spans[:, 0] >= spans[:, 1])
    spans[drop] = -1
    return list(enc["input_ids"]), spans


def _members(spans: np.ndarray, units: np.ndarray) -> np.ndarray:
    """(token, unit) pairs [k, 2] whose half-open character spans overlap; empty spans (-1, -1) never overlap."""
    if len(spans) == 0 or len(units) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    hit = (spans[:, None, 0] < units[None, :, 1]) & (units[None, :, 0] < spans[:, None, 1])
    return np.argwhere(hit).astype(np.int64)


def align_record(ids: list[int], student_tokenizer, teacher_tokenizer, *, mode: str,
                 max_length: int) -> RecordAlignment:
    text, s_spans = student_text(ids, student_tokenizer)
    t_ids, t_spans = teacher_tokens(text, teacher_tokenizer, max_length)
    if mode == "word":
        units = np.asarray([m.span() for m in WORD.finditer(text)], dtype=np.int64).reshape(-1, 2)
    elif mode == "teacher":
        units = t_spans[t_spans[:, 0] >= 0]
    else:
        raise TokentuneError(f"unknown alignment {mode!r}", where="objective.align", fix="use word or teacher")
    s_pairs, t_pairs = _members(s_spans, units), _members(t_spans, units)
    kept = np.intersect1d(s_pairs[:, 1], t_pairs[:, 1])  # units both sides cover, renumbered 0..U-1 in text order
    renumber = np.full(len(units), -1, dtype=np.int64)
    renumber[kept] = np.arange(len(kept))
    s_pairs = s_pairs[renumber[s_pairs[:, 1]] >= 0]
    t_pairs = t_pairs[renumber[t_pairs[:, 1]] >= 0]
    s_pairs[:, 1], t_pairs[:, 1] = renumber[s_pairs[:, 1]], renumber[t_pairs[:, 1]]
    return RecordAlignment(text, t_ids, s_pairs, t_pairs, len(kept))


def record_segments(batch: dict) -> list[tuple[int, int, int]]:
    """(row, start, end) of every record in the batch: packed rows hold several (a record starts where its position
    ids restart or its sample index changes), padding (sample_index -1 / attention_mask 0) is none."""
    positions = batch["position_ids"].tolist()
    samples = batch["sample_index"].tolist() if "sample_index" in batch else None
    mask = batch["attention_mask"].tolist()
    out = []
    for row, pos in enumerate(positions):
        start = None
        for t, p in enumerate(pos):
            valid = mask[row][t] == 1 and (samples is None or samples[row][t] >= 0)
            new = start is not None and (p == 0 or (samples is not None and samples[row][t] != samples[row][t - 1]))
            if start is not None and (not valid or new):
                out.append((row, start, t))
                start = None
            if valid and start is None:
                start = t
        if start is not None:
            out.append((row, start, len(pos)))
    return out
