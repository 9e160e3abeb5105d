"""CAFT vs plain SFT (cross-entropy) on real offline tasks: LoRA on SmolLM2-135M-Instruct, same step budget and seed.

Tasks: (a) arithmetic from DeepMind's mathematics-dataset (add/sub and mul, chat records, exact numeric answers),
(b) 3-way tweet sentiment. Every run trains from examples/quickstart.yaml's settings (LoRA r 16 on every projection,
batch 8, lr 5e-4, cosine) for `steps` optimiser steps with the same seed:
  sft         objective cross_entropy
  caft        the paper's workflow, recipe caft_heads with the objective's defaults (4 transformer heads, c 0.01,
              d 0.8, rsine): stage 1 trains the heads alone on the task's train split for `heads_steps` steps (no
              trained heads exist for SmolLM2; on the task data this is the code's `-hpretrain`) at lr `heads_lr`,
              stage 2 fine-tunes with those heads frozen for `steps` steps
  caft_joint  (opt-in) no stage 1: fresh heads (copies of layer -2) train with the LoRA in one run, objective
              options `joint` (default: head_input penultimate + head_norm, which start near the uniform loss; the
              code's un-normed heads start at ~1000 nats per token and swamp the first steps)
Every number comes from `tokentune eval` with the cross_entropy objective: eval/loss is the next-token loss for all
three, eval/exact_match greedy exact-answer accuracy. The base model is evaluated once per task ("before").

  python benchmarks/objective_rows/caft.py                                        # full: 40 steps, 400/100 examples
  python benchmarks/objective_rows/caft.py --tasks math --steps 4 --heads-steps 4 --eval-examples 20   # smoke run
  python benchmarks/objective_rows/caft.py --methods sft,caft,caft_joint

`run(args) -> list[dict]` returns one row per (task, method) for benchmarks/objectives.py; args needs none of its
attributes (see DEFAULTS).
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
DEFAULTS = {"tasks": "math,tweets", "methods": "sft,caft", "steps": 40, "heads_steps": 40, "heads_lr": 1e-3, "seed": 0,
            "n_train": 400, "n_eval": 100, "eval_examples": None, "caft": {},
            "joint": {"head_input": "penultimate", "head_norm": True}}
sys.path.insert(0, str(Path(__file__).resolve().parent))
from otr import CONFIG, _cli, _data_overrides, _eval, write_task  # noqa: E402  (the task helpers both rows share)


def _opt(args, key):
    value = getattr(args, key, None) if args is not None else None
    return DEFAULTS[key] if value is None else value


def _steps_log(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def train_and_eval(method: str, task: str, task_dir: Path, run_dir: Path, args) -> dict:
    data = _data_overrides(task_dir, task, _opt(args, "eval_examples"))
    caft = {"name": "caft", **_opt(args, "joint" if method == "caft_joint" else "caft")}
    common = [*data, f"train.output_dir={run_dir}", f"train.max_steps={_opt(args, 'steps')}",
              f"train.seed={_opt(args, 'seed')}", "eval.at_start=false", "eval.at_end=false"]
    start = time.time()
    if method == "caft":
        heads_train = {"max_steps": _opt(args, "heads_steps"), "lr": _opt(args, "heads_lr")}
        proc = _cli("recipe", "caft_heads", str(CONFIG), *common, f"objective={json.dumps(caft)}",
                    f"recipe.heads_train={json.dumps(heads_train)}")
        trained = run_dir / "caft"
    else:
        objective = caft if method == "caft" else {"name": "cross_entropy"}
        proc = _cli("train", str(CONFIG), *common, f"objective={json.dumps(objective)}")
        trained = run_dir
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    train_wall = time.time() - start
    summary = json.loads((trained / "summary.json").read_text())
    steps_log = _steps_log(trained)
    start = time.time()
    after = _eval(trained, [o for o in data if o.startswith(("eval.", "data.eval"))])
    row = {"after": after, "train_seconds": summary["train_seconds"], "train_wall_seconds": round(train_wall, 1),
           "eval_wall_seconds": round(time.time() - start, 1), "first_train_loss": steps_log[0]["loss"],
           "final_train_loss": summary["final_loss"], "objective_config": caft if method != "sft" else None}
    heads = [k for k in steps_log[-1] if k.startswith("caft/head")]
    if heads:  # each auxiliary head's own loss at the first and the last step
        row["caft_head_losses"] = {k.split("/")[1]: [steps_log[0][k], steps_log[-1][k]] for k in sorted(heads)}
    if method == "caft":
        stage1 = _steps_log(run_dir / "heads")
        row["stage1_seconds"] = json.loads((run_dir / "heads" / "summary.json").read_text())["train_seconds"]
        row["stage1_head_losses"] = {k.split("/")[1]: [stage1[0][k], stage1[-1][k]]
                                     for k in sorted(stage1[-1]) if k.startswith("caft/head")}
    return row


def run(args) -> list[dict]:
    import torch
    import transformers

    steps, seed = _opt(args, "steps"), _opt(args, "seed")
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for task in _opt(args, "tasks").split(","):
            task_dir = write_task(task, tmp / task, _opt(args, "n_train"), _opt(args, "n_eval"), seed)
            start = time.time()
            before = _eval(CONFIG, _data_overrides(task_dir, task, _opt(args, "eval_examples")))
            before_seconds = round(time.time() - start, 1)
            for method in _opt(args, "methods").split(","):
                result = train_and_eval(method, task, task_dir, tmp / f"{task}-{method}", args)
                after = result.get("after", {})
                rows.append({"benchmark": "objectives", "group": "caft_vs_sft", "task": task, "objective": method,
                             "adapter": "lora r16 (examples/quickstart.yaml)", "model": "SmolLM2-135M-Instruct",
                             "steps": steps, "heads_steps": _opt(args, "heads_steps") if method == "caft" else 0,
                             "seed": seed, "accuracy_before": before.get("eval/exact_match"),
                             "accuracy_after": after.get("eval/exact_match"),
                             "eval_ce_before": before.get("eval/loss"), "eval_ce_after": after.get("eval/loss"),
                             "eval_before_wall_seconds": before_seconds, **result, "env": env})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks")
    p.add_argument("--methods", help="comma-separated: sft, caft, caft_joint")
    p.add_argument("--steps", type=int)
    p.add_argument("--heads-steps", dest="heads_steps", type=int, help="stage-1 steps of caft")
    p.add_argument("--heads-lr", dest="heads_lr", type=float, help="stage-1 learning rate of caft")
    p.add_argument("--seed", type=int)
    p.add_argument("--n-train", dest="n_train", type=int)
    p.add_argument("--n-eval", dest="n_eval", type=int)
    p.add_argument("--eval-examples", dest="eval_examples", type=int, help="evaluate on the first N eval examples")
    p.add_argument("--caft", type=json.loads, help='caft objective options as JSON, e.g. \'{"head_arch": "linear"}\'')
    p.add_argument("--joint", type=json.loads, help="caft_joint's objective options as JSON")
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
