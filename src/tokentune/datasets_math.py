"""Arithmetic questions with exact answers, from DeepMind's `mathematics-dataset` generator (offline).

The package predates sympy 1.6, which moved `base_solution_linear`; torch needs a newer sympy, so a
two-line shim puts the function back where the generator looks for it. Questions are drawn from the
`train-easy` modules, deterministic for a seed, de-duplicated, eval drawn first and disjoint from train.
"""

from __future__ import annotations

import importlib
import random
from pathlib import Path

from tokentune.datasets_builtin import _check_sizes, _write_splits
from tokentune.errors import TokentuneError

MATH_MODULES = ("arithmetic__add_or_sub", "arithmetic__mul")
MATH_INSTRUCTION = "{question}\nAnswer with the number only."


def _generator():
    try:
        diophantine = importlib.import_module("sympy.solvers.diophantine")
        from sympy.solvers.diophantine.diophantine import base_solution_linear

        diophantine.base_solution_linear = base_solution_linear  # sympy >= 1.6 shim
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS(["tokentune"])
        from mathematics_dataset import generate
    except ImportError as exc:
        raise TokentuneError(f"the arithmetic data needs the package 'mathematics-dataset' ({exc})",
                             fix="pip install mathematics-dataset") from None
    generate.init_modules(train_split=True)
    return generate


def arithmetic_pairs(n: int, seed: int = 0, modules=MATH_MODULES) -> list[tuple[str, str, str]]:
    """n distinct (question, answer, module) triples, modules interleaved."""
    import numpy as np

    generate = _generator()
    state = (random.getstate(), np.random.get_state())
    random.seed(seed)
    np.random.seed(seed)
    try:
        seen, out = set(), []
        for i in range(n * 20):
            module = modules[i % len(modules)]
            problem, _ = generate.sample_from_module(generate.filtered_modules["train-easy"][module])
            q, a = str(problem.question), str(problem.answer)
            if q not in seen:
                seen.add(q)
                out.append((q, a, module))
            if len(out) == n:
                return out
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
    raise TokentuneError(f"could not draw {n} distinct questions", fix="ask for fewer")


def write_arithmetic(out_dir, n_train: int = 400, n_eval: int = 150, seed: int = 0) -> dict:
    """Chat SFT records: the question (plus an instruction to answer with the number) -> the answer."""
    _check_sizes(n_train, n_eval)
    triples = arithmetic_pairs(n_eval + n_train, seed)

    def record(q: str, a: str) -> dict:
        return {"messages": [{"role": "user", "content": MATH_INSTRUCTION.format(question=q)},
                             {"role": "assistant", "content": a}]}

    pairs = [(record(q, a), module) for q, a, module in triples]
    return _write_splits(Path(out_dir), {"eval": pairs[:n_eval], "train": pairs[n_eval:]}, MATH_MODULES)
