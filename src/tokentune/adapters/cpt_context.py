"""CPT's context: k labelled examples rendered with input/output templates, and the token types of every
context token (PEFT's `cpt_tokens_type_mask`, as built in PEFT's CPT example):

  example i (0-based)   4i+1 input template   4i+2 input text   4i+3 output template   4i+4 label
  0                     separators, EOS, a leading BOS

One example renders as  in₁ x in₂ · intra · out₁ y out₂ · EOS · inter  (in₁/in₂ and out₁/out₂: the text
before and after "{}" in the templates, each part tokenised alone as in PEFT's CPTDataset). Training queries may
be rendered the same way (`render_queries`), so the appended training example looks like one more context example.
Also the loss weights of the context labels (recency decay) and the eps ball of every token.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..data.example import IGNORE, Example
from ..errors import TokentuneError


@dataclass(frozen=True)
class Context:
    ids: tuple[int, ...]
    types: tuple[int, ...]

    def __post_init__(self):
        if len(self.ids) != len(self.types):
            raise TokentuneError(f"{len(self.ids)} context token ids but {len(self.types)} type-mask entries",
                                 where="adapter.token_ids / adapter.type_mask", fix="give one type per token")
        if not self.ids:
            raise TokentuneError("the CPT context is empty", where="adapter",
                                 fix="give context examples (adapter.num_context_examples >= 1) or token_ids")
        if any(t < 0 for t in self.types):
            raise TokentuneError("CPT token types must be >= 0", where="adapter.type_mask",
                                 fix="use 4i+1..4i+4 for example i and 0 for separators")

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Templates:
    """The tokenised pieces of the templates (no special tokens, as PEFT's example tokenises them)."""

    in1: list[int]
    in2: list[int]
    intra: list[int]
    out1: list[int]
    out2: list[int]
    end: list[int]  # EOS, when end_with_eos
    inter: list[int]
    lead: list[int]  # the special tokens the tokenizer puts in front of a text (BOS), once at the context start

    @classmethod
    def build(cls, cfg, tokenizer) -> "Templates":
        def enc(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

        in1, in2 = cfg.input_template.split("{}")
        out1, out2 = cfg.output_template.split("{}")
        end = []
        if cfg.end_with_eos:
            if tokenizer.eos_token_id is None:
                raise TokentuneError("end_with_eos needs a tokenizer with an EOS token", where="adapter.end_with_eos",
                                     fix="set adapter.end_with_eos: false (and an inter_separator such as '\\n')")
            end = [tokenizer.eos_token_id]
        return cls(enc(in1), enc(in2), enc(cfg.intra_separator), enc(out1), enc(out2), end,
                   enc(cfg.inter_separator), leading_specials(tokenizer))


def leading_specials(tokenizer) -> list[int]:
    """The special tokens (BOS) the tokenizer adds in front of a text."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    lead = []
    for t in tokenizer("a", add_special_tokens=True)["input_ids"]:
        if t not in special:
            break
        lead.append(t)
    return lead


def render_example(tpl: Templates, x: list[int], y: list[int], i: int) -> tuple[list[int], list[int]]:
    """Token ids and types of context example i."""
    b = 4 * i
    parts = [(tpl.in1, b + 1), (x, b + 2), (tpl.in2, b + 1), (tpl.intra, 0), (tpl.out1, b + 3), (y, b + 4),
             (tpl.out2, b + 3), (tpl.end, 0), (tpl.inter, 0)]
    ids = [t for part, _ in parts for t in part]
    types = [kind for part, kind in parts for _ in part]
    return ids, types


def build_context(tpl: Templates, pairs: list[tuple[list[int], list[int]]]) -> Context:
    ids, types = list(tpl.lead), [0] * len(tpl.lead)
    for i, (x, y) in enumerate(pairs):
        if not y:
            raise TokentuneError(f"context example {i} has an empty output", where="adapter context",
                                 fix="every context example needs a label/completion")
        more_ids, more_types = render_example(tpl, x, y, i)
        ids += more_ids
        types += more_types
    return Context(tuple(ids), tuple(types))


def split_example(example: Example, special_ids: set[int], eos_id: int | None) -> tuple[list[int], list[int]]:
    """(input text tokens, label tokens) of a prompt/completion example: the prompt without its leading special
    tokens, the completion without the EOS the data pipeline appended."""
    if example.prompt_ids is None:
        raise TokentuneError("CPT needs input/output pairs; this record has no prompt", where=example.source,
                             fix="use data.format: prompt_completion (prompt = input text, completion = label)")
    n = len(example.prompt_ids)
    x = list(example.prompt_ids)
    while x and x[0] in special_ids:
        x.pop(0)
    y = list(example.input_ids[n:])
    if y and eos_id is not None and y[-1] == eos_id:
        y.pop()
    if not y:
        raise TokentuneError("this record has no completion tokens (truncated away?)", where=example.source,
                             fix="raise data.max_length or shorten the prompt")
    return x, y


def render_query(tpl: Templates, example: Example, index: int, x: list[int], y: list[int], *, max_length: int,
                 side: str) -> Example:
    """The record rendered like a context example (without the leading BOS: it follows the context). Only the
    label tokens carry loss, as in PEFT (labels = type 4i+4); the input text is cut to fit max_length."""
    fixed = len(tpl.in1) + len(tpl.in2) + len(tpl.intra) + len(tpl.out1) + len(y) + len(tpl.out2) + len(tpl.end)
    room = max_length - fixed
    if room < 0:
        raise TokentuneError(f"the templates and label need {fixed} tokens > data.max_length={max_length}",
                             where=example.source, fix="raise data.max_length or shorten the templates")
    if len(x) > room:
        x = x[:room] if side == "right" else x[len(x) - room:]
    prompt = tpl.in1 + x + tpl.in2 + tpl.intra + tpl.out1
    tail = tpl.out2 + tpl.end
    ids = prompt + y + tail
    labels = [IGNORE] * len(prompt) + list(y) + [IGNORE] * len(tail)
    labels[0] = IGNORE  # position 0 predicts nothing (data/example.py)
    return dataclasses.replace(example, input_ids=ids, labels=labels, index=index, prompt_ids=prompt, weights=None)


def label_weights(types: torch.Tensor, weighting: str, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions t of the context's label tokens, their loss weights). The appended training example is the
    last example (weight 1); the context examples' labels get gamma^1, gamma^2, ... from the last one backwards
    (PEFT ranks the label type ids that occur). Position 0 has nothing to predict it and is skipped."""
    is_label = (types > 0) & (types % 4 == 0)
    is_label[0] = False
    pos = is_label.nonzero().squeeze(1)
    weights = torch.ones(len(pos), dtype=torch.float32)
    if weighting == "decay":
        ranked = sorted(set(types[pos].tolist()), reverse=True)
        rank = {t: r + 1 for r, t in enumerate(ranked)}
        weights = torch.tensor([gamma ** rank[t] for t in types[pos].tolist()], dtype=torch.float32)
    return pos, weights


def epsilons(types: torch.Tensor, eps_input: float, eps_format: float, dim: int) -> torch.Tensor:
    """Radius of every token's ball: eps_t * sqrt(d / 2048) for templates (t mod 4 in {1, 3}) and input text
    (t mod 4 = 2); 0 for labels and separators (PEFT: 1e-10; exact 0 keeps them bit-for-bit at E0)."""
    scale = math.sqrt(dim / 2048)
    eps = torch.zeros(len(types), dtype=torch.float32)
    kind = types % 4
    eps[(types > 0) & ((kind == 1) | (kind == 3))] = eps_format * scale
    eps[(types > 0) & (kind == 2)] = eps_input * scale
    return eps


def trainable_rows(types: torch.Tensor) -> torch.Tensor:
    """[N, 1] mask of the rows whose delta may change: template and input-text tokens."""
    kind = types % 4
    return ((types > 0) & (kind != 0)).unsqueeze(1)
