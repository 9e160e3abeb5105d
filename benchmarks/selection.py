"""Token and sample selection on real offline tasks, with a fixed budget of optimiser steps.

For each task (tweet sentiment, arithmetic) and each method, trains LoRA on SmolLM2-135M-Instruct from
the same config (examples/quickstart.yaml's settings), then measures held-out exact-answer accuracy.
Baselines: full data (no selector) and random selection at the same sample/token budget. Writes one JSON
line per (task, method): accuracy before/after, eval loss, samples and loss tokens kept, the selection
overhead (extra forward passes, their seconds) and train time.

  python benchmarks/selection.py                      # everything (~40 min on 2 CPU cores)
  python benchmarks/selection.py --tasks math --methods full,q_tuning_25x50 --steps 20
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

ROOT = Path(__file__).resolve().parents[1]

# name -> selectors list (the paper budgets: Q-Tuning 25% samples x 50% tokens; ssToken rho 0.6; MFT p 0.4)
METHODS = {
    "full": [],
    "random_25x50": [{"name": "random_subset", "sample_ratio": 0.25, "token_ratio": 0.5}],
    "q_tuning_25x50": [{"name": "q_tuning", "sample_ratio": 0.25, "token_ratio": 0.5}],
    "random_tok60": [{"name": "random_subset", "token_ratio": 0.6}],
    "sstoken_60": [{"name": "sstoken", "ratio": 0.6}],
    "masked_thought_40": [{"name": "masked_thought", "rate": 0.4}],
}


def write_task(task: str, out: Path) -> Path:
    from tokentune.datasets_builtin import write_tweet_sentiment
    from tokentune.datasets_math import write_arithmetic

    if task == "tweets":
        write_tweet_sentiment(out, n_train=400, n_eval=100, seed=0)
    elif task == "math":
        write_arithmetic(out, n_train=400, n_eval=100, seed=0)
    else:
        raise SystemExit(f"unknown task {task}")
    return out


def run(task_dir: Path, run_dir: Path, selectors: list, steps: int, seed: int, at_start: bool) -> dict:
    overrides = [f"data.train={task_dir / 'train.jsonl'}", f"data.eval={task_dir / 'eval.jsonl'}",
                 f"train.output_dir={run_dir}", f"train.max_steps={steps}", f"train.seed={seed}",
                 f"selectors={json.dumps(selectors)}", f"eval.at_start={str(at_start).lower()}",
                 "eval.max_new_tokens=8", "log.progress=false", "log.report=false"]
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "tokentune.cli", "train", str(ROOT / "examples" / "quickstart.yaml"),
                           *overrides], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    summary = json.loads((run_dir / "summary.json").read_text())
    steps_log = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    mean = lambda key: sum(s.get(key, 0.0) for s in steps_log) / max(len(steps_log), 1)  # noqa: E731
    return {
        "before": summary["before"], "after": summary["after"], "train_seconds": summary["train_seconds"],
        "wall_seconds": round(time.time() - start, 1),
        "samples_kept": mean("select/samples_kept") if selectors else 1.0,
        "loss_tokens_kept": mean("select/loss_tokens_kept") if selectors else 1.0,
        "selection_seconds_per_step": mean("signals/seconds"), "signal_forwards_per_step": mean("signals/forwards"),
        "final_train_loss": summary["final_loss"],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", default="tweets,math")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seeds", default="0")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args()
    import torch
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for task in args.tasks.split(","):
            task_dir = write_task(task, tmp / task)
            for seed in [int(s) for s in args.seeds.split(",")]:
                for i, method in enumerate(args.methods.split(",")):
                    result = run(task_dir, tmp / f"{task}-{method}-{seed}", METHODS[method], args.steps, seed,
                                 at_start=(i == 0))
                    line = json.dumps({"benchmark": "selection", "task": task, "method": method, "seed": seed,
                                       "steps": args.steps, "selectors": METHODS[method], **result, "env": env})
                    print(line, flush=True)
                    if args.out:
                        with open(args.out, "a") as fh:
                            fh.write(line + "\n")


if __name__ == "__main__":
    main()
