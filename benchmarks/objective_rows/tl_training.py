"""Benchmark row: the tl_training recipe (TL-Training: tl_weights SFT, then PPO with the tool-call error-category
reward) on SmolLM2-135M-Instruct + LoRA, on the synthetic tool-use task of tokentune.datasets_tools (offline).

Greedy replies to held-out requests are scored by the reward's error categories for the base model (adapter off),
after the short SFT and after PPO: mean reward, correct-call rate and the category counts, plus the sampled reward
of each PPO iteration and the timings of every part.

  python benchmarks/objective_rows/tl_training.py --threads 1      # the reduced CPU run (defaults below)
  python benchmarks/objective_rows/tl_training.py --sft-steps 2 --prompts 8 --eval-prompts 4 --max-new-tokens 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "builtin:smollm2-135m-instruct"
DEFAULTS = {"n_train": 200, "n_eval": 40, "answers": False, "sft_steps": 20, "sft_batch": 4, "sft_lr": 1e-3,
            "prompts": 32, "eval_prompts": 32, "rollout": 8, "ppo_epochs": 2, "mini_batch": 4, "epochs": 1,
            "ppo_lr": 1e-4, "critic_lr": 1e-3, "kl_ctl": 0.3, "temperature": 0.7, "max_new_tokens": 32,
            "eval_base": True, "seed": 0, "threads": 0}
LORA = {"name": "lora", "r": 16, "alpha": 32}


def option(args, key):
    value = getattr(args, key, None) if args is not None else None
    return DEFAULTS[key] if value is None else value


def config(tmp: Path, args) -> Path:
    import yaml

    from tokentune.datasets_tools import write_tools

    info = write_tools(tmp / "data", n_train=option(args, "n_train"), n_eval=option(args, "n_eval"),
                       seed=option(args, "seed"), answers=option(args, "answers"))
    new = option(args, "max_new_tokens")
    cfg = {"model": {"name": MODEL},
           "data": {"train": str(info["train"]), "eval": str(info["eval"]), "max_length": 384},
           "adapter": LORA, "selectors": [{"name": "tl_weights"}],
           "train": {"max_steps": option(args, "sft_steps"), "batch_size": option(args, "sft_batch"),
                     "lr": option(args, "sft_lr"), "warmup_steps": 2, "seed": option(args, "seed"),
                     "output_dir": str(tmp / "run")},
           "eval": {"at_end": False}, "log": {"progress": False, "report": False, "tensorboard": False},
           "recipe": {"num_prompts": option(args, "prompts"), "max_eval_prompts": option(args, "eval_prompts"),
                      "eval_max_new_tokens": new, "eval_base": option(args, "eval_base"),
                      "ppo_train": {"lr": option(args, "ppo_lr")},
                      "ppo": {"epochs": option(args, "epochs"), "rollout_batch_size": option(args, "rollout"),
                              "mini_batch_size": option(args, "mini_batch"), "ppo_epochs": option(args, "ppo_epochs"),
                              "max_new_tokens": new, "temperature": option(args, "temperature"),
                              "kl_ctl": option(args, "kl_ctl"), "critic_lr": option(args, "critic_lr"),
                              "value_hidden": 256}}}
    path = tmp / "tl_training.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(args=None) -> list[dict]:
    import torch
    import transformers

    from tokentune.engine.distributed import setup
    from tokentune.recipes.base import load_recipe

    if option(args, "threads"):  # on a crowded CPU one thread beats two (OpenMP threads wait on each other)
        torch.set_num_threads(option(args, "threads"))
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        recipe, base = load_recipe("tl_training", config(Path(tmp), args))
        summary = recipe.run(base, setup("cpu"))
        total = round(time.time() - t0, 1)
        ppo = summary["stages"]["ppo"]
        metrics = [json.loads(line) for line in (Path(tmp) / "run" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    evals = ppo["eval"]
    row = {"benchmark": "objectives", "objective": "tl_training (tl_weights SFT + PPO)", "task": "synthetic_tool_calls",
           "model": MODEL, "adapter": LORA, "settings": {k: option(args, k) for k in DEFAULTS},
           "ppo_prompts": ppo["prompts"], "eval_prompts": evals["sft"]["n"], "ppo_iterations": ppo["iterations"],
           "ppo_updates": ppo["updates"], "sft_final_loss": summary["stages"]["sft"]["final_loss"],
           **{f"{stage}_{k}": evals[stage][k] for stage in evals for k in ("reward", "correct_rate", "categories")},
           "ppo_sampled_reward": [round(m["reward"], 3) for m in metrics],
           "ppo_sampled_correct": [round(m["correct_rate"], 3) for m in metrics],
           "ppo_kl": [round(m["kl"], 5) for m in metrics],
           "examples_after": evals["ppo"]["examples"], "timings_s": {**summary["timings_s"], "total": total},
           "env": env}
    print(json.dumps(row), flush=True)
    return [row]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for key, value in DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, dest=key, type=lambda s: s.lower() in ("1", "true", "yes"), metavar="BOOL")
        else:
            p.add_argument(flag, dest=key, type=type(value))
    p.add_argument("--out", help="also append the JSON line to this file")
    args = p.parse_args()
    rows = run(args)
    if args.out:
        with open(args.out, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
