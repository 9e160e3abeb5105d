"""black_box_prompt (unsupervised black-box prompt learning, v1) on tweet sentiment, SmolLM2-135M-Instruct as the
black box (label-word log-likelihoods only, no gradients). The learner sees the train tweets WITHOUT labels; the
held-out labelled tweets only score the final rows.

Rows (one recipe run; the same held-out tweets, the same per-tweet demonstrations in every row with demos):
  bbp_zero_shot              no prompt, no demonstrations: the query alone
  bbp_demos_only             k pseudo-labelled demonstrations, no prompt
  bbp_random_prompt_demos    a prompt drawn from the initial (uniform) distribution + the demonstrations
  bbp_learned_prompt_demos   the learned argmax prompt + the demonstrations (the method)
Every row also carries the pseudo-label accuracy of the seed set and of the final pool against the train tweets'
hidden labels (read by this script, never by the recipe).

  python benchmarks/objective_rows/black_box_prompt.py                         # recommended (CPU: see docs)
  python benchmarks/objective_rows/black_box_prompt.py --n-train 30 --n-eval 15 --steps 2 --samples 2 \\
      --batch 4 --prompt-length 4 --candidates 20 --rows zero_shot,random_prompt_demos   # smoke
  python benchmarks/objective_rows/black_box_prompt.py --write-data DIR         # the example's data files

`run(args) -> list[dict]` for benchmarks/objectives.py; args needs none of its attributes (see DEFAULTS).
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

DEFAULTS = {"n_train": 150, "n_eval": 150, "seed": 0, "prompt_length": 10, "candidates": 30, "samples": 8,
            "batch": 8, "steps": 30, "lr": 0.02, "demos": 2, "max_words": 24, "relabel_every": 15,
            "rows": "zero_shot,demos_only,random_prompt_demos"}
SMOLLM = "builtin:smollm2-135m-instruct"
LABELS = ["negative", "neutral", "positive"]
EXAMPLE_FORMAT = "Tweet: {text}\nSentiment (positive, negative or neutral):"  # = datasets_builtin.TWEET_PROMPT


def _opt(args, key):
    value = getattr(args, key, None)
    return DEFAULTS[key] if value is None else value


def write_tweet_texts(out: Path, n_train: int, n_eval: int, seed: int) -> dict[str, Path]:
    """train / eval as {"text": tweet, "label": sentiment} records, from write_tweet_sentiment's prompt/completion
    files (the tweet cut back out of its prompt; checked against the template)."""
    from tokentune.datasets_builtin import TWEET_PROMPT, write_tweet_sentiment

    info = write_tweet_sentiment(out / "pc", n_train=n_train, n_eval=n_eval, seed=seed, fmt="prompt_completion")
    before, after = TWEET_PROMPT.split("{text}")
    paths = {}
    for split in ("train", "eval"):
        rows = []
        for line in Path(info[split]).read_text().splitlines():
            r = json.loads(line)
            text = r["prompt"][len(before):len(r["prompt"]) - len(after)]
            assert TWEET_PROMPT.format(text=text) == r["prompt"]
            rows.append({"text": text, "label": r["completion"].strip()})
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def recipe_section(args) -> dict:
    return {"labels": LABELS, "prompt_length": _opt(args, "prompt_length"), "num_candidates": _opt(args, "candidates"),
            "candidates": "pmi", "samples_per_step": _opt(args, "samples"), "batch_size": _opt(args, "batch"),
            "max_steps": _opt(args, "steps"), "lr": _opt(args, "lr"), "num_demos": _opt(args, "demos"),
            "max_text_words": _opt(args, "max_words"), "relabel_every": _opt(args, "relabel_every"),
            "example_format": EXAMPLE_FORMAT, "score_batch_size": 16,
            "eval_rows": [r for r in _opt(args, "rows").split(",") if r]}


def _pseudo_accuracy(run_dir: Path, train: Path) -> dict:
    gold = [json.loads(line)["label"] for line in train.read_text().splitlines()]
    rows = [json.loads(line) for line in (run_dir / "pseudo_labels.jsonl").read_text().splitlines()]

    def acc(keep):
        picked = [r for r in rows if keep(r)]
        return {"n": len(picked), "accuracy": round(sum(r["label"] == gold[r["index"]] for r in picked)
                                                    / max(len(picked), 1), 4)}

    return {"seed_set": acc(lambda r: r["seed"]), "final_pool": acc(lambda r: r["reliable"]),
            "all": acc(lambda r: True)}


def run(args) -> list[dict]:
    import torch
    import transformers

    from tokentune.config import config_from_dict
    from tokentune.engine.distributed import setup
    from tokentune.registry import get

    seed = _opt(args, "seed")
    env_info = {"torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version(), "threads": torch.get_num_threads(),
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    section = recipe_section(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_tweet_texts(tmp / "data", _opt(args, "n_train"), _opt(args, "n_eval"), seed)
        entry = get("recipe", "black_box_prompt")
        recipe = entry.factory(entry.config_cls.model_validate(section))
        cfg = config_from_dict({"model": {"name": SMOLLM},
                                "data": {"train": str(paths["train"]), "eval": str(paths["eval"])},
                                "train": {"seed": seed, "output_dir": str(tmp / "run")},
                                "log": {"progress": False, "report": False}})
        start = time.time()
        summary = recipe.run(cfg, setup(cfg.train.device))
        seconds = round(time.time() - start, 1)
        pseudo = _pseudo_accuracy(tmp / "run", paths["train"])
    base = {"benchmark": "objectives", "group": "black_box_prompt", "task": "tweet_sentiment (3-way)",
            "model": "SmolLM2-135M-Instruct (black box)", "n_unlabelled": _opt(args, "n_train"),
            "n_eval": summary["eval"]["n"], "seed": seed, "env": env_info, "config": section,
            "learned_prompt": summary["prompt"], "pseudo_label_accuracy": pseudo, "calls": summary["calls"],
            "stage1": summary["stage1"], "steps": summary["training"]["steps"], "seconds": seconds,
            "black_box_seconds": summary["black_box_seconds"]}
    for name in ["zero_shot", "demos_only", "random_prompt_demos", "learned_prompt", "learned_prompt_demos"]:
        if name in summary["eval"]:
            r = summary["eval"][name]
            rows.append({**base, "row": f"bbp_{name}", "accuracy": round(r["accuracy"], 4), "prompt": r["prompt"],
                         "demos": r["demos"], "predicted_class_counts": r["predicted_class_counts"]})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for key, value in DEFAULTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=None)
    parser.add_argument("--out", default=None, help="append the JSON lines here too")
    parser.add_argument("--write-data", default=None, metavar="DIR", help="only write the text + label files")
    args = parser.parse_args(argv)
    if args.write_data:
        paths = write_tweet_texts(Path(args.write_data), _opt(args, "n_train"), _opt(args, "n_eval"),
                                  _opt(args, "seed"))
        print(json.dumps({k: str(v) for k, v in paths.items()}))
        return
    for row in run(args):
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(line + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    main()
