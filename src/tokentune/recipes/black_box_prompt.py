"""Unsupervised prompt learning for classification with a black-box LM (Zhang et al. 2024, arXiv 2410.03124 v1;
shared/methods/black-box-prompt.md): a discrete prompt (m categorical distributions over candidate n-grams, learned
by BDPL's variance-reduced policy gradient) and pseudo-labels for unlabelled texts, with pseudo-labelled in-context
demonstrations used in training exactly as at prediction. The model is reached only through label scores
(bbp_blackbox.BlackBox); here a local causal LM plays the black box, under torch.no_grad.

Reads the run config's model (the black box), data.train (unlabelled texts: only the text column is read, any
label there is ignored), data.eval (optional text + label records: accuracy only, after learning), train.seed,
train.output_dir and train.device. Writes to train.output_dir: prompt.json (argmax prompt, p, candidates),
pseudo_labels.jsonl (every text with its pseudo-label, confidence, seed and reliable flags; written atomically),
history.jsonl (per-step loss and concentration) and, through the CLI, recipe_summary.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import TokentuneError
from ..registry import register
from .bbp_config import BlackBoxPromptConfig

TRAIN_KEYS = {"seed", "output_dir", "device"}
DATA_KEYS = {"train", "eval", "fields", "encoding", "max_records", "format"}


def check_base(cfg) -> None:
    """Keys of the run config this recipe would otherwise ignore are refused."""
    from .promot import refuse_base_sections

    if cfg.model.task != "causal":
        raise TokentuneError("the black box scores label words with a causal LM", where="model.task",
                             fix="remove model.task (causal)")
    refuse_base_sections(cfg, "black_box_prompt", {"adapter": "the model is never trained (a black box)",
                                                   "objective": "the loss is recipe.loss"})
    if "eval" in cfg.model_fields_set:
        raise TokentuneError("the recipe evaluates on data.eval itself; the eval section would be ignored",
                             where="eval", fix="remove it; see recipe.eval_rows and recipe.eval_max_examples")
    for key in sorted(cfg.train.model_fields_set - TRAIN_KEYS):
        raise TokentuneError(f"train.{key} would be ignored: the prompt's optimisation is set in the recipe section",
                             where=f"train.{key}", fix="remove it (see recipe.lr, batch_size, max_steps, ...)")
    for key in sorted(cfg.data.model_fields_set - DATA_KEYS):
        raise TokentuneError(f"data.{key} would be ignored by the black_box_prompt recipe", where=f"data.{key}",
                             fix="remove it (texts can be cut with recipe.max_text_words)")
    if cfg.data.format not in ("auto", "text", "classification"):
        raise TokentuneError("the recipe reads texts (and eval labels) from text / text + label records",
                             where="data.format", fix="remove data.format, or map columns with data.fields")


def read_texts(path: str, cfg, *, key: str, with_labels: bool, limit: int | None = None):
    """Texts of `path` (data.fields may map `text` and `label`); labels only when asked (the eval file)."""
    from ..data.formats import column
    from ..data.labels import normalise_label
    from ..data.readers import read_records

    fields = cfg.data.fields
    records = read_records(path, encoding=cfg.data.encoding, key=key, limit=limit)
    texts, labels = [], []
    for r in records:
        col = column("text", fields, r.data)
        value = r.data.get(col)
        if not isinstance(value, str) or not value.strip():
            raise TokentuneError(f"record has no text in field {col!r}", where=r.source,
                                 fix="map the text column with data.fields: {text: COLUMN}")
        texts.append(value)
        if with_labels:
            lcol = column("label", fields, r.data)
            if lcol not in r.data:
                raise TokentuneError(f"eval record has no label field {lcol!r}", where=r.source,
                                     fix="map it with data.fields: {label: COLUMN}")
            labels.append(str(normalise_label(r.data[lcol], source=r.source, column=lcol)))
    return texts, labels


def write_outputs(out: Path, learner, texts: list[str]) -> dict:
    from ..engine.atomic import atomic_write_text

    rc, s = learner.rc, learner.state
    rows = [{"index": i, "text": t, "label": rc.labels[int(s.label[i])], "confidence": round(float(s.conf[i]), 6),
             "reliable": bool(s.reliable[i]), "seed": bool(s.seed[i])} for i, t in enumerate(texts)]
    atomic_write_text(out / "pseudo_labels.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    prompt = {"prompt": learner.prompt(), "tokens": [learner.dist.candidates[int(j)] for j in learner.dist.argmax()],
              "candidates": learner.dist.candidates, "probs": learner.dist.probs.detach().tolist(),
              "format": rc.query_format().__dict__, "label_words": dict(zip(rc.labels, rc.words))}
    atomic_write_text(out / "prompt.json", json.dumps(prompt, indent=1))
    atomic_write_text(out / "history.jsonl", "".join(json.dumps(h) + "\n" for h in learner.history))
    return {"pseudo_labels": str(out / "pseudo_labels.jsonl"), "prompt": str(out / "prompt.json")}


def _say(env, text: str) -> None:
    if env.is_main:
        from ..engine.logging import console

        console.print(f"[bold]black_box_prompt[/] {text}")


@register("recipe", "black_box_prompt", config=BlackBoxPromptConfig,
          description="unsupervised discrete prompt + pseudo-labels + demonstrations for a black-box LM (scores only)")
class BlackBoxPrompt:
    name = "black_box_prompt"

    def __init__(self, config: BlackBoxPromptConfig):
        self.config = config

    def run(self, cfg, env, *, black_box=None) -> dict:
        """`black_box`: any BlackBox (e.g. a remote API client); None = the run config's model, loaded locally."""
        from .bbp_blackbox import LocalCausalLM
        from .bbp_candidates import build_candidates
        from .bbp_learner import PromptLearner

        rc = self.config
        check_base(cfg)
        if env.world_size > 1:
            raise TokentuneError("black_box_prompt runs in one process (the black box is queried, not trained)",
                                 fix="run it without torchrun")
        clock = time.time()
        texts, _ = read_texts(cfg.data.train, cfg, key="data.train", with_labels=False, limit=cfg.data.max_records)
        if black_box is None:
            black_box = LocalCausalLM.from_config(cfg.model, device=env.device, batch_size=rc.score_batch_size,
                                                  reduce=rc.label_score)
        candidates = build_candidates(rc.candidates, texts, rc.num_candidates, given=rc.candidate_list,
                                      black_box=black_box, seed=cfg.train.seed, pmi=rc.pmi.model_dump())
        learner = PromptLearner(black_box, texts, rc, candidates, seed=cfg.train.seed, log=lambda t: _say(env, t))
        summary: dict = {"recipe": "black_box_prompt", "model": cfg.model.name, "n_unlabelled": len(texts),
                         "labels": rc.labels, "label_words": rc.words, "candidates": candidates}
        summary["stage1"] = learner.stage1()
        summary["training"] = learner.train()
        summary["relabels"] = learner.relabels
        summary["prompt"] = learner.prompt()
        summary["prompt_distribution"] = learner.dist.summary()
        summary["pseudo_labels"] = {"reliable": len(learner.state.pool()),
                                    "class_counts": learner.state.counts(len(rc.labels))}
        summary["outputs"] = write_outputs(Path(cfg.train.output_dir), learner, texts)
        summary["eval"] = None
        if cfg.data.eval is not None:
            eval_texts, eval_labels = read_texts(cfg.data.eval, cfg, key="data.eval", with_labels=True,
                                                 limit=rc.eval_max_examples)
            unknown = sorted(set(eval_labels) - set(rc.labels))
            if unknown:
                raise TokentuneError(f"eval labels {unknown} are not among recipe.labels {rc.labels}",
                                     where="data.eval", fix="list every class in recipe.labels")
            gold = [rc.labels.index(label) for label in eval_labels]
            summary["eval"] = {"n": len(gold), **learner.evaluate(eval_texts, gold, rc.eval_rows)}
            _say(env, "eval accuracy: " + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in summary["eval"].items()
                                                   if isinstance(v, dict)))
        summary["calls"] = dict(learner.calls, total=black_box.calls)
        summary["black_box_seconds"] = {k: round(v, 2) for k, v in learner.seconds.items()}
        summary["seconds"] = round(time.time() - clock, 1)
        return summary
