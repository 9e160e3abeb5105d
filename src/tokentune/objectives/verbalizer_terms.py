"""What a verbalizer reads (its label terms, the records' texts in the template) and SciPrompt's scoring maths (You et al. 2024; the official code's
OpenPrompt `WeightedVerbalizer`). Per input x, with s_w(x) the score of term w (its log-likelihood at the label
position) and all classes' terms taken together:

    log p_w      = log_softmax_w(s(x))                                 joint over every class's terms
    calibrated   = log_softmax_w(log p_w - log q_w),  q = softmax_w(c)   c: mean term scores on calibration inputs
    score_c      = sum_{w in c} softmax_{w' in c}(t * theta_w')[w] * log p_w   theta: the (trainable) term weights

t is `pred_temp` in evaluation and 1 in training (as the code). Padded term slots take no probability mass and
contribute 0. Terms whose tokens fall in the bottom `candidate_frac` of the vocabulary by mean calibration logits
are dropped before training (the code's `register_calibrate_logits`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import TokentuneError

NEG = -1e9  # "minus infinity" that keeps every intermediate finite (no inf - inf in calibration)


@dataclass
class LabelTerms:
    """Every class's terms, flattened in class order. `token_ids[j]` is term j as the tokenizer splits it (with the
    verbalizer's prefix, e.g. a leading space), `weights[j]` its initial correlation weight."""

    classes: list[str]
    terms: list[str]
    term_class: list[int]
    token_ids: list[list[int]]
    weights: list[float]

    @classmethod
    def build(cls, label_names: list[str], label_words: dict | None, tokenizer, *, prefix: str,
              include_label_name: bool) -> "LabelTerms":
        given = {str(k): v for k, v in (label_words or {}).items()}
        unknown = sorted(set(given) - set(label_names))
        if unknown:
            raise TokentuneError(f"objective.label_words names labels the data does not have: {unknown}",
                                 where="objective.label_words", fix=f"the data's labels are {label_names}")
        terms, term_class, token_ids, weights = [], [], [], []
        for c, name in enumerate(label_names):
            entry = given.get(name, [])
            pairs = list(entry.items()) if isinstance(entry, dict) else [(t, 1.0) for t in entry]
            if include_label_name and name not in [t for t, _ in pairs]:
                pairs.insert(0, (name, 1.0))  # the class name itself, weight 1 (the code's knowledge files)
            if not pairs:
                raise TokentuneError(f"class {name!r} has no label terms", where="objective.label_words",
                                     fix="give it terms in label_words, or set include_label_name: true")
            seen = set()
            for term, weight in pairs:
                ids = tokenizer(prefix + term, add_special_tokens=False)["input_ids"]
                if not ids:
                    raise TokentuneError(f"label term {term!r} of class {name!r} tokenises to nothing",
                                         where="objective.label_words")
                if tuple(ids) in seen:  # a duplicate within a class would count twice
                    continue
                seen.add(tuple(ids))
                terms.append(term)
                term_class.append(c)
                token_ids.append(list(ids))
                weights.append(max(float(weight), 0.0))  # the code clamps the scores at 0
        return cls(list(label_names), terms, term_class, token_ids, weights)

    def __len__(self) -> int:
        return len(self.terms)

    def table(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index [C, W] into the flat terms, mask [C, W]) over the kept terms; W = most kept terms of a class."""
        per_class: list[list[int]] = [[] for _ in self.classes]
        for j, c in enumerate(self.term_class):
            if bool(kept[j]):
                per_class[c].append(j)
        empty = [self.classes[c] for c, js in enumerate(per_class) if not js]
        if empty:
            raise TokentuneError(f"no label term of class(es) {empty} is left after the calibration cut-off",
                                 where="objective.candidate_frac",
                                 fix="lower candidate_frac (0 keeps every term), or give those classes other terms")
        width = max(len(js) for js in per_class)
        index = torch.tensor([js + [0] * (width - len(js)) for js in per_class], dtype=torch.long)
        mask = torch.tensor([[True] * len(js) + [False] * (width - len(js)) for js in per_class])
        return index, mask

    def padded_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [N, L], mask [N, L]) of every term's tokens, right-padded with id 0."""
        width = max(len(t) for t in self.token_ids)
        ids = torch.tensor([t + [0] * (width - len(t)) for t in self.token_ids], dtype=torch.long)
        mask = torch.tensor([[True] * len(t) + [False] * (width - len(t)) for t in self.token_ids])
        return ids, mask


def word_log_probs(scores: torch.Tensor, mask: torch.Tensor, calibration: torch.Tensor | None) -> torch.Tensor:
    """[B, C, W] log-probabilities of the terms, normalised jointly over every class's valid terms, and, given
    calibration term scores [C, W], divided by their calibration probabilities and renormalised."""
    b = scores.shape[0]
    flat_mask = mask.reshape(1, -1)
    lp = F.log_softmax(scores.float().reshape(b, -1).masked_fill(~flat_mask, NEG), -1)
    if calibration is not None:
        lq = F.log_softmax(calibration.float().reshape(1, -1).masked_fill(~flat_mask, NEG), -1)
        lp = F.log_softmax((lp - lq).masked_fill(~flat_mask, NEG), -1)
    return lp.reshape(scores.shape)


def aggregate(log_probs: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, C] class scores: the softmax-normalised weights of each class's valid terms times their log-probs."""
    w = F.softmax((temperature * weights.float()).masked_fill(~mask, NEG), -1)
    return (log_probs.masked_fill(~mask, 0.0) * w).sum(-1)


def cut_terms(terms: LabelTerms, mean_vocab_scores: torch.Tensor, frac: float, *, first_only: bool) -> torch.Tensor:
    """[N] bool: the terms none of whose tokens (the first token only, for causal models: the later ones are not
    predicted at the label position) are among the int(frac * V) lowest-scoring vocabulary ids."""
    if frac <= 0:
        return torch.ones(len(terms), dtype=torch.bool)
    low = torch.argsort(mean_vocab_scores.float().cpu())[:int(frac * mean_vocab_scores.numel())]
    dropped = torch.zeros(mean_vocab_scores.numel(), dtype=torch.bool)
    dropped[low] = True
    return torch.tensor([not any(bool(dropped[i]) for i in (ids[:1] if first_only else ids))
                         for ids in terms.token_ids])


def templated_ids(tokenizer, template: str, text: str, max_length: int, side: str) -> list[int]:
    """Token ids of `template` ({text} filled in), the text cut on `side` so that the whole fits max_length (the
    template itself is never cut)."""
    before, after = template.split("{text}")
    ids = tokenizer(before + text + after, add_special_tokens=True)["input_ids"]
    if len(ids) <= max_length:
        return ids
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = max_length - (len(ids) - len(text_ids))
    while len(ids) > max_length:  # re-tokenising the cut text may merge differently: shrink again
        if keep <= 0:
            raise TokentuneError(f"the template alone is longer than data.max_length={max_length}",
                                 where="objective.template", fix="raise data.max_length")
        part = text_ids[:keep] if side == "right" else text_ids[len(text_ids) - keep:]
        ids = tokenizer(before + tokenizer.decode(part) + after, add_special_tokens=True)["input_ids"]
        keep -= max(1, len(ids) - max_length)
    return ids


def record_texts(data_cfg) -> tuple[dict[str, str], dict[str, str]]:
    """(train, eval) source -> text of every record, read again: the examples keep only their token ids."""
    from ..data.formats import extract
    from ..data.pipeline import EVAL_SPLITS
    from ..data.readers import read_records
    from ..data.records import RecordError

    def texts(records) -> dict[str, str]:
        out = {}
        for rec in records:
            try:
                out[rec.source] = extract(rec, "classification", data_cfg.fields)["text"]
            except RecordError:  # dropped by the pipeline too (data.on_bad_record: drop)
                continue
        return out

    kwargs = dict(encoding=data_cfg.encoding, limit=data_cfg.max_records)
    train = texts(read_records(data_cfg.train, key="data.train", **kwargs))
    if data_cfg.eval is None:
        return train, train
    return train, texts(read_records(data_cfg.eval, key="data.eval", splits=EVAL_SPLITS, **kwargs))
