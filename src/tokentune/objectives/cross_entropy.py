"""Cross-entropy: next-token loss for causal models (chunked, only where labels exist), and the
sequence-level loss of a classification head. Both are per-token (per-sample) losses x weights."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..registry import register
from .base import ObjectiveOutput, backbone_hidden, shifted_targets, token_weight_total
from .chunked import chunked_cross_entropy


class CrossEntropyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["cross_entropy"] = "cross_entropy"
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="classification heads only")


@register("objective", "cross_entropy", config=CrossEntropyConfig,
          description="Next-token cross-entropy (chunked LM head, loss positions only) or classification CE")
class CrossEntropy:
    name = "cross_entropy"

    def __init__(self, config: CrossEntropyConfig):
        self.config = config

    def weight_total(self, batch: dict) -> torch.Tensor:
        if "class_labels" in batch:
            return batch.get("sample_weights", torch.ones_like(batch["class_labels"], dtype=torch.float32)).sum()
        return token_weight_total(batch)

    def __call__(self, model, view, batch: dict, *, chunk_size: int = 1024) -> ObjectiveOutput:
        if "class_labels" in batch:
            return self._classification(model, batch)
        if self.config.label_smoothing:
            from ..errors import TokentuneError

            raise TokentuneError("label_smoothing applies to classification heads only",
                                 where="objective.label_smoothing", fix="remove it for causal models")
        hidden = backbone_hidden(view, batch)
        pos, targets, weights = shifted_targets(batch)
        losses = chunked_cross_entropy(hidden[pos[:, 0], pos[:, 1]], view.lm_head, targets, chunk_size)
        return ObjectiveOutput(loss_sum=(losses * weights).sum(), weight_sum=weights.sum().detach(),
                               token_losses=losses.detach())

    def _classification(self, model, batch: dict) -> ObjectiveOutput:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["class_labels"]
        if labels.is_floating_point():  # multi-hot targets: a softmax over classes would be the wrong model
            from ..errors import TokentuneError

            raise TokentuneError("the data is multi-label (lists of labels); cross_entropy takes one label per record",
                                 where="objective.name", fix="use objective multilabel_bce")
        losses = F.cross_entropy(logits, labels, reduction="none", label_smoothing=self.config.label_smoothing)
        weights = batch.get("sample_weights", torch.ones_like(losses))
        correct = (logits.argmax(-1) == labels).float().sum().item()
        return ObjectiveOutput(loss_sum=(losses * weights).sum(), weight_sum=weights.sum().detach(),
                               token_losses=losses.detach(), metrics={"correct": correct})
