"""Multi-label classification loss (PTEC, Buchner et al. 2023): BCE with logits on every label, positives of rare
labels weighted up by w_c = max_c' n_c' / n_c (n_c = training records carrying label c).

Per sample: the mean over labels of the pos-weighted BCE, times the sample weight; the engine divides by the sum of
sample weights, so with unit weights this equals torch's BCEWithLogitsLoss(pos_weight=w) with its default mean.
Evaluation adds micro- and macro-F1 at a sigmoid threshold (0.5 by default, the spec's open point).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..errors import TokentuneError
from ..registry import register
from .base import ObjectiveOutput


class MultilabelBceConfig(BaseModel):
    """pos_weight  auto: w_c = max n / n_c from the training split's label counts (the reference); none: no
                weighting; a list: one weight per label, in label-id order (sorted label names)
    threshold   sigmoid probability at or above which a label counts as predicted, for the F1 metrics"""

    model_config = ConfigDict(extra="forbid")
    name: Literal["multilabel_bce"] = "multilabel_bce"
    pos_weight: Literal["auto", "none"] | list[float] = "auto"
    threshold: float = Field(0.5, gt=0, lt=1)


def label_counts(examples, num_labels: int) -> torch.Tensor:
    """n_c: how many examples carry each label (multi-hot class_label lists, or class ids)."""
    first = examples[0].class_label if examples else None
    if first is None:
        raise TokentuneError("multilabel_bce needs classification records (text + label or labels)",
                             where="data.train", fix="set model.task: classification with labelled records")
    if isinstance(first, list):
        return torch.tensor([e.class_label for e in examples], dtype=torch.float64).sum(0)
    return torch.bincount(torch.tensor([e.class_label for e in examples]), minlength=num_labels).double()


def pos_weight_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """w_c = max n / n_c. A label no training record carries (possible with integer ids) gets the weight of a
    label seen once, instead of infinity: it never has a positive target in training anyway."""
    return (counts.max() / counts.clamp_min(1)).float()


def multi_hot(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """[B, L] float targets: multi-hot as given, or one-hot of single-label class ids (one-vs-rest)."""
    if labels.is_floating_point():
        if labels.shape[-1] != num_labels:
            raise TokentuneError(f"the targets have {labels.shape[-1]} labels but the model's head {num_labels}",
                                 where="model", fix="train and evaluate with the same label set")
        return labels
    return F.one_hot(labels, num_labels).float()


def check_last_token_pooling(model, view, batch: dict) -> None:
    """Decoder classifiers read the rightmost token that is not the pad id; when a record's own last token is the
    pad id (pad = EOS and the text ends in EOS) that is the wrong token, so fail instead of training on it."""
    pad = getattr(model.config, "pad_token_id", None)
    if not view.is_causal or pad is None:
        return
    mask = batch["attention_mask"]
    last = (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(-1)
    if (batch["input_ids"].gather(1, last[:, None]) == pad).any():
        raise TokentuneError(f"a record ends in the pad token (id {pad}), so the classifier would read an earlier "
                             "token", where="data / tokenizer",
                             fix="give the tokenizer a pad token of its own, or strip trailing EOS from the texts")


def f1_scores(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> tuple[float, float]:
    """(micro-F1, macro-F1). A label with no true and no predicted positives scores 0 in the macro mean
    (scikit-learn's zero_division default, which the reference's report uses)."""
    def f1(t, p, n):
        denom = 2 * t + p + n
        return torch.where(denom > 0, 2 * t / denom.clamp_min(1), torch.zeros_like(denom))

    micro = f1(tp.sum(), fp.sum(), fn.sum())
    return float(micro), float(f1(tp, fp, fn).mean())


@register("objective", "multilabel_bce", config=MultilabelBceConfig,
          description="Multi-label BCE with logits, pos_weight max n / n_c from the train labels (PTEC); F1")
class MultilabelBce:
    name = "multilabel_bce"

    def __init__(self, config: MultilabelBceConfig | None = None):
        self.config = config or MultilabelBceConfig()
        self.counts: torch.Tensor | None = None
        self.pos_weight: torch.Tensor | None = None
        if isinstance(self.config.pos_weight, list):
            self.pos_weight = torch.tensor(self.config.pos_weight, dtype=torch.float32)

    def prepare_data(self, splits, data_cfg, tokenizer, *, is_main: bool):
        """Counts the training labels once, before training (the session calls this with the tokenised splits)."""
        self.counts = label_counts(splits.train, len(splits.label_names or []))
        if self.config.pos_weight == "auto":
            self.pos_weight = pos_weight_from_counts(self.counts)
        return splits

    def weight_total(self, batch: dict) -> torch.Tensor:
        self._require_labels(batch)
        return batch.get("sample_weights", torch.ones(batch["class_labels"].shape[0])).float().sum()

    def __call__(self, model, view, batch: dict, *, chunk_size: int = 1024) -> ObjectiveOutput:
        self._require_labels(batch)
        check_last_token_pooling(model, view, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = multi_hot(batch["class_labels"], logits.shape[-1])
        losses = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self._weights(logits),
                                                    reduction="none").mean(-1)
        weights = batch.get("sample_weights", torch.ones_like(losses)).float()
        predicted = (torch.sigmoid(logits) >= self.config.threshold).float()
        counted = (weights > 0).float()[:, None]  # zero-weight padding rows do not count towards F1
        metrics = {"tp": (predicted * targets * counted).sum(0).detach().cpu(),
                   "fp": (predicted * (1 - targets) * counted).sum(0).detach().cpu(),
                   "fn": ((1 - predicted) * targets * counted).sum(0).detach().cpu()}
        return ObjectiveOutput(loss_sum=(losses * weights).sum(), weight_sum=weights.sum().detach(),
                               token_losses=losses.detach(), metrics=metrics)

    def eval_metrics(self, sums: dict) -> dict[str, float]:
        """Evaluation's summary of the metrics summed over its batches."""
        micro, macro = f1_scores(sums["tp"], sums["fp"], sums["fn"])
        return {"eval/micro_f1": micro, "eval/macro_f1": macro}

    def _weights(self, logits: torch.Tensor) -> torch.Tensor | None:
        if self.config.pos_weight == "none":
            return None
        if self.pos_weight is None:
            raise TokentuneError("multilabel_bce's pos_weight: auto needs the training label counts, which were "
                                 "not given (prepare_data was not called)", where="objective.pos_weight",
                                 fix="run through a tokentune session with data, or give pos_weight as a list")
        if self.pos_weight.numel() != logits.shape[-1]:
            raise TokentuneError(f"pos_weight has {self.pos_weight.numel()} entries but the model predicts "
                                 f"{logits.shape[-1]} labels", where="objective.pos_weight",
                                 fix="give one weight per label, in label-id order")
        return self.pos_weight.to(logits.device)

    @staticmethod
    def _require_labels(batch: dict) -> None:
        if "class_labels" not in batch:
            raise TokentuneError("multilabel_bce needs classification batches (class labels)", where="objective.name",
                                 fix="set model.task: classification with text + label(s) records")
