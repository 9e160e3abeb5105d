"""Chat records: check the messages, render them with the tokenizer's template, and find the assistant
tokens by rendering prefixes (works for templates without generation markers)."""

from __future__ import annotations

from ..errors import TokentuneError
from .example import Draft
from .records import RecordError

ROLES = ("system", "user", "assistant", "tool")


def check_messages(value, *, source: str, column: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RecordError(f"field {column!r} must be a non-empty list of {{role, content}} messages, "
                          f"got {type(value).__name__}", source=source)
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not {"role", "content"} <= set(msg):
            keys = sorted(msg) if isinstance(msg, dict) else type(msg).__name__
            raise RecordError(f"message {i} needs 'role' and 'content', got {keys}", source=source,
                              fix='write messages as {"role": "user", "content": "..."}')
        if msg["role"] not in ROLES:
            raise RecordError(f"message {i} has unknown role {msg['role']!r}; expected one of {list(ROLES)}",
                              source=source)
        if not isinstance(msg["content"], str):
            raise RecordError(f"message {i} content must be a string, got {type(msg['content']).__name__}",
                              source=source)
        # Arrow-backed files fill keys a message lacks with None; templates would render them.
        out.append({k: v for k, v in msg.items() if v is not None})
    if not any(m["role"] == "assistant" for m in out):
        raise RecordError("the conversation has no assistant message, so nothing to learn", source=source,
                          fix="add the assistant's reply, or use format text")
    return out


def check_chat_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise TokentuneError("format messages needs a tokenizer with a chat template; this one has none",
                             where="data.format",
                             fix="use an instruct/chat model's tokenizer, or format prompt_completion")
    if not getattr(tokenizer, "is_fast", False):
        raise TokentuneError("format messages needs a fast (Rust) tokenizer for character offsets",
                             where="model.name", fix="use a model that ships tokenizer.json")


def draft_messages(messages: list[dict], tokenizer, *, assistant_only: bool, source: str) -> Draft:
    def render(msgs: list[dict], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja errors and the template's own raise_exception()
            raise RecordError(f"the chat template failed on this conversation: {exc}", source=source) from None

    full = render(messages, False)
    spans = [assistant_span(render, messages, i, full, source)
             for i, msg in enumerate(messages) if msg["role"] == "assistant"]

    # The template already holds its special tokens; verbose=False: finalize() truncates, no length warning.
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    in_assistant = [_inside(start, end, spans) for start, end in offsets]
    if not any(in_assistant):
        raise RecordError("the chat template gives no assistant tokens for this conversation", source=source,
                          fix="use a template that renders assistant messages, or format prompt_completion")
    labels = [t if keep or not assistant_only else -100 for t, keep in zip(ids, in_assistant)]
    last_start = spans[-1][0]
    n_prompt = sum(1 for _, end in offsets if end <= last_start)
    reference = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
    return Draft(ids, labels, n_prompt=n_prompt, reference=reference)


def assistant_span(render, messages: list[dict], i: int, full: str, source: str) -> tuple[int, int]:
    """Character span of assistant message i in `full`, found by rendering prefixes;
    render(msgs, generation_prompt) -> str. Errors if the template is not prefix-stable."""
    before, upto = render(messages[:i], True), render(messages[:i + 1], False)
    if not upto.startswith(before) or not full.startswith(upto):
        raise TokentuneError(
            "the chat template is not prefix-stable: rendering the conversation up to message "
            f"{i} is not a prefix of rendering more of it, so assistant tokens cannot be located",
            where=f"{source} (message {i})",
            fix="use format prompt_completion with the conversation rendered into prompt and completion")
    return len(before), len(upto)


def _inside(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    # start < span end keeps an empty-offset token at a span's end outside it.
    return any(s <= start and end <= e and start < e for s, e in spans)
