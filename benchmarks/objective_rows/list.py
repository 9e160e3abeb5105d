"""LiST (recipe `list`) on BBC News topics, few-shot: 16 labelled articles per class, the rest of the training pool as
unlabelled text, accuracy on held-out articles. SmolLM2-135M-Instruct scores the class names after a template (the
verbalizer objective: LM-BFF-style prompt-based fine-tuning, label words fixed, no calibration).

Rows (same data, same article truncation, same seed, same template):
  list_teacher      the recipe's teacher alone: list_adapter (r 128) prompt-fine-tuned on the labelled articles
  list              the recipe's final student after the self-training sessions (meta re-weighting)
  prompt_ft_full    baseline: prompt-based fine-tuning of the whole model on the labelled articles only (LM-BFF)

  python benchmarks/objective_rows/list.py                       # the recommended config (GPU: see docs/recipes/list.md)
  python benchmarks/objective_rows/list.py --per-class 4 --n-eval 20 --pool 60 --max-words 40 --teacher-steps 6 \
      --sessions 1 --update-teacher-steps 2 --finetune-epochs 1 --unlabelled-batch 4 --full-steps 6   # CPU smoke

`run(args) -> list[dict]` for benchmarks/objectives.py; args needs none of its attributes (see DEFAULTS).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULTS = {"per_class": 16, "pool": 600, "n_eval": 200, "max_words": 96, "seed": 0, "teacher_steps": 400,
            "lr": 2e-4, "student_lr": 2e-4, "sessions": 3, "update_teacher_steps": 200, "finetune_epochs": 5,
            "unlabelled_batch": 16, "meta_batch": 4, "batch_size": 4, "weighting": "meta", "full_steps": 400,
            "full_lr": 1e-5, "rows": "list,prompt_ft_full", "device": "auto"}
SMOLLM = "builtin:smollm2-135m-instruct"
TEMPLATE = "Article: {text}\nTopic:{mask}"  # as benchmarks/objective_rows/verbalizer.py
VERBALIZER = {"template": TEMPLATE, "calibration": "none", "candidate_frac": 0.0, "train_weights": False}


def _opt(args, key):
    value = getattr(args, key, None) if args is not None else None
    return DEFAULTS[key] if value is None else value


def write_data(out: Path, pool: int, n_eval: int, max_words: int, seed: int) -> dict[str, Path]:
    """The training pool (the recipe draws per_class labelled articles from it; the rest are its unlabelled text) and
    the held-out articles, cut to their first max_words words."""
    from tokentune.datasets_builtin import write_bbc_news

    write_bbc_news(out / "bbc", n_train=pool, n_eval=n_eval, seed=seed)
    paths = {}
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in (out / "bbc" / f"{split}.jsonl").read_text().splitlines()]
        random.Random(seed).shuffle(rows)
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps({"text": " ".join(r["text"].split()[:max_words]),
                                                    "label": r["label"]}) + "\n" for r in rows))
    return paths


def _tree(args, paths, out: Path) -> dict:
    return {"model": {"name": SMOLLM}, "data": {"train": str(paths["train"]), "eval": str(paths["eval"]),
                                                "max_length": 256},
            "train": {"batch_size": _opt(args, "batch_size"), "lr": _opt(args, "lr"), "seed": _opt(args, "seed"),
                      "schedule": "linear", "warmup_ratio": 0.0, "output_dir": str(out),
                      "device": _opt(args, "device")},
            "eval": {"batch_size": 16}, "log": {"progress": False, "report": False}}


def run_list(args, paths, out: Path) -> dict:
    from tokentune.engine.distributed import setup
    from tokentune.recipes.base import load_recipe

    tree = _tree(args, paths, out)
    tree["recipe"] = {"few_shot": {"per_class": _opt(args, "per_class"), "seed": _opt(args, "seed")},
                      "adapter": {"name": "list_adapter", "r": 128}, "verbalizer": VERBALIZER,
                      "teacher_train": {"max_steps": _opt(args, "teacher_steps")},
                      "student_train": {"lr": _opt(args, "student_lr")},
                      "sessions": _opt(args, "sessions"), "update_teacher_steps": _opt(args, "update_teacher_steps"),
                      "finetune_epochs": _opt(args, "finetune_epochs"),
                      "unlabelled_batch_size": _opt(args, "unlabelled_batch"),
                      "meta_batch_size": _opt(args, "meta_batch"), "weighting": _opt(args, "weighting")}
    path = out.parent / "list.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree))
    recipe, base = load_recipe("list", path)
    start = time.time()
    summary = recipe.run(base, setup(base.train.device))
    summary["seconds"] = round(time.time() - start, 1)
    return summary


def run_full(args, labelled: str, paths, out: Path) -> dict:
    from tokentune.config import config_from_dict
    from tokentune.engine.distributed import setup
    from tokentune.engine.session import build_session
    from tokentune.engine.trainer import Trainer

    tree = _tree(args, {**paths, "train": labelled}, out)
    tree["adapter"], tree["objective"] = {"name": "full"}, {"name": "verbalizer", **VERBALIZER}
    tree["train"].update(max_steps=_opt(args, "full_steps"), lr=_opt(args, "full_lr"))
    cfg = config_from_dict(tree)
    start = time.time()
    summary = Trainer(build_session(cfg, setup(cfg.train.device))).train()
    return {**summary, "seconds": round(time.time() - start, 1)}


def run(args) -> list[dict]:
    import torch
    import transformers

    wanted = set(_opt(args, "rows").split(","))
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    per_class = _opt(args, "per_class")
    base = {"benchmark": "objectives", "group": "list", "task": f"bbc_news {per_class}/class + unlabelled pool",
            "model": "SmolLM2-135M-Instruct", "n_labelled": 5 * per_class, "n_eval": _opt(args, "n_eval"),
            "max_words": _opt(args, "max_words"), "seed": _opt(args, "seed"), "env": env}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_data(tmp / "data", _opt(args, "pool"), _opt(args, "n_eval"), _opt(args, "max_words"),
                           _opt(args, "seed"))
        labelled = None
        if "list" in wanted:
            s = run_list(args, paths, tmp / "runs" / "list")
            st = s["stages"]["self_training"]
            labelled = s["few_shot"]["labelled"]
            settings = {k: _opt(args, k) for k in ("teacher_steps", "lr", "student_lr", "sessions",
                                                   "update_teacher_steps", "finetune_epochs", "unlabelled_batch",
                                                   "meta_batch", "weighting")}
            common = {**base, "adapter": {"name": "list_adapter", "r": 128}, "n_unlabelled": st["unlabelled"],
                      "trainable_params": st["trainable_params"], "settings": settings}
            rows.append({**common, "row": "list_teacher", "accuracy": s["eval"]["teacher"].get("eval/accuracy"),
                         "eval_loss": s["eval"]["teacher"].get("eval/loss"),
                         "train_seconds": s["stages"]["teacher"]["train_seconds"],
                         "steps": s["stages"]["teacher"]["steps"]})
            rows.append({**common, "row": "list", "accuracy": s["eval"]["list"].get("eval/accuracy"),
                         "eval_loss": s["eval"]["list"].get("eval/loss"),
                         "per_session_accuracy": [e.get("eval/accuracy") for e in s["eval"]["per_session"]],
                         "student_steps": st["student_steps"], "self_training_seconds": st["train_seconds"],
                         "recipe_seconds": s["seconds"], "checks": s["checks"]})
            for row in rows:
                print(json.dumps(row), file=sys.stderr, flush=True)
        if "prompt_ft_full" in wanted:
            if labelled is None:  # the same draw the recipe makes
                from tokentune.data.config import DataConfig
                from tokentune.recipes.list_data import split_few_shot

                labelled = str(split_few_shot(DataConfig(train=str(paths["train"])), per_class, _opt(args, "seed"),
                                              tmp / "fewshot")[0])
            r = run_full(args, labelled, paths, tmp / "runs" / "full")
            rows.append({**base, "row": "prompt_ft_full", "adapter": {"name": "full"},
                         "accuracy": r["after"].get("eval/accuracy"), "eval_loss": r["after"].get("eval/loss"),
                         "trainable_params": r["trainable_params"], "steps": r["steps"],
                         "train_seconds": r["train_seconds"], "seconds": r["seconds"],
                         "settings": {"steps": _opt(args, "full_steps"), "lr": _opt(args, "full_lr")}})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for key, value in DEFAULTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=None)
    parser.add_argument("--out", default=None, help="append the JSON lines here too")
    args = parser.parse_args(argv)
    for row in run(args):
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(line + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    main()
