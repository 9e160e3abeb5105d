"""TL-Training's IRM reward (Ye et al. 2024, code/irm/dschat/rlhf/ppo_trainer.py `test_answer_for_reward`): the
generated tool call is parsed and compared with the reference call, and the first matching error category gives
the reward.

    category                          reward   condition (checked in this order)
    format_error                      -2       no call can be parsed from the reply
    unknown_tool                      -2       the called tool is not among the available tools
    wrong_tool                        -1.5     an available tool, but not the reference's
    hallucinated_redundant_missing    -1.8     an argument name outside the tool's schema, an optional argument
                                               the reference does not give, and a reference argument left out
    hallucinated_and_other            -1.3     hallucinated and (redundant or missing)
    redundant_and_missing             -1.0
    hallucinated                      -0.8     hallucinated only
    redundant_or_missing              -0.5
    wrong_values                      -0.25    the same argument names, some value differs
    correct                           +1

Replies are read in two forms: the paper's text form `name(key=value, ...)` (values as JSON or Python literals,
so both `unit="celsius"` and `unit='celsius'`; text after the call is ignored, as by the released regex), and a
JSON object `{"name": ..., "arguments": {...}}`, bare or after a tag such as `<tool_call>`.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from ..selection.tl_weights_calls import scan_arguments

_NAME = re.compile(r"[A-Za-z_][\w.\-]*")
_KEY = re.compile(r"\s*([A-Za-z_]\w*)\s*=\s*(.*?)\s*", re.S)

CATEGORIES = ("format_error", "unknown_tool", "wrong_tool", "hallucinated_redundant_missing", "hallucinated_and_other",
              "redundant_and_missing", "hallucinated", "redundant_or_missing", "wrong_values", "correct")


class RewardTable(BaseModel):
    """The reward of each error category (defaults: the paper's values)."""

    model_config = ConfigDict(extra="forbid")
    format_error: float = -2.0
    unknown_tool: float = -2.0
    wrong_tool: float = -1.5
    hallucinated_redundant_missing: float = -1.8
    hallucinated_and_other: float = -1.3
    redundant_and_missing: float = -1.0
    hallucinated: float = -0.8
    redundant_or_missing: float = -0.5
    wrong_values: float = -0.25
    correct: float = 1.0


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


def _literal(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return ast.literal_eval(text)  # 'single quotes', True, None; raises on anything else


def parse_text_call(text: str) -> ToolCall | None:
    """The call `name(k=v, ...)` at the start of `text` (after whitespace); None if there is none."""
    text = text.lstrip()
    m = _NAME.match(text)
    if m is None or m.end() >= len(text) or text[m.end()] != "(":
        return None
    scanned = scan_arguments(text, m.end())
    if scanned is None:
        return None
    _, ends = scanned
    args, start = {}, m.end() + 1
    for end in ends:
        kv = _KEY.fullmatch(text[start:end])
        if kv is None or kv.group(1) in args:  # a positional or repeated argument
            return None
        try:
            args[kv.group(1)] = _literal(kv.group(2))
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            return None
        start = end + 1
    return ToolCall(m.group(), args)


def parse_json_call(text: str) -> ToolCall | None:
    """The first JSON object of `text` when it is a call {"name": ..., "arguments" (or "parameters"): {...}}."""
    at = text.find("{")
    if at == -1:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text, at)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return ToolCall(value["name"], args) if isinstance(args, dict) else None


def parse_call(reply: str) -> ToolCall | None:
    """A reply starting with `{` or a tag `<...>` is read as a JSON call, anything else as `name(...)`."""
    stripped = reply.strip()
    if stripped.startswith(("{", "<")):
        return parse_json_call(stripped)
    return parse_text_call(stripped)


def same_value(a, b) -> bool:
    """Equal JSON values: numbers compare by value (3 == 3.0), booleans only with booleans."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return a == b


def classify(reply: str, gold: ToolCall, tools: dict[str, frozenset | None]) -> str:
    """The error category of `reply` against the reference call; tools: name -> its parameter names (None when
    the record gives no schema: hallucinated and redundant cannot be told then, as in the released code)."""
    pred = parse_call(reply)
    if pred is None:
        return "format_error"
    if pred.name not in tools:
        return "unknown_tool"
    if pred.name != gold.name:
        return "wrong_tool"
    params = tools[gold.name]
    keys, gold_keys = set(pred.arguments), set(gold.arguments)
    hallucinated = params is not None and not keys <= params
    redundant = params is not None and any(k not in gold_keys and k in params for k in keys)
    missing = bool(gold_keys - keys)
    if hallucinated and redundant and missing:
        return "hallucinated_redundant_missing"
    if hallucinated and (redundant or missing):
        return "hallucinated_and_other"
    if redundant and missing:
        return "redundant_and_missing"
    if hallucinated:
        return "hallucinated"
    if redundant or missing:
        return "redundant_or_missing"
    if not same_value(pred.arguments, gold.arguments):
        return "wrong_values"
    return "correct"


def reward(category: str, table: RewardTable) -> float:
    return float(getattr(table, category))
