"""How a query for the black box is put together, in training, re-labelling and prediction alike (the property v1
stresses): [prompt] + k demonstrations drawn from the pseudo-labelled pool + the query, by ONE function
(`assemble_query`) with ONE demonstration sampler (`DemoSampler`), both reached through `QueryBuilder`."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import TokentuneError


@dataclass(frozen=True)
class QueryFormat:
    """prompt_format   wraps the discrete prompt ({prompt}); left out when there is no prompt
    example_format  one example ({text}), for demonstrations and the query alike; the label follows it
    label_prefix    put before a label word (in demonstrations, and in the label strings scored)
    demo_separator  after each demonstration's label
    max_text_words  each text (demonstration or query) cut to its first words; None = whole"""

    prompt_format: str = "{prompt}\n"
    example_format: str = "Input: {text}\nLabel:"
    label_prefix: str = " "
    demo_separator: str = "\n\n"
    max_text_words: int | None = None

    def cut(self, text: str) -> str:
        if self.max_text_words is None:
            return text
        return " ".join(text.split()[:self.max_text_words])


def assemble_query(fmt: QueryFormat, prompt: str, demos: list[tuple[str, str]], text: str) -> str:
    """The one place a query string is made: prompt block, then each (text, label word) demonstration, then the
    query's example with its label left for the black box to score. (str.replace, not format: texts may hold
    braces.)"""
    head = fmt.prompt_format.replace("{prompt}", prompt) if prompt else ""
    shots = "".join(fmt.example_format.replace("{text}", fmt.cut(t)) + fmt.label_prefix + word + fmt.demo_separator
                    for t, word in demos)
    return head + shots + fmt.example_format.replace("{text}", fmt.cut(text))


class DemoSampler:
    """k demonstrations from the current pseudo-labelled pool: `random` (uniform k-subset, in random order) or
    `balanced` (classes taken in turn, in a random class order, one random example each). A query that is itself
    in the pool is never its own demonstration."""

    def __init__(self, k: int, mode: str = "random"):
        if mode not in ("random", "balanced"):
            raise TokentuneError(f"unknown demonstration selection {mode!r}", where="recipe.demo_selection",
                                 fix="random or balanced")
        self.k, self.mode = k, mode
        self.pool: list[int] = []
        self.labels: dict[int, int] = {}

    def set_pool(self, indices: list[int], labels: list[int]) -> None:
        if self.k and len(indices) < self.k + 1:
            raise TokentuneError(f"the pseudo-labelled pool has {len(indices)} examples; {self.k} demonstrations "
                                 "per query (excluding the query itself) need at least k + 1",
                                 where="recipe.num_demos",
                                 fix="lower recipe.num_demos, or admit more examples (confidence_threshold, "
                                     "per_class_fraction)")
        self.pool = list(indices)
        self.labels = dict(zip(indices, labels))

    def sample(self, rng: random.Random, exclude: int | None = None) -> list[int]:
        if self.k == 0:
            return []
        if self.mode == "random":
            drawn = rng.sample(self.pool, min(self.k + 1, len(self.pool)))
            return [i for i in drawn if i != exclude][:self.k]
        by_class: dict[int, list[int]] = {}
        for i in self.pool:
            if i != exclude:
                by_class.setdefault(self.labels[i], []).append(i)
        classes = sorted(by_class)
        rng.shuffle(classes)
        queues = {c: rng.sample(by_class[c], len(by_class[c])) for c in classes}
        out: list[int] = []
        while len(out) < self.k:
            for c in classes:
                if queues[c] and len(out) < self.k:
                    out.append(queues[c].pop())
        return out


class QueryBuilder:
    """Queries over the task's unlabelled texts: demonstrations come from the sampler's pool with the pool's
    pseudo-labels as their label words."""

    def __init__(self, fmt: QueryFormat, sampler: DemoSampler, pool_texts: list[str], label_words: list[str]):
        self.fmt, self.sampler, self.pool_texts, self.label_words = fmt, sampler, pool_texts, label_words

    @property
    def label_strings(self) -> list[str]:
        """What the black box scores after a query: the label prefix and each class's label word."""
        return [self.fmt.label_prefix + w for w in self.label_words]

    def demos(self, rng: random.Random, exclude: int | None = None) -> list[tuple[str, str]]:
        return [(self.pool_texts[i], self.label_words[self.sampler.labels[i]])
                for i in self.sampler.sample(rng, exclude)]

    def query(self, prompt: str, text: str, demos: list[tuple[str, str]]) -> str:
        return assemble_query(self.fmt, prompt, demos, text)
