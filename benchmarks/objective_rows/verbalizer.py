"""Verbalizer (SciPrompt) on BBC News topics, few-shot: 16 training articles per class, accuracy on held-out articles.

Rows (same data, same article truncation, same seed):
  verbalizer_names_zero_shot   SmolLM2-135M-Instruct, class names as the only terms, no calibration (a manual
                               verbalizer: the plain zero-shot baseline)
  verbalizer_zero_shot         knowledge terms with bi-encoder weights + support calibration + candidate cut-off
  verbalizer_lora              the same, trained with LoRA (r 16, every projection) and trainable term weights
  ce_label_word_lora           baseline: LoRA + cross_entropy on " <label>" after the same prompt; scored by greedy
                               exact match and by the argmax over the class names' likelihood
  minilm_head_full             baseline: MiniLM-L6 fully fine-tuned with a classification head

Knowledge terms: SciPrompt retrieves related words from web APIs (not reachable offline) and filters them with a
SciNLI bi-encoder and a cross-encoder (checkpoints not public). Here the candidate terms are written by hand
(TERMS) and only the bi-encoder step is reproduced, with all-MiniLM-L6-v2 (a sentence bi-encoder): sentences
"This news article is related to <term>." vs the class sentence, keep cosine > 0.5, weight = min(cosine, 1).

  python benchmarks/objective_rows/verbalizer.py                      # full: 200 held-out, 60 LoRA steps
  python benchmarks/objective_rows/verbalizer.py --n-eval 60 --steps 10 --max-words 48   # reduced (CPU)

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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULTS = {"per_class": 16, "n_eval": 200, "steps": 60, "minilm_steps": 50, "max_words": 96, "seed": 0,
            "lr": 5e-4, "rows": "names_zero_shot,zero_shot,lora,ce,minilm"}
SMOLLM = "builtin:smollm2-135m-instruct"
TEMPLATE = "Article: {text}\nTopic:{mask}"
TERMS = {"business": ["economy", "finance", "market", "company", "trade"],
         "entertainment": ["film", "music", "movie", "cinema", "television", "celebrity"],
         "politics": ["government", "election", "parliament", "minister", "policy"],
         "sports": ["sport", "football", "match", "athletics", "tennis"],
         "tech": ["technology", "computer", "internet", "software", "digital"]}
WRAP = "This news article is related to {}."
LORA = {"name": "lora", "r": 16, "alpha": 32, "targets": ["q", "k", "v", "o", "gate", "up", "down"]}


def _opt(args, key):
    value = getattr(args, key, None)
    return DEFAULTS[key] if value is None else value


def write_data(out: Path, per_class: int, n_eval: int, max_words: int, seed: int) -> dict[str, Path]:
    """train (per_class articles of each topic) / eval JSONL, articles cut to their first max_words words."""
    from tokentune.datasets_builtin import write_bbc_news

    write_bbc_news(out / "pool", n_train=600, n_eval=n_eval, seed=seed)
    cut = lambda r: {"text": " ".join(r["text"].split()[:max_words]), "label": r["label"]}  # noqa: E731
    pool = [json.loads(line) for line in (out / "pool" / "train.jsonl").read_text().splitlines()]
    held = [cut(json.loads(line)) for line in (out / "pool" / "eval.jsonl").read_text().splitlines()]
    random.Random(seed).shuffle(pool)
    train = []
    for label in sorted({r["label"] for r in pool}):
        train += [cut(r) for r in pool if r["label"] == label][:per_class]
    random.Random(seed + 1).shuffle(train)
    paths = {"train": out / "train.jsonl", "eval": out / "eval.jsonl",
             "train_pc": out / "train_pc.jsonl", "eval_pc": out / "eval_pc.jsonl"}
    for name, rows in (("train", train), ("eval", held)):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
        prompt = TEMPLATE.removesuffix("{mask}")  # the same prompt for the label-word cross-entropy baseline
        paths[name + "_pc"].write_text("".join(json.dumps({"prompt": prompt.replace("{text}", r["text"]),
                                                           "completion": " " + r["label"]}) + "\n" for r in rows))
    return paths


def knowledge_terms(threshold: float = 0.5) -> dict[str, dict[str, float]]:
    """{label: {term: weight}}: the bi-encoder step of SciPrompt's filter with all-MiniLM-L6-v2 (mean pooling)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from tokentune.models.builtin import resolve_builtin

    ref = str(resolve_builtin("minilm-l6"))
    tok, model = AutoTokenizer.from_pretrained(ref), AutoModel.from_pretrained(ref, use_safetensors=True).eval()

    def embed(words):
        enc = tok([WRAP.format(w) for w in words], padding=True, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    out = {}
    for label, terms in TERMS.items():
        sims = (embed(terms) @ embed([label])[0]).tolist()
        out[label] = {t: round(min(s, 1.0), 4) for t, s in zip(terms, sims) if s > threshold}
    return out


def _config(paths, out_dir: Path, **sections) -> "object":
    from tokentune.config import config_from_dict

    tree = {"model": {"name": SMOLLM}, "data": {"train": str(paths["train"]), "eval": str(paths["eval"]),
                                                "max_length": 256},
            "adapter": LORA, "objective": {"name": "cross_entropy"},
            "train": {"max_steps": 10, "batch_size": 8, "lr": 5e-4, "seed": 0, "warmup_ratio": 0.1,
                      "schedule": "cosine", "output_dir": str(out_dir)},
            "eval": {"at_start": False, "at_end": True, "batch_size": 8}, "log": {"progress": False, "report": False}}
    for key, value in sections.items():  # an adapter section replaces the LoRA one: its keys are its own
        tree[key] = dict(value) if key == "adapter" else {**tree.get(key, {}), **value}
    return config_from_dict(tree)


def _zero_shot(cfg) -> dict:
    from tokentune.engine.distributed import setup
    from tokentune.engine.session import build_session
    from tokentune.probes.evaluation import Evaluation

    start = time.time()
    session = build_session(cfg, setup(cfg.train.device))
    kept = session.objective.kept
    result = Evaluation(cfg.eval).run(session, session.splits.eval)
    return {"accuracy": result.get("eval/accuracy"), "eval_loss": result.get("eval/loss"),
            "terms_kept": int(kept.sum()) if kept is not None else None, "seconds": round(time.time() - start, 1)}


def _train(cfg) -> tuple[dict, object]:
    from tokentune.engine.distributed import setup
    from tokentune.engine.session import build_session
    from tokentune.engine.trainer import Trainer

    start = time.time()
    session = build_session(cfg, setup(cfg.train.device))
    summary = Trainer(session).train()
    return {"train_seconds": summary["train_seconds"], "final_train_loss": summary["final_loss"],
            "steps": summary["steps"], "trainable_params": summary["trainable_params"], "after": summary["after"],
            "seconds": round(time.time() - start, 1)}, session


def _label_word_accuracy(session, paths) -> float:
    """The cross-entropy run scored as a verbalizer: argmax over the class names' likelihood after the prompt."""
    from tokentune.data.collate import collate
    from tokentune.objectives.verbalizer import Verbalizer, VerbalizerConfig

    rows = [json.loads(line) for line in paths["eval"].read_text().splitlines()]
    names = sorted({r["label"] for r in rows})
    v = Verbalizer(VerbalizerConfig(template=TEMPLATE, calibration="none"))
    v.set_labels(names, session.tokenizer)
    v.max_length = 256
    v.attach(session.model, session.view)
    hits = 0
    for s in range(0, len(rows), 8):
        chunk = [v.encode(r["text"], class_label=names.index(r["label"]), index=i) for i, r in enumerate(rows[s:s + 8])]
        batch = collate(chunk, session.tokenizer.pad_token_id, packed=False)  # the run packs; scoring does not
        batch = {k: t.to(session.device) for k, t in batch.items()}
        with session.autocast():
            hits += int((v.predict(session.model, session.view, batch) == batch["class_labels"]).sum())
    return hits / len(rows)


class _Rows(list):
    """Rows as they finish, printed to stdout at once (benchmarks/objectives.py keeps them even if a later row fails)."""

    def append(self, row: dict) -> None:
        super().append(row)
        print(json.dumps(row), flush=True)


def run(args) -> list[dict]:
    import torch
    import transformers

    per_class, n_eval, steps, seed = _opt(args, "per_class"), _opt(args, "n_eval"), _opt(args, "steps"), _opt(args, "seed")
    wanted = set(_opt(args, "rows").split(","))
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    base = {"benchmark": "objectives", "group": "verbalizer", "task": f"bbc_news {per_class}/class",
            "n_train": 5 * per_class, "n_eval": n_eval, "max_words": _opt(args, "max_words"), "seed": seed, "env": env}
    rows = _Rows()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_data(tmp / "data", per_class, n_eval, _opt(args, "max_words"), seed)
        terms = knowledge_terms()
        verbalizer = {"name": "verbalizer", "template": TEMPLATE, "label_words": terms}
        if "names_zero_shot" in wanted:
            cfg = _config(paths, tmp / "r0", objective={"name": "verbalizer", "template": TEMPLATE,
                                                        "calibration": "none"})
            rows.append({**base, "row": "verbalizer_names_zero_shot", "model": "SmolLM2-135M-Instruct",
                         "config": cfg.objective.model_dump(), **_zero_shot(cfg)})
        if "zero_shot" in wanted:
            cfg = _config(paths, tmp / "r1", objective=verbalizer)
            rows.append({**base, "row": "verbalizer_zero_shot", "model": "SmolLM2-135M-Instruct",
                         "config": cfg.objective.model_dump(), **_zero_shot(cfg)})
        if "lora" in wanted:
            cfg = _config(paths, tmp / "r2", objective=verbalizer,
                          train={"max_steps": steps, "lr": _opt(args, "lr"), "seed": seed})
            result, _ = _train(cfg)
            rows.append({**base, "row": "verbalizer_lora", "model": "SmolLM2-135M-Instruct", "adapter": LORA,
                         "config": cfg.objective.model_dump(), "accuracy": result["after"].get("eval/accuracy"),
                         **result})
        if "ce" in wanted:
            cfg = _config({"train": paths["train_pc"], "eval": paths["eval_pc"]}, tmp / "r3",
                          data={"max_length": 256, "truncation_side": "left"},
                          train={"max_steps": steps, "lr": _opt(args, "lr"), "seed": seed},
                          eval={"generate": True, "max_new_tokens": 3})
            result, session = _train(cfg)
            rows.append({**base, "row": "ce_label_word_lora", "model": "SmolLM2-135M-Instruct", "adapter": LORA,
                         "config": {"name": "cross_entropy"}, "accuracy": result["after"].get("eval/exact_match"),
                         "label_word_argmax_accuracy": _label_word_accuracy(session, paths), **result})
        if "minilm" in wanted:
            cfg = _config(paths, tmp / "r4", model={"name": "builtin:minilm-l6", "task": "classification"},
                          data={"max_length": 256}, adapter={"name": "full"},
                          train={"max_steps": _opt(args, "minilm_steps"), "batch_size": 16, "lr": 1e-4, "seed": seed,
                                 "warmup_ratio": 0.0})
            result, _ = _train(cfg)
            rows.append({**base, "row": "minilm_head_full", "model": "all-MiniLM-L6-v2", "adapter": {"name": "full"},
                         "config": {"name": "cross_entropy"}, "accuracy": result["after"].get("eval/accuracy"),
                         **result})
    return list(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for key, value in DEFAULTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=None)
    parser.add_argument("--out", default=None, help="append the JSON lines here too")
    args = parser.parse_args(argv)
    for row in run(args):  # already printed as it finished
        line = json.dumps(row)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(line + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    main()
