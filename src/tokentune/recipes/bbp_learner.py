"""Unsupervised black-box prompt learning (v1, shared/methods/black-box-prompt.md) over a `BlackBox`:

Stage 1  every unlabelled text is labelled by the black box alone (no prompt, no demonstrations); the confident ones
         form the reliable seed set, the first pseudo-labelled pool.
Stage 2  each step takes a batch of pool texts, draws k demonstrations per text from the pool (once: the I prompt
         samples share them, so their losses differ by the prompt only), samples I prompts z ~ P(z), scores each
         (prompt + demonstrations + text) and takes the loss against the pseudo-labels: batch x I calls. p moves by
         the variance-reduced score-function estimator, AdamW, clipping and the simplex projection.
Stage 3  every `relabel_every` steps, and once at the end, the current argmax prompt + demonstrations re-label the
         texts; the confident ones form the new pool.

The learner only calls `black_box.label_scores`; labelled data reach it only in `evaluate`, after learning.
"""

from __future__ import annotations

import math
import random
import time

import torch
import torch.nn.functional as F

from ..errors import TokentuneError
from .bbp_config import BlackBoxPromptConfig
from .bbp_prompt import PromptDistribution, PromptOptimizer
from .bbp_pseudo import PseudoLabels, confidence, select_reliable
from .bbp_queries import DemoSampler, QueryBuilder


def prompt_loss(scores: torch.Tensor, targets: torch.Tensor, kind: str = "ce", margin: float = 1.0) -> torch.Tensor:
    """Mean loss of [B, C] label scores against pseudo-labels: cross-entropy over the classes, or the hinge
    max(0, margin - (s_y - max_{j != y} s_j)). (BDPL's MarginLoss, relu(d + m) - m with d = s_y - max_j s_j, falls
    as the true class loses, an adversarial-attack form; the hinge here has the learning sign.)"""
    scores = scores.double()
    if kind == "ce":
        return F.cross_entropy(scores, targets)
    true = scores.gather(1, targets[:, None])[:, 0]
    others = scores.scatter(1, targets[:, None], float("-inf")).amax(1)
    return torch.relu(margin - (true - others)).mean()


class PromptLearner:
    def __init__(self, black_box, texts: list[str], rc: BlackBoxPromptConfig, candidates: list[str], *,
                 seed: int = 0, log=None):
        if not texts:
            raise TokentuneError("no unlabelled texts to learn from", where="data.train")
        self.bb, self.texts, self.rc, self.seed = black_box, texts, rc, seed
        self.log = log or (lambda text: None)
        self.sampler = DemoSampler(rc.num_demos, rc.demo_selection)
        self.builder = QueryBuilder(rc.query_format(), self.sampler, texts, rc.words)
        self.dist = PromptDistribution(candidates, rc.prompt_length)
        self.optimizer = PromptOptimizer(self.dist, lr=rc.lr, weight_decay=rc.weight_decay, betas=rc.betas,
                                         max_grad_norm=rc.max_grad_norm, bdpl_compat=rc.bdpl_compat)
        self.state = PseudoLabels(len(texts))
        self.rng = random.Random(seed)  # batch order and demonstrations of training and re-labelling
        self.generator = torch.Generator().manual_seed(seed)  # prompt samples
        self.calls = {"stage1": 0, "train": 0, "relabel": 0, "eval": 0}
        self.seconds = dict.fromkeys(self.calls, 0.0)  # time inside the black box, per phase
        self.history: list[dict] = []
        self.relabels: list[dict] = []
        self._order: list[int] = []

    # --- the black box -------------------------------------------------------------------------------------------
    def _scores(self, queries: list[str], phase: str) -> torch.Tensor:
        before, clock = self.bb.calls, time.time()
        scores = torch.as_tensor(self.bb.label_scores(queries, self.builder.label_strings)).detach().float().cpu()
        self.seconds[phase] += time.time() - clock
        if scores.shape != (len(queries), len(self.rc.labels)):
            raise TokentuneError(f"the black box returned scores of shape {tuple(scores.shape)}, expected "
                                 f"{(len(queries), len(self.rc.labels))}", where="black box")
        self.calls[phase] += self.bb.calls - before
        return scores

    def _label(self, indices: list[int], prompt: str, phase: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(confidence, prediction) of texts[indices] under prompt + demonstrations (none in stage 1)."""
        with_demos = phase != "stage1"
        queries = [self.builder.query(prompt, self.texts[i], self.builder.demos(self.rng, exclude=i)
                                      if with_demos else []) for i in indices]
        return confidence(self._scores(queries, phase), self.rc.confidence)

    def _admit(self, conf, pred) -> torch.Tensor:
        return select_reliable(conf, pred, threshold=self.rc.confidence_threshold,
                               per_class_fraction=self.rc.per_class_fraction)

    def _set_pool(self) -> None:
        pool = self.state.pool()
        self.sampler.set_pool(pool, self.state.label[pool].tolist())
        self._order = []

    # --- stages --------------------------------------------------------------------------------------------------
    def stage1(self) -> dict:
        everyone = list(range(len(self.texts)))
        conf, pred = self._label(everyone, "", "stage1")
        admitted = self._admit(conf, pred)
        s = self.state
        s.label[:], s.conf[:], s.seed[:], s.reliable[:] = pred, conf, admitted, admitted
        if not admitted.any():
            raise TokentuneError("stage 1 admitted no example to the reliable set",
                                 where="recipe.confidence_threshold", fix="lower confidence_threshold")
        self._set_pool()
        info = {"seed_size": int(admitted.sum()), "seed_class_counts": s.counts(len(self.rc.labels)),
                "predicted_class_counts": torch.bincount(pred, minlength=len(self.rc.labels)).tolist(),
                "mean_confidence": float(conf.mean()), "calls": self.calls["stage1"]}
        self.log(f"stage 1: {info['seed_size']} of {len(self.texts)} texts in the seed set "
                 f"(per class {info['seed_class_counts']})")
        return info

    def relabel(self, prompt: str, step: int) -> dict:
        s = self.state
        scope = [i for i in range(len(self.texts)) if self.rc.relabel_scope == "all" or not s.seed[i]]
        info = {"step": step, "prompt": prompt, "relabelled": len(scope)}
        if scope:
            conf, pred = self._label(scope, prompt, "relabel")
            admitted = self._admit(conf, pred)
            index = torch.tensor(scope)
            changed = int((s.label[index] != pred).sum())
            s.label[index], s.conf[index], s.reliable[index] = pred, conf, admitted
            info["changed"] = changed
        info.update(pool_size=len(s.pool()), pool_class_counts=s.counts(len(self.rc.labels)))
        self._set_pool()
        self.relabels.append(info)
        self.log(f"re-labelled at step {step}: pool {info['pool_size']} (per class {info['pool_class_counts']})")
        return info

    def _batch(self, size: int) -> list[int]:
        out = []
        while len(out) < size:
            if not self._order:
                self._order = self.rng.sample(self.sampler.pool, len(self.sampler.pool))
            out.append(self._order.pop())
        return out

    def step(self, batch_size: int) -> dict:
        """One Stage-2 update on `batch_size` pool texts: batch x I black-box calls."""
        rc, s = self.rc, self.state
        batch = self._batch(batch_size)
        targets = s.label[batch]
        demos = [self.builder.demos(self.rng, exclude=i) for i in batch]
        samples = self.dist.sample(rc.samples_per_step, self.generator)
        losses = []
        for z in samples:
            prompt = self.dist.text(z)
            queries = [self.builder.query(prompt, self.texts[i], d) for i, d in zip(batch, demos)]
            losses.append(prompt_loss(self._scores(queries, "train"), targets, rc.loss, rc.margin))
        losses = torch.stack(losses)
        info = self.optimizer.step(samples, losses)
        p = self.dist.probs.detach()
        entropy = -(p.clamp_min(1e-12).log() * p).sum(-1).mean()
        row = {"step": len(self.history) + 1, "loss": float(losses.mean()), "loss_std": float(losses.std()),
               "grad_norm": info["grad_norm"], "max_prob": float(p.max(-1).values.mean()),
               "entropy": float(entropy), "calls": self.calls["train"]}
        self.history.append(row)
        return row

    def train(self) -> dict:
        """Stage 2 with Stage 3 alternated; ends with the final re-labelling under the argmax prompt."""
        rc = self.rc
        seed_pool = len(self.sampler.pool)
        batch = min(rc.batch_size, seed_pool)
        per_epoch = math.ceil(seed_pool / batch)
        total = rc.max_steps or math.ceil(rc.epochs * seed_pool / batch)
        every = per_epoch if rc.relabel_every == "epoch" else rc.relabel_every
        stopped, clock = None, time.time()
        for step in range(1, total + 1):
            if rc.max_calls is not None and self.calls["train"] + batch * rc.samples_per_step > rc.max_calls:
                stopped = "max_calls"
                break
            row = self.step(batch)
            if step == 1 or step % max(1, total // 10) == 0:
                self.log(f"step {step}/{total}: loss {row['loss']:.4f}, mean max p {row['max_prob']:.3f}")
            if every and step % every == 0 and step < total:
                self.relabel(self.prompt(), step)
        final = self.relabel(self.prompt(), len(self.history))
        return {"steps": len(self.history), "planned_steps": total, "batch_size": batch, "steps_per_epoch": per_epoch,
                "relabel_every": every, "stopped": stopped, "train_seconds": round(time.time() - clock, 2),
                "final_pool_size": final["pool_size"]}

    def prompt(self) -> str:
        """The method's output prompt: the most probable candidate at every position."""
        return self.dist.text(self.dist.argmax())

    # --- prediction ----------------------------------------------------------------------------------------------
    def predict(self, texts: list[str], prompt: str, *, demos: bool, phase: str = "eval") -> torch.Tensor:
        """[N] predicted class ids for new texts, assembled as in training: prompt + k demonstrations from the final
        pool (the same sampler; a per-text seeded draw, so every row of an evaluation sees the same demonstrations)
        + the text."""
        queries = []
        for n, text in enumerate(texts):
            shots = self.builder.demos(random.Random((self.seed + 1) * 1_000_003 + n)) if demos else []
            queries.append(self.builder.query(prompt, text, shots))
        return self._scores(queries, phase).argmax(-1)

    def evaluate(self, texts: list[str], gold: list[int], rows: list[str]) -> dict:
        """Accuracy on labelled texts (the labels are read here only, after learning) for the learned prompt +
        demonstrations and each extra row of `rows`."""
        gold_t = torch.tensor(gold)
        uniform = PromptDistribution(self.dist.candidates, self.dist.length)
        random_prompt = uniform.text(uniform.sample(1, torch.Generator().manual_seed(self.seed + 7))[0])
        settings = {"learned_prompt_demos": (self.prompt(), True), "zero_shot": ("", False),
                    "demos_only": ("", True), "random_prompt_demos": (random_prompt, True),
                    "learned_prompt": (self.prompt(), False)}
        out = {}
        for name in ["learned_prompt_demos", *rows]:
            prompt, demos = settings[name]
            pred = self.predict(texts, prompt, demos=demos)
            out[name] = {"accuracy": float((pred == gold_t).double().mean()), "prompt": prompt,
                         "demos": self.rc.num_demos if demos else 0,
                         "predicted_class_counts": torch.bincount(pred, minlength=len(self.rc.labels)).tolist()}
        return out
