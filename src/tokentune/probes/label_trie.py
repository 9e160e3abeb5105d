"""Trie-constrained decoding of label lists (PTEC's text-to-text baseline, reference `sectors/utils/trie.py`).

A text-to-text classifier is trained to write its labels joined by a separator ("; ") and then EOS. Unconstrained
it can write labels that do not exist; constrained by this trie every generated prefix continues some label, a
label is ended only by the separator or EOS, and a label already written is deleted from the trie so it cannot
come again.

The first label is tokenised alone and every later one together with the separator in front of it, in context
(so a BPE label that follows "; " carries its leading space, as in the whole target "a; b"). The allowed next
tokens are a function of the generated prefix alone (no state between calls), so batched, beam and sampled
generation all work:
`trie.prefix_allowed_tokens_fn(prompt_length)` plugs into transformers' `generate(prefix_allowed_tokens_fn=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..errors import TokentuneError


@dataclass
class _Node:
    children: dict[int, "_Node"] = field(default_factory=dict)
    ends: int | None = None  # the label whose tokens end here
    below: set[int] = field(default_factory=set)  # labels ending at or below this node


def _insert(root: _Node, ids: list[int], label: int) -> None:
    node = root
    node.below.add(label)
    for t in ids:
        node = node.children.setdefault(t, _Node())
        node.below.add(label)
    if node.ends is not None:
        raise TokentuneError(f"two labels tokenise to the same ids {ids}", where="labels",
                             fix="give the labels distinct names")
    node.ends = label


_DONE = "done"  # the parse state after EOS


class LabelTrie:
    """first[i]: token ids of label i written first; rest[i]: token ids of separator + label i after another."""

    def __init__(self, first: list[list[int]], rest: list[list[int]], eos_id: int):
        if not first or len(first) != len(rest):
            raise TokentuneError("a label trie needs at least one label, with both tokenisations", where="labels")
        if any(not ids for ids in first + rest):
            raise TokentuneError("a label tokenises to no tokens", where="labels", fix="remove empty label names")
        if any(eos_id in ids for ids in first + rest):
            raise TokentuneError("a label contains the EOS token", where="labels")
        self.eos_id = eos_id
        self.num_labels = len(first)
        self._first, self._rest = _Node(), _Node()
        for i, (a, b) in enumerate(zip(first, rest)):
            _insert(self._first, a, i)
            _insert(self._rest, b, i)

    @classmethod
    def from_tokenizer(cls, tokenizer, labels: list[str], separator: str = "; ") -> "LabelTrie":
        if len(set(labels)) != len(labels):
            raise TokentuneError("the label list repeats a label", where="labels")
        if tokenizer.eos_token_id is None:
            raise TokentuneError("trie decoding ends the label list with EOS, but the tokenizer has none")
        def encode(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        first = [encode(label) for label in labels]
        # A later label is tokenised in context (after the first label and the separator), then the context's own
        # tokens are cut off: SentencePiece would otherwise give the separator a word-start marker it never has
        # inside "a; b". Where the context's tokens merge across the boundary, the label is tokenised on its own.
        context = first[0]
        rest = []
        for label in labels:
            ids = encode(labels[0] + separator + label)
            rest.append(ids[len(context):] if ids[:len(context)] == context else encode(separator + label))
        return cls(first, rest, tokenizer.eos_token_id)

    # --- parsing a prefix ---------------------------------------------------------------------------
    def _states(self, generated: list[int]) -> list:
        """Every (node, labels already written) the prefix can be in (more than one only when a label's tokens
        could also start the separator); _DONE after EOS."""
        states: list = [(self._first, frozenset())]
        for t in generated:
            nxt: list = []
            for state in states:
                if state == _DONE:
                    nxt.append(_DONE)  # after EOS generate pads the row; whatever comes is ignored
                    continue
                nxt.extend(self._step(state, t))
            if not nxt:
                raise TokentuneError(f"the generated tokens {generated} are not a label list of this trie",
                                     fix="generate with the trie from the first new token on")
            states = nxt
        return states

    def _step(self, state, token: int) -> list:
        node, used = state
        out = []
        child = node.children.get(token)
        if child is not None and child.below - used:
            out.append((child, used))
        if node.ends is not None and node.ends not in used:
            done = used | {node.ends}
            if token == self.eos_id:
                out.append(_DONE)
            child = self._rest.children.get(token)
            if child is not None and child.below - done:
                out.append((child, done))
        return out

    def _allowed_from(self, state) -> set[int]:
        if state == _DONE:
            return {self.eos_id}
        node, used = state
        allowed = {t for t, c in node.children.items() if c.below - used}
        if node.ends is not None and node.ends not in used:
            done = used | {node.ends}
            allowed.add(self.eos_id)
            allowed |= {t for t, c in self._rest.children.items() if c.below - done}
        return allowed

    def allowed(self, generated: list[int]) -> list[int]:
        """The tokens that may follow `generated` (the new tokens only, not the prompt)."""
        return sorted(set().union(*(self._allowed_from(s) for s in self._states(list(generated)))))

    def prefix_allowed_tokens_fn(self, prompt_length: int) -> Callable:
        """For transformers' generate: every row's first `prompt_length` tokens are the (left-padded) prompt."""
        def fn(batch_id: int, input_ids) -> list[int]:
            return self.allowed(input_ids[prompt_length:].tolist())

        return fn


def split_labels(text: str, labels: list[str], separator: str = "; ") -> list[str]:
    """The known labels in a generated label list, in order, each once (a cut-off last label is dropped)."""
    known, out = set(labels), []
    for part in text.split(separator.strip() or separator):
        part = part.strip()
        if part in known and part not in out:
            out.append(part)
    return out
