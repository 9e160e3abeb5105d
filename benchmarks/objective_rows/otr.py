"""OTR vs plain SFT (cross-entropy) on real offline tasks: LoRA on SmolLM2-135M-Instruct, same step budget and seed.

Tasks: (a) arithmetic from DeepMind's mathematics-dataset (add/sub and mul, chat records, exact numeric answers),
(b) 3-way tweet sentiment. Both objectives train from examples/quickstart.yaml's settings (LoRA r 16 on every
projection, batch 8, lr 5e-4, cosine) for `steps` optimiser steps. Every number comes from `tokentune eval` with
the cross_entropy objective, so eval/loss is the same per-token cross-entropy for both (OTR's own loss is a
policy-gradient surrogate, not comparable) and eval/exact_match is greedy exact-answer accuracy. The base model is
evaluated once per task ("before").

  python benchmarks/objective_rows/otr.py                                # full: 40 steps, 400/100 examples
  python benchmarks/objective_rows/otr.py --tasks math --steps 4 --eval-examples 20     # a smoke run

`run(args)` returns one dict per (task, objective) for benchmarks/objectives.py; args needs none of its attributes
(see DEFAULTS).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "quickstart.yaml"
DEFAULTS = {"tasks": "math,tweets", "steps": 40, "seed": 0, "n_train": 400, "n_eval": 100, "eval_examples": None,
            "otr": {"name": "otr"}}  # otr: the objective config (defaults: mc, K 256, kappa 1.3, beta -0.1)
MAX_NEW_TOKENS = {"math": 16, "tweets": 4}  # answers up to ~10 digit tokens; one sentiment word


def _opt(args, key):
    value = getattr(args, key, None)
    return DEFAULTS[key] if value is None else value


def write_task(task: str, out: Path, n_train: int, n_eval: int, seed: int) -> Path:
    from tokentune.datasets_builtin import write_tweet_sentiment
    from tokentune.datasets_math import write_arithmetic

    writers = {"tweets": write_tweet_sentiment, "math": write_arithmetic}
    if task not in writers:
        raise SystemExit(f"unknown task {task!r} (choose from {sorted(writers)})")
    writers[task](out, n_train=n_train, n_eval=n_eval, seed=seed)
    return out


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokentune.cli", *argv], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


def _eval(target: Path, overrides: list[str]) -> dict:
    """`tokentune eval TARGET --json` with the cross_entropy objective: the last JSON line of its output."""
    proc = _cli("eval", str(target), *overrides, 'objective={"name": "cross_entropy"}', "--json")
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def _data_overrides(task_dir: Path, task: str, eval_examples) -> list[str]:
    out = [f"data.train={task_dir / 'train.jsonl'}", f"data.eval={task_dir / 'eval.jsonl'}",
           f"eval.max_new_tokens={MAX_NEW_TOKENS[task]}", "log.progress=false", "log.report=false"]
    return out + ([f"eval.max_examples={eval_examples}"] if eval_examples else [])


def train_and_eval(task: str, task_dir: Path, run_dir: Path, objective: dict, steps: int, seed: int,
                   eval_examples) -> dict:
    data = _data_overrides(task_dir, task, eval_examples)
    start = time.time()
    proc = _cli("train", str(CONFIG), *data, f"train.output_dir={run_dir}", f"train.max_steps={steps}",
                f"train.seed={seed}", f"objective={json.dumps(objective)}", "eval.at_start=false",
                "eval.at_end=false")
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    train_wall = time.time() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    logged = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_log = [l for l in logged if l.get("loss") is not None]
    start = time.time()
    after = _eval(run_dir, [o for o in data if o.startswith(("eval.", "data.eval"))])
    row = {"after": after, "train_seconds": summary["train_seconds"], "train_wall_seconds": round(train_wall, 1),
           "eval_wall_seconds": round(time.time() - start, 1), "first_train_loss": steps_log[0]["loss"],
           "final_train_loss": summary["final_loss"]}
    rates = [l["otr/gt_sample_rate"] for l in steps_log if "otr/gt_sample_rate" in l]
    if rates:  # how often the K rollouts found the ground-truth token, first and last step
        row["otr_gt_sample_rate"] = [rates[0], rates[-1]]
    return row


def run(args) -> list[dict]:
    import torch
    import transformers

    steps, seed, eval_examples = _opt(args, "steps"), _opt(args, "seed"), _opt(args, "eval_examples")
    objectives = {"cross_entropy": {"name": "cross_entropy"}, "otr": {**DEFAULTS["otr"], **_opt(args, "otr")}}
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for task in _opt(args, "tasks").split(","):
            task_dir = write_task(task, tmp / task, _opt(args, "n_train"), _opt(args, "n_eval"), seed)
            start = time.time()
            before = _eval(CONFIG, _data_overrides(task_dir, task, eval_examples))
            before_seconds = round(time.time() - start, 1)
            for name, objective in objectives.items():
                result = train_and_eval(task, task_dir, tmp / f"{task}-{name}", objective, steps, seed, eval_examples)
                after = result.get("after", {})
                rows.append({"benchmark": "objectives", "group": "otr_vs_sft", "task": task, "objective": name,
                             "config": objective, "adapter": "lora r16 (examples/quickstart.yaml)",
                             "model": "SmolLM2-135M-Instruct", "steps": steps, "seed": seed,
                             "accuracy_before": before.get("eval/exact_match"),
                             "accuracy_after": after.get("eval/exact_match"),
                             "eval_ce_before": before.get("eval/loss"), "eval_ce_after": after.get("eval/loss"),
                             "eval_before_wall_seconds": before_seconds, **result, "env": env})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--n-train", dest="n_train", type=int)
    p.add_argument("--n-eval", dest="n_eval", type=int)
    p.add_argument("--eval-examples", dest="eval_examples", type=int, help="evaluate on the first N eval examples")
    p.add_argument("--otr", type=json.loads, help='objective overrides as JSON, e.g. \'{"beta": -0.2}\'')
    p.add_argument("--out", help="also append the JSON lines to this file")
    args = p.parse_args()
    for row in run(args):
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(line + "\n")


if __name__ == "__main__":
    main()
