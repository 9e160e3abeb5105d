"""TL-Training's view of tool-use records: error observations (MAE), the available tool names, and where
the tool calls of an assistant reply sit in its text (character offsets; tokens come later, from offsets).

Two reply forms are understood:
  text        the paper's `func_name(arg='value', ...)` (one or more calls, whitespace between them)
  structured  OpenAI-style `tool_calls: [{"function": {"name": ..., "arguments": ...}}]`, either written
              into the text form (`name(k=<json>, ...)`, as the released code's data conversion does) or
              left to a chat template that renders them (then found by name in the rendered reply).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ..data.records import RecordError

# The released code's list (code/mae/mae.py), compared after `normalise`: note that "'error'" and
# '"error":' both normalise to "error", so any observation containing that word is an error.
DEFAULT_ERROR_MARKERS = (
    "is not defined", "positional argument", "unexpected keyword", "'related_searches'", "ConnectionError",
    '"error":', "not supported", "Invalid API call", "Response error",
    "Object of type SerpResults is not JSON serializable", "400 Client Error", "'error'",
    "slice indices must be integers or None or have an __index__ method", "connection error",
)

# Exactly the released code's character class: keeps CJK ideographs, ASCII letters, digits and '^'.
_STRIP = re.compile("[^\u4e00-\u9fa5^a-zA-Z0-9]")
_NAME = re.compile(r"[A-Za-z_][\w.\-]*")


def normalise(text: str) -> str:
    return _STRIP.sub("", text).lower()


def is_error(observation: str, markers: list[str]) -> bool:
    seen = normalise(observation)
    return any(m and m in seen for m in (normalise(k) for k in markers))


@dataclass
class Call:
    name: str
    start: int  # character offset of the name's first character
    delimiters: list[int] = field(default_factory=list)  # offset of the `,` / `)` / `}` ending each argument


def tool_names(value, *, source: str, field_name: str) -> tuple[list[str], list[dict] | None]:
    """(names, schemas or None) from a record's tools field: a list of names, of OpenAI tool schemas
    ({"type": "function", "function": {"name": ...}} or {"name": ...}), or a JSON string of either."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise RecordError(f"field {field_name!r} is a string but not JSON", source=source) from None
    if not isinstance(value, list):
        raise RecordError(f"field {field_name!r} must be a list of tool names or tool schemas, "
                          f"got {type(value).__name__}", source=source)
    if all(isinstance(t, str) for t in value):
        return list(value), None
    names = []
    for t in value:
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RecordError(f"field {field_name!r}: each tool must be a name or a schema with a name, "
                              f"got {t!r:.80}", source=source)
        names.append(fn["name"])
    return names, value


def structured_calls(message: dict, *, source: str) -> list[tuple[str, dict]]:
    """(name, arguments) of an assistant message's `tool_calls`; arguments given as a JSON string are parsed."""
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise RecordError("tool_calls must be a list", source=source)
    out = []
    for call in calls:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RecordError(f"a tool call needs a function name, got {call!r:.80}", source=source)
        args = fn.get("arguments") or {}
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                raise RecordError(f"tool call {fn['name']!r}: arguments are not JSON", source=source) from None
        if not isinstance(args, dict):
            raise RecordError(f"tool call {fn['name']!r}: arguments must be an object", source=source)
        out.append((fn["name"], args))
    return out


def as_text(name: str, args: dict) -> str:
    """The released code's conversion: `name(k=<json value>, ...)`."""
    return f"{name}(" + ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in args.items()) + ")"


def parse_text_calls(text: str) -> list[Call] | None:
    """The calls of a reply written as `name(args) name(args) ...` and nothing else; None when the reply
    is not of that form (a plain answer)."""
    calls, i = [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return calls or None
        m = _NAME.match(text, i)
        if m is None or m.end() >= len(text) or text[m.end()] != "(":
            return None
        scanned = scan_arguments(text, m.end())
        if scanned is None:
            return None
        close, delimiters = scanned
        calls.append(Call(m.group(), m.start(), delimiters))
        i = close + 1


def scan_arguments(text: str, open_at: int) -> tuple[int, list[int]] | None:
    """From the bracket at `open_at` (`(` or `{`): (offset of its matching close, offsets of the top-level
    `,` and the close that end each non-empty argument). Quotes and nested brackets are skipped."""
    closer = {"(": ")", "{": "}"}[text[open_at]]
    depth, quote, start, delimiters = 0, None, open_at + 1, []
    i = open_at + 1
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                if ch != closer:
                    return None
                if text[start:i].strip():
                    delimiters.append(i)
                return i, delimiters
            depth -= 1
        elif ch == "," and depth == 0:
            if not text[start:i].strip():
                return None
            delimiters.append(i)
            start = i + 1
        i += 1
    return None


def locate_rendered_calls(text: str, begin: int, end: int, calls: list[tuple[str, dict]], *,
                          source: str) -> tuple[list[Call], int]:
    """Structured calls as a chat template rendered them in text[begin:end]: each name found in order as a
    whole word, and its argument delimiters from the first JSON object after it that decodes to its
    arguments. Returns (calls, how many calls' arguments could not be found: their delimiters stay empty)."""
    out, missing, cursor = [], 0, begin
    decoder = json.JSONDecoder()
    for name, args in calls:
        m = re.compile(rf"(?<![\w.\-]){re.escape(name)}(?![\w.\-])").search(text, cursor, end)
        if m is None:
            raise RecordError(f"the chat template does not render the name of tool call {name!r} in the "
                              "assistant reply, so its key tokens cannot be found", source=source,
                              fix="set the tl_weights option tool_call_format: text")
        call, cursor = Call(name, m.start()), m.end()
        brace = text.find("{", cursor, end)
        while brace != -1 and not call.delimiters and args:
            try:
                value, stop = decoder.raw_decode(text, brace)
            except ValueError:
                value, stop = None, brace + 1
            if value == args:
                call.delimiters = scan_arguments(text, brace)[1]
                cursor = stop
                break
            brace = text.find("{", brace + 1, end)
        missing += bool(args) and not call.delimiters
        out.append(call)
    return out, missing
