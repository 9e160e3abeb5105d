"""Shared pieces of the end-to-end tests: a small real dataset and a config on builtin:tiny-llama."""

import json
import random
from pathlib import Path

import yaml


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """Prompt/completion records a tiny model can learn a little of: sums of small numbers."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            fh.write(json.dumps({"prompt": f"What is {a} plus {b}?", "completion": f" {a + b}"}) + "\n")
    return path


def write_config(tmp: Path, **sections) -> Path:
    train = write_pairs(tmp / "data" / "train.jsonl", 48)
    evalp = write_pairs(tmp / "data" / "eval.jsonl", 12, seed=1)
    cfg = {
        "model": {"name": "builtin:tiny-llama"},
        "data": {"train": str(train), "eval": str(evalp), "max_length": 64},
        "adapter": {"name": "lora", "r": 4, "alpha": 8},
        "objective": {"name": "cross_entropy"},
        "train": {"max_steps": 6, "batch_size": 4, "grad_accum": 1, "lr": 5e-3, "seed": 0, "save_every": 0,
                  "eval_every": 0, "output_dir": str(tmp / "run"), "warmup_steps": 1},
        "eval": {"at_start": False, "max_new_tokens": 3},
        "log": {"progress": False},
    }
    for key, value in sections.items():
        cfg[key].update(value)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run_dir: Path) -> list[float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(l)["loss"] for l in lines if '"loss"' in l and json.loads(l).get("loss") is not None]
