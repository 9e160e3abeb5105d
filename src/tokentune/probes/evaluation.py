"""Evaluation: loss and perplexity (teacher-forced), and the task metric — exact-match accuracy of
greedy generations against references (causal), or classification accuracy (encoders)."""

from __future__ import annotations

import math
import re

import torch

from ..registry import register
from .generation import generate_ids


def normalise(text: str) -> str:
    """Exact match ignores case, surrounding whitespace and runs of whitespace."""
    return re.sub(r"\s+", " ", text).strip().lower()


@torch.no_grad()
def loss_metrics(model, view, objective, batches, *, chunk_size: int, autocast, adapter=None) -> dict[str, float]:
    from ..adapters.base import batch_scope

    was_training = model.training
    model.eval()
    total, weight, classes = 0.0, 0.0, False
    sums: dict = {}  # the objective's metrics summed over batches (counts: floats or per-label tensors)
    for batch in batches:
        with autocast(), batch_scope(adapter, batch):
            out = objective(model, view, batch, chunk_size=chunk_size)
        total += float(out.loss_sum)
        weight += float(out.weight_sum)
        classes = classes or "class_labels" in batch
        for key, value in out.metrics.items():
            sums[key] = sums.get(key, 0.0) + value
    model.train(was_training)
    if weight == 0:
        return {}
    loss = total / weight
    summarise = getattr(objective, "eval_metrics", None)  # an objective's own metrics (multi-label F1)
    extra = summarise(sums) if summarise is not None else {}
    # a class loss, or a sequence-level loss (DPO: `perplexity = False`), is no language-model loss: no perplexity
    if view.is_encoder or classes or not getattr(objective, "perplexity", True):
        result = {"eval/loss": loss}
        if "correct" in sums:
            result["eval/accuracy"] = float(sums["correct"]) / weight
        return {**result, **extra}
    return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0)), **extra}


def exact_match(model, tokenizer, examples, *, max_new_tokens: int, batch_size: int) -> tuple[dict, list[dict]]:
    usable = [e for e in examples if e.prompt_ids is not None and e.reference is not None]
    if not usable:
        return {}, []
    outputs = generate_ids(model, tokenizer, [e.prompt_ids for e in usable], max_new_tokens=max_new_tokens,
                           batch_size=batch_size)
    samples, hits = [], 0
    for ex, ids in zip(usable, outputs):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        ok = normalise(text) == normalise(ex.reference)
        hits += ok
        samples.append({"source": ex.source, "reference": ex.reference, "generated": text, "match": ok})
    return {"eval/exact_match": hits / len(usable)}, samples


@register("probe", "evaluation", config=None,
          description="Loss, perplexity and the task metric (exact match of greedy generations / class accuracy)")
class Evaluation:
    """The evaluation run by the trainer (eval.at_start / eval_every / at_end) and `tokentune eval`."""

    name = "evaluation"

    def __init__(self, config):
        self.config = config  # config.EvalConfig

    def run(self, session, examples, *, samples_out: list | None = None) -> dict:
        cfg = self.config
        if cfg.max_examples:
            examples = examples[:cfg.max_examples]
        result = loss_metrics(session.model, session.view, session.objective, session.eval_batches(examples),
                              chunk_size=session.cfg.train.loss_chunk_size, autocast=session.autocast,
                              adapter=session.adapter)
        generate = cfg.generate
        if generate is None:
            generate = session.view.is_causal and any(e.reference is not None for e in examples)
        if generate:
            with session.autocast():
                metrics, samples = exact_match(session.model, session.tokenizer, examples,
                                               max_new_tokens=cfg.max_new_tokens,
                                               batch_size=cfg.batch_size or 16)
            result.update(metrics)
            if samples_out is not None:
                samples_out.extend(samples)
        return result
