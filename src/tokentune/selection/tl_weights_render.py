"""One conversation -> one Draft for TL-Training: rendered with the chat template (tools passed when the
record gives schemas), the chosen assistant turns supervised, and PKT's key-token weights placed from
character offsets, so the same rule holds for any fast tokenizer.

PKT, per supervised reply (released code: code/pkt/utils.py):
  pre   the token that starts each tool name, plus, for every other available tool whose name shares a
        non-empty (character) prefix with it, the token holding the first character where they differ
  para  the tokens holding the `,` / `)` / `}` that end each argument (weight 1; left out of "other")
  w     min(N_other / N_pre, max_weight) on pre tokens when N_pre < N_other, else 1; 1 everywhere else
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..data.chat import assistant_span
from ..data.example import IGNORE, Draft
from ..data.records import RecordError
from .tl_weights_calls import Call, locate_rendered_calls, parse_text_calls, structured_calls


@dataclass
class TurnStats:
    calls: int = 0
    pre: int = 0
    weight: float = 1.0
    args_unlocated: int = 0  # template-rendered calls whose argument delimiters were not found


def token_at(offsets: list[tuple[int, int]], char: int) -> int | None:
    """The token holding character `char`, or the first one after it (tokenizers whose offsets leave out
    the space a token starts with)."""
    for k, (start, end) in enumerate(offsets):
        if end > char and end > start:
            return k
    return None


def key_positions(offsets, call: Call, tools: list[str]) -> tuple[set[int], set[int]]:
    """(pre, para) token indices of one call whose name starts at character `call.start`."""
    pre = {token_at(offsets, call.start)}
    for other in tools:
        if other == call.name:
            continue
        shared = len(os.path.commonprefix([call.name, other]))
        if shared:
            pre.add(token_at(offsets, call.start + shared))
    para = {token_at(offsets, d) for d in call.delimiters}
    pre.discard(None)
    return pre, para - pre - {None}


def pkt_weight(n_pre: int, n_other: int, max_weight: float) -> float:
    return min(n_other / n_pre, max_weight) if 0 < n_pre < n_other else 1.0


class Renderer:
    def __init__(self, tokenizer, *, max_weight: float):
        self.tokenizer, self.max_weight = tokenizer, max_weight

    def render(self, messages: list[dict], schemas, generation_prompt: bool, source: str) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tools=schemas, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja errors and the template's own raise_exception()
            raise RecordError(f"the chat template failed on this conversation: {exc}", source=source) from None

    def draft(self, messages: list[dict], targets: set[int], *, tools: list[str], schemas, weigh: bool,
              source: str) -> tuple[Draft, list[TurnStats]]:
        """Supervise the assistant messages at indices `targets` (the rest is context); weigh: PKT weights."""
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        full = self.render(messages, schemas, False, source)
        spans = {i: self._span(messages, i, full, schemas, source) for i in sorted(targets | {last})}
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        turn_tokens = {i: [k for k, o in enumerate(offsets) if _inside(o, spans[i])] for i in targets}
        supervised = {k for i in targets for k in turn_tokens[i]}
        labels = [t if k in supervised else IGNORE for k, t in enumerate(ids)]
        weights, stats = None, []
        if weigh:
            weights = [1.0] * len(ids)
            for i in sorted(targets):
                stats.append(self._weigh(messages[i], spans[i], full, offsets, turn_tokens[i], tools, weights,
                                         source))
        n_prompt = sum(1 for _, end in offsets if end <= spans[last][0])
        return Draft(ids, labels, n_prompt=n_prompt, reference=messages[last]["content"], weights=weights), stats

    def _span(self, messages, i, full, schemas, source) -> tuple[int, int]:
        return assistant_span(lambda msgs, gen: self.render(msgs, schemas, gen, source), messages, i, full, source)

    def _weigh(self, message, span, full, offsets, tokens, tools, weights, source) -> TurnStats:
        calls, unlocated = self._calls(message, span, full, source)
        pre, para = set(), set()
        for call in calls:
            p, q = key_positions(offsets, call, tools)
            pre |= p
            para |= q
        pre &= set(tokens)
        para = (para & set(tokens)) - pre
        w = pkt_weight(len(pre), len(tokens) - len(pre) - len(para), self.max_weight)
        for k in pre:
            weights[k] = w
        return TurnStats(len(calls), len(pre), w, unlocated)

    def _calls(self, message, span, full, source) -> tuple[list[Call], int]:
        if message.get("tool_calls"):
            return locate_rendered_calls(full, span[0], span[1], structured_calls(message, source=source),
                                         source=source)
        content = message["content"]
        calls = parse_text_calls(content)
        if not calls:
            return [], 0
        at = full.find(content, span[0], span[1])
        if at == -1:
            # Templates that trim the reply: offsets are then relative to the stripped text.
            lead = len(content) - len(content.lstrip())
            at = full.find(content.strip(), span[0], span[1])
            if at == -1:
                raise RecordError("the chat template changes the assistant reply's text, so its tool call "
                                  "cannot be located", source=source)
            at -= lead
        for call in calls:
            call.start += at
            call.delimiters = [d + at for d in call.delimiters]
        return calls, 0


def _inside(offset: tuple[int, int], span: tuple[int, int]) -> bool:
    # start < span end keeps an empty-offset token at a span's end outside it (as data/chat.py does).
    start, end = offset
    return span[0] <= start and end <= span[1] and start < span[1]
