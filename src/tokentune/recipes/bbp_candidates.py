"""Candidate sets for the prompt positions: top-PMI n-grams of the task corpus (BDPL's pmi_ngram.py), its most
frequent words, random whole-word tokens of the black box's vocabulary, or a given list.

Words are lower-cased runs of letters, digits and apostrophes (BDPL splits on whitespace; the regex keeps URLs,
@-handles and punctuation out of the candidates)."""

from __future__ import annotations

import math
import random
import re
from collections import Counter

from ..errors import TokentuneError

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def frequent_words(texts: list[str], n: int) -> list[str]:
    """The n most frequent words (ties: alphabetical)."""
    counts = Counter(w for t in texts for w in words(t))
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:n]


def pmi_ngrams(texts: list[str], n: int, *, max_len: int = 5, min_count: int = 5, min_pmi: float = 1.0,
               freq_threshold: int = 5) -> list[str]:
    """BDPL's FindNgrams.find_ngrams_pmi: adjacent word pairs with PMI = log(total * c(a,b) / (c(a) c(b))) >= min_pmi
    (both words and the pair seen more than min_count times) are glued into segments; segments of at most max_len
    words seen more than min_count times are counted again wherever they occur, kept above freq_threshold, and
    ranked by that count (ties: reverse lexical, as BDPL's sort). BDPL drops each sentence's last segment (a loop
    boundary); it is counted here."""
    sentences = [words(t) for t in texts]
    unigrams, pairs, total = Counter(), Counter(), 0
    for s in sentences:
        unigrams.update(s)
        pairs.update(zip(s, s[1:]))
        total += max(len(s) - 1, 0)
    unigrams = {w: c for w, c in unigrams.items() if c > min_count}
    strong = {pair for pair, c in pairs.items() if c > min_count and pair[0] in unigrams and pair[1] in unigrams
              and math.log(total * c / (unigrams[pair[0]] * unigrams[pair[1]])) >= min_pmi}
    segments = Counter()
    for s in sentences:
        if not s:
            continue
        current = [s[0]]
        for a, b in zip(s, s[1:]):
            if (a, b) in strong:
                current.append(b)
            else:
                segments[tuple(current)] += 1
                current = [b]
        segments[tuple(current)] += 1
    kept = {g for g, c in segments.items() if c > min_count and len(g) <= max_len}
    recount = Counter()
    for s in sentences:
        for i in range(len(s)):
            for j in range(i + 1, min(i + max_len, len(s)) + 1):
                if tuple(s[i:j]) in kept:
                    recount[tuple(s[i:j])] += 1
    ranked = sorted(((c, g) for g, c in recount.items() if c > freq_threshold), reverse=True)
    return [" ".join(g) for _, g in ranked][:n]


def vocabulary_words(vocabulary: list[str], n: int, seed: int) -> list[str]:
    """n distinct whole-word tokens (letters only, 2+ characters, after dropping the leading-space marker) drawn
    at random (seeded) from the black box's vocabulary, in vocabulary order."""
    seen, pool = set(), []
    for token in vocabulary:
        word = token.strip()
        if len(word) >= 2 and word.isascii() and word.isalpha() and word.lower() not in seen:
            seen.add(word.lower())
            pool.append(word)
    if len(pool) < n:
        return pool
    chosen = set(random.Random(seed).sample(range(len(pool)), n))
    return [w for i, w in enumerate(pool) if i in chosen]


def build_candidates(source: str, texts: list[str], n: int, *, given: list[str] | None = None, black_box=None,
                     seed: int = 0, pmi: dict | None = None) -> list[str]:
    """The candidate list for `source` (pmi | frequent | vocab | list); fewer than n is an error, not a silently
    smaller search space."""
    if source == "list":
        found = list(dict.fromkeys(given or []))
    elif source == "pmi":
        found = pmi_ngrams(texts, n, **(pmi or {}))
    elif source == "frequent":
        found = frequent_words(texts, n)
    elif source == "vocab":
        vocabulary = getattr(black_box, "vocabulary", None)
        if vocabulary is None:
            raise TokentuneError("candidates: vocab needs a black box that lists its vocabulary",
                                 where="recipe.candidates", fix="use candidates: pmi, frequent or list")
        found = vocabulary_words(vocabulary(), n, seed)
    else:
        raise TokentuneError(f"unknown candidate source {source!r}", where="recipe.candidates",
                             fix="pmi, frequent, vocab or list")
    if len(found) < n:
        fix = {"pmi": "lower recipe.pmi.min_count / freq_threshold, or use candidates: frequent",
               "list": "give more distinct candidate_list entries"}.get(source, "lower recipe.num_candidates")
        raise TokentuneError(f"only {len(found)} {source} candidates, {n} asked for", where="recipe.num_candidates",
                             fix=f"lower recipe.num_candidates to {len(found)} or {fix}")
    return found[:n]
