"""Verbalizer: classification by label-term likelihood with weighted, knowledge-augmented terms and contextual
calibration (SciPrompt, You et al. EMNLP 2024; shared/methods/sciprompt.md). The maths is in verbalizer_terms.py.

Each text + label record is put into a template. A masked LM scores every label term at the template's [MASK]
(mean, or sum, of its sub-tokens' log-probabilities there, as the code's "mean" multi-token handler); a causal LM
scores a term as the continuation of the prompt (sum, or mean, of its tokens' log-probabilities). The LM head is
applied only at those positions, in chunks. A term made of several tokens costs a causal model one more row per
record: the prompt followed by that term. The loss is cross-entropy over the aggregated class scores; the
predicted class is their argmax (zero-shot: with the initial weights and the calibration).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import TokentuneError
from ..registry import register
from .base import ObjectiveOutput, backbone_hidden
from .chunked import chunked_token_loss
from .verbalizer_terms import LabelTerms, aggregate, cut_terms, record_texts, templated_ids, word_log_probs

DEFAULT_TEMPLATES = {"masked": "The field of this study is related to: {mask}. {text}",  # the arXiv script's
                     "causal": "{text}\nThe field of this study is related to:{mask}"}  # same words, term last
STATE_FILE, TERMS_FILE = "verbalizer.safetensors", "verbalizer_terms.json"


class VerbalizerConfig(BaseModel):
    """label_words        {label: [term, ...]} (weight 1 each) or {label: {term: weight}}: the knowledge-augmented
                          terms with their correlation weights (SciPrompt retrieves and filters them offline)
    include_label_name   add each class's own name as a term of weight 1 (unless listed)
    term_prefix          put before every term when tokenising it (a leading space, as the code's prefix)
    template             with {text} and {mask} once each; a causal template must end in {mask}; None: the
                          arXiv script's template (masked), or its words with the term at the end (causal)
    multi_token          a term's score from its tokens' log-probs; None: mean for masked, sum for causal LMs
    calibration          support: mean term scores over the training records (the code); content_free: over
                          `content_free_inputs` in the template (Zhao et al. 2021); none
    candidate_frac       drop terms whose tokens are in this bottom fraction of the vocabulary by calibration logits
    pred_temp            evaluation multiplies the weights by this before the per-class softmax (training: 1)
    train_weights        the term weights are trained parameters (the code); false keeps them as given
    weights_lr           their learning rate (None: the run's train.lr)"""

    model_config = ConfigDict(extra="forbid")
    name: Literal["verbalizer"] = "verbalizer"
    label_words: dict[str | int, list[str] | dict[str, float]] | None = None
    include_label_name: bool = True
    term_prefix: str = " "
    template: str | None = None
    multi_token: Literal["mean", "sum"] | None = None
    calibration: Literal["support", "content_free", "none"] = "support"
    content_free_inputs: list[str] = Field(default_factory=lambda: ["N/A", ""], min_length=1)
    calibration_max_examples: int | None = Field(None, ge=1, description="None: every training record")
    candidate_frac: float = Field(0.5, ge=0, lt=1)
    pred_temp: float = Field(1.0, gt=0)
    train_weights: bool = True
    weights_lr: float | None = Field(None, gt=0)

    @field_validator("template")
    @classmethod
    def _placeholders(cls, value: str | None) -> str | None:
        if value is not None and (value.count("{text}") != 1 or value.count("{mask}") != 1):
            raise ValueError("the template needs {text} and {mask} exactly once each")
        return value


@register("objective", "verbalizer", config=VerbalizerConfig,
          description="label-word likelihood classifier (SciPrompt): weighted knowledge terms, calibration; causal/MLM")
class Verbalizer:
    name = "verbalizer"
    reads_class_labels = True  # the session reads text + label records for it, whatever model.task says

    def __init__(self, config: VerbalizerConfig | None = None):
        self.config = config or VerbalizerConfig()
        self.terms: LabelTerms | None = None
        self.kind: str | None = None  # "causal" | "masked", from the model
        self.weights: torch.nn.Parameter | None = None  # [N] raw term weights theta
        self.kept: torch.Tensor | None = None  # [N] bool: terms left after the calibration cut-off
        self.calibration: torch.Tensor | None = None  # [N] mean term scores on the calibration inputs
        self.tokenizer, self.device, self.head = None, torch.device("cpu"), None
        self.max_length, self.truncation_side = 512, "right"  # data.max_length / truncation_side once prepared
        self._splits, self._texts = None, None

    # --- set-up ------------------------------------------------------------------------------------------
    def prepare_data(self, splits, data_cfg, tokenizer, *, is_main: bool):
        """Label terms from the data's label names; the records' texts, to put into the template at attach."""
        if splits.format != "classification" or (splits.train and isinstance(splits.train[0].class_label, list)):
            raise TokentuneError("the verbalizer needs single-label text + label records", where="data.train",
                                 fix="give each record a text and one label")
        self.set_labels(splits.label_names, tokenizer)
        self.max_length, self.truncation_side, self._splits = data_cfg.max_length, data_cfg.truncation_side, splits
        self._texts = record_texts(data_cfg)
        if self.kind is not None:
            self._template_splits()
        return splits

    def set_labels(self, label_names: list[str], tokenizer) -> None:
        cfg = self.config
        self.tokenizer = tokenizer
        self.terms = LabelTerms.build(label_names, cfg.label_words, tokenizer, prefix=cfg.term_prefix,
                                      include_label_name=cfg.include_label_name)
        self._init_state()

    def attach(self, model, view) -> None:
        self.kind = "causal" if view.is_causal else "masked"
        self.tokenizer = self.tokenizer or getattr(view, "tokenizer", None)
        self.device = view.embed_tokens.weight.device
        if self.kind == "causal":
            self.head = view.lm_head
        else:
            heads = view.heads
            out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if out is None or len(heads) != 1:
                raise TokentuneError(f"{type(model).__name__} has no masked-LM head to score label words with",
                                     where="model.task", fix="load the encoder with model.task: masked")
            self.head = next(iter(heads.values()))  # the whole MLM head (BERT: transform, then the decoder)
        self._init_state()
        if self._splits is not None:
            self._template_splits()

    def _init_state(self) -> None:
        if self.terms is None or self.kind is None or self.weights is not None:
            return
        tok = self.tokenizer
        if self.kind == "masked" and tok.mask_token_id is None:
            raise TokentuneError("the tokenizer has no mask token", where="model.name")
        n = len(self.terms)
        self.weights = torch.nn.Parameter(torch.tensor(self.terms.weights, device=self.device),
                                          requires_grad=self.config.train_weights)
        self.kept = torch.ones(n, dtype=torch.bool)
        self._set_table()
        ids, mask = self.terms.padded_ids()
        self._ids, self._id_mask = ids.to(self.device), mask.to(self.device)
        self._lengths = mask.sum(1).float().to(self.device)
        self._multi = [j for j, t in enumerate(self.terms.token_ids) if len(t) > 1]
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def _set_table(self) -> None:
        index, mask = self.terms.table(self.kept)
        self._index, self._mask = index.to(self.device), mask.to(self.device)

    @property
    def template(self) -> str:
        template = self.config.template or DEFAULT_TEMPLATES[self.kind]
        if self.kind == "causal" and not template.endswith("{mask}"):
            raise TokentuneError("a causal model scores the label term as the continuation: the template must end "
                                 "in {mask}", where="objective.template", fix='e.g. "{text}\\nTopic:{mask}"')
        if self.kind == "causal":
            return template[:-len("{mask}")]
        return template.replace("{mask}", self.tokenizer.mask_token)

    def encode(self, text: str, *, class_label: int = 0, source: str = "", index: int = 0):
        """The record's Example: the template around its text (the text truncated to fit data.max_length)."""
        from ..data.example import IGNORE, Example

        tok = self.tokenizer
        ids = templated_ids(tok, self.template, text, self.max_length, self.truncation_side)
        if self.kind == "masked" and ids.count(tok.mask_token_id) != 1:
            raise TokentuneError(f"the templated record has {ids.count(tok.mask_token_id)} mask tokens, not one",
                                 where=source or "objective.template", fix="remove the mask token from the text")
        return Example(ids, [IGNORE] * len(ids), source, index, class_label=class_label)

    def _template_splits(self) -> None:
        for part, texts in (("train", self._texts[0]), ("eval", self._texts[1])):
            examples = getattr(self._splits, part) or []
            for i, ex in enumerate(examples):
                if ex.source not in texts:
                    raise TokentuneError(f"cannot find the text of {ex.source} again", where=ex.source)
                new = self.encode(texts[ex.source], class_label=ex.class_label, source=ex.source, index=ex.index)
                examples[i] = replace(ex, input_ids=new.input_ids, labels=new.labels)
        self._splits = None  # templated once

    # --- scores --------------------------------------------------------------------------------------------
    def class_scores(self, model, view, batch: dict, *, chunk_size: int = 1024) -> torch.Tensor:
        """[B, C] aggregated, calibrated class scores (the logits of the class cross-entropy)."""
        self._require_ready()
        scores = self._term_scores(model, view, batch, chunk_size)[0]  # [B, N]
        table = scores[:, self._index]  # [B, C, W]
        calibration = self.calibration[self._index] if self.calibration is not None else None
        log_probs = word_log_probs(table, self._mask, calibration)
        temperature = 1.0 if model.training else self.config.pred_temp
        return aggregate(log_probs, self._mask, self.weights[self._index], temperature)

    @torch.no_grad()
    def predict(self, model, view, batch: dict, *, chunk_size: int = 1024) -> torch.Tensor:
        """[B] predicted class ids: the argmax of the calibrated class scores, as in evaluation."""
        was = model.training
        model.eval()
        try:
            return self.class_scores(model, view, batch, chunk_size=chunk_size).argmax(-1)
        finally:
            model.train(was)

    def _term_scores(self, model, view, batch: dict, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, N] term scores, [B, H] hidden states at the label position)."""
        b = batch["input_ids"].shape[0]
        reduce = self.config.multi_token or ("sum" if self.kind == "causal" else "mean")
        if self.kind == "masked":
            ids = batch["input_ids"]
            rows, cols = (ids == self.tokenizer.mask_token_id).nonzero(as_tuple=True)
            if rows.numel() != b or (rows != torch.arange(b, device=rows.device)).any():
                raise TokentuneError("every row needs exactly one mask token", where="objective.template")
            h = backbone_hidden(view, batch)[rows, cols]
            n, width = self._ids.shape
            lp = _log_probs_at(h, self.head, self._ids.reshape(1, -1).expand(b, -1), chunk_size).reshape(b, n, width)
            total = lp.masked_fill(~self._id_mask, 0.0).sum(-1)
        else:
            total, h = self._causal_scores(view, batch, chunk_size)
        return (total / self._lengths if reduce == "mean" else total), h

    def _causal_scores(self, view, batch: dict, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token log-probs summed per term. Single-token terms are read at the prompt's last position; each
        multi-token term needs its own row (prompt + term), whose positions predict the term's later tokens."""
        lens = batch["attention_mask"].sum(1)
        b, n, first = lens.shape[0], len(self.terms), self._ids[:, 0]
        if not self._multi:
            h = backbone_hidden(view, batch)[torch.arange(b, device=lens.device), lens - 1]
            return _log_probs_at(h, self.head, first.expand(b, -1), chunk_size), h
        m, lens_l = len(self._multi), lens.tolist()
        prompts = [batch["input_ids"][i, :lens_l[i]].tolist() for i in range(b)]
        rows = [p + self.terms.token_ids[j][:-1] for p in prompts for j in self._multi]
        hidden = backbone_hidden(view, _right_padded(rows, self.pad_id, lens.device))
        h = hidden[torch.arange(b, device=lens.device) * m, lens - 1]
        total = _log_probs_at(h, self.head, first.expand(b, -1), chunk_size).reshape(-1)
        where, targets, owner = [], [], []
        for i in range(b):
            for k, j in enumerate(self._multi):
                for t, token in enumerate(self.terms.token_ids[j][1:], start=1):
                    where.append((i * m + k, lens_l[i] - 1 + t))
                    targets.append(token)
                    owner.append(i * n + j)
        where_t = torch.tensor(where, device=lens.device)
        later = _log_probs_at(hidden[where_t[:, 0], where_t[:, 1]], self.head,
                              torch.tensor(targets, device=lens.device)[:, None], chunk_size)[:, 0]
        total = total.index_add(0, torch.tensor(owner, device=lens.device), later)
        return total.reshape(b, n), h

    # --- calibration -------------------------------------------------------------------------------------------
    def bind(self, session) -> None:
        """Calibrates once the run is built (and a trained run's saved calibration is loaded): with the model as
        it stands before training, over the training records (support) or the content-free inputs."""
        if self.config.calibration == "none" or self.calibration is not None or self.terms is None:
            return
        if self.config.calibration == "support":
            if session.splits is None:
                raise TokentuneError("support calibration needs the training records", where="objective.calibration")
            examples = session.splits.train[:self.config.calibration_max_examples]
        else:
            examples = [self.encode(t, index=i) for i, t in enumerate(self.config.content_free_inputs)]
        with session.autocast():
            self.calibrate(session.model, session.view, session.eval_batches(examples), adapter=session.adapter,
                           chunk_size=session.cfg.train.loss_chunk_size)

    @torch.no_grad()
    def calibrate(self, model, view, batches, *, adapter=None, chunk_size: int = 1024) -> None:
        """Mean term scores over `batches` (the calibration), then the candidate_frac cut-off on the mean
        log-probabilities of the vocabulary at the label position (the same order as the code's mean logits)."""
        from ..adapters.base import batch_scope

        self._require_ready()
        was = model.training
        model.eval()
        total, vocab, count = 0.0, 0.0, 0
        try:
            for batch in batches:
                with batch_scope(adapter, batch):
                    scores, h = self._term_scores(model, view, batch, chunk_size)
                total = total + scores.float().sum(0)
                for s in range(0, h.shape[0], chunk_size):
                    vocab = vocab + F.log_softmax(self.head(h[s:s + chunk_size]).float(), -1).sum(0)
                count += scores.shape[0]
        finally:
            model.train(was)
        if count == 0:
            raise TokentuneError("no calibration inputs", where="objective.calibration")
        self.calibration = total / count
        self.kept = cut_terms(self.terms, vocab / count, self.config.candidate_frac, first_only=self.kind == "causal")
        self._set_table()

    # --- the loss -------------------------------------------------------------------------------------------
    def weight_total(self, batch: dict) -> torch.Tensor:
        self._require_labels(batch)
        return batch.get("sample_weights", torch.ones(batch["class_labels"].shape[0])).float().sum()

    def __call__(self, model, view, batch: dict, *, chunk_size: int = 1024) -> ObjectiveOutput:
        self._require_labels(batch)
        labels = batch["class_labels"]
        scores = self.class_scores(model, view, batch, chunk_size=chunk_size)
        if int(labels.max()) >= scores.shape[1]:
            raise TokentuneError(f"class id {int(labels.max())} has no label terms ({scores.shape[1]} classes)",
                                 where="objective.label_words")
        losses = F.cross_entropy(scores, labels, reduction="none")
        weights = batch.get("sample_weights", torch.ones_like(losses)).float()
        correct = ((scores.argmax(-1) == labels).float() * (weights > 0)).sum().item()
        return ObjectiveOutput(loss_sum=(losses * weights).sum(), weight_sum=weights.sum().detach(),
                               token_losses=losses.detach(), metrics={"correct": correct})

    def _require_labels(self, batch: dict) -> None:
        if "class_labels" not in batch or batch["class_labels"].is_floating_point():
            raise TokentuneError("the verbalizer needs single-label text + label batches", where="objective.name",
                                 fix="train on text + label records")

    def _require_ready(self) -> None:
        if self.terms is None or self.kind is None:
            raise TokentuneError("the verbalizer has no label terms or model yet (it reads the label names from "
                                 "the training data, and is attached to the model by the session)",
                                 where="objective.name", fix="run it through a tokentune session with data")

    # --- trained state --------------------------------------------------------------------------------------
    def param_groups(self) -> list:
        from ..adapters.base import ParamGroup

        if self.weights is None or not self.config.train_weights:
            return []
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise TokentuneError("the verbalizer's term weights live outside the DDP model, so their gradients would "
                                 "not be averaged across processes", where="objective.train_weights",
                                 fix="set objective.train_weights: false for multi-process runs")
        return [ParamGroup("verbalizer_weights", [("objective.verbalizer.weights", self.weights)],
                           lr=self.config.weights_lr)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.weights is None:
            return {}
        state = {"weights": self.weights.detach().cpu().clone(), "kept": self.kept.to(torch.uint8).cpu()}
        if self.calibration is not None:
            state["calibration"] = self.calibration.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        self._require_ready()
        if state["weights"].numel() != len(self.terms):
            raise TokentuneError(f"the saved verbalizer has {state['weights'].numel()} label terms, this one "
                                 f"{len(self.terms)}", where="objective.label_words",
                                 fix="evaluate with the label_words and data labels the run was trained with")
        with torch.no_grad():
            self.weights.copy_(state["weights"].to(self.weights.device))
        self.kept = state["kept"].bool()
        self.calibration = state["calibration"].to(self.device) if "calibration" in state else None
        self._set_table()

    def save(self, out_dir) -> None:
        """The state (safetensors) and the terms (JSON: readable, and enough to predict without the data)."""
        from safetensors.torch import save_file

        self._require_ready()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(out / STATE_FILE))
        t = self.terms
        rows = [{"class": t.classes[c], "term": term, "token_ids": ids, "initial_weight": w0, "weight": w, "kept": bool(k)}
                for term, c, ids, w0, w, k in zip(t.terms, t.term_class, t.token_ids, t.weights, self.weights.tolist(),
                                                  self.kept)]
        (out / TERMS_FILE).write_text(json.dumps({"classes": t.classes, "terms": rows}, indent=1))

    def load(self, in_dir) -> None:
        from safetensors.torch import load_file

        path = Path(in_dir) / STATE_FILE
        if not path.exists():
            raise TokentuneError(f"{path} does not exist", where=str(in_dir), fix="load a verbalizer run")
        if self.terms is None:  # a session without data: the saved terms stand in for the data's labels
            saved = json.loads((Path(in_dir) / TERMS_FILE).read_text())
            rows = saved["terms"]
            self.terms = LabelTerms(saved["classes"], [r["term"] for r in rows],
                                    [saved["classes"].index(r["class"]) for r in rows],
                                    [r["token_ids"] for r in rows], [r["initial_weight"] for r in rows])
            self._init_state()
        self.load_state_dict(load_file(str(path)))


def _log_probs_at(hidden: torch.Tensor, head, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[n, K] log-probabilities of `targets` [n, K] under head(hidden) [n, V], a chunk of rows at a time (each
    chunk checkpointed: the backward recomputes its logits instead of keeping [n, V])."""
    def fn(h, t):
        return F.log_softmax(head(h).float(), -1).gather(1, t)

    return chunked_token_loss(fn, hidden, targets, chunk_size=chunk_size)


def _right_padded(rows: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """A causal batch of rows (no labels): positions restart at 0 on the padding, its own segment (as collate)."""
    width = max(len(r) for r in rows)
    ids = [r + [pad_id] * (width - len(r)) for r in rows]
    positions = [list(range(len(r))) + list(range(width - len(r))) for r in rows]
    mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    return {"input_ids": torch.tensor(ids, device=device), "position_ids": torch.tensor(positions, device=device),
            "attention_mask": torch.tensor(mask, device=device)}
