"""Knowledge distillation to a frozen teacher's next-token distribution (Hinton et al., 2015), chunked.

Per loss position t, with student logits z_s, teacher logits z_t and temperature T (p = softmax(z / T)):

    forward    KL(p_t || p_s)          mean-seeking (classic KD)
    reverse    KL(p_s || p_t)          mode-seeking (MiniLLM, GKD)
    symmetric  (forward + reverse) / 2 (Jeffreys divergence, halved)

loss_t = alpha · T² · D_t + (1 − alpha) · CE_t (T² keeps the gradient scale independent of T, as in Hinton et al.).
The teacher runs on the same batch (same input ids and positions, packing included); both heads are applied only
at loss positions and in chunks whose logits are recomputed in the backward, so [B, T, V] never exists.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..errors import TokentuneError
from ..registry import register
from .base import ObjectiveOutput, backbone_hidden, shifted_targets, token_weight_total
from .chunked import chunked_token_loss


class KDConfig(BaseModel):
    """teacher       the teacher model: builtin:NAME, a local model directory (same tokenizer / vocabulary)
    mode          forward | reverse | symmetric KL
    temperature   softens both distributions (T)
    alpha         weight of the distillation term; 1 - alpha weighs the ordinary cross-entropy on the labels"""

    model_config = ConfigDict(extra="forbid")
    name: Literal["kd"] = "kd"
    teacher: str
    mode: Literal["forward", "reverse", "symmetric"] = "forward"
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mode: str, temperature: float) -> torch.Tensor:
    """Per-row divergence [n] between softened distributions (teacher detached)."""
    ls = F.log_softmax(student_logits.float() / temperature, -1)
    lt = F.log_softmax(teacher_logits.float().detach() / temperature, -1)
    forward = (lt.exp() * (lt - ls)).sum(-1)
    if mode == "forward":
        return forward
    reverse = (ls.exp() * (ls - lt)).sum(-1)
    return reverse if mode == "reverse" else 0.5 * (forward + reverse)


@register("objective", "kd", config=KDConfig,
          description="knowledge distillation: forward/reverse/symmetric KL to a frozen teacher, chunked, temperature")
class KnowledgeDistillation:
    name = "kd"

    def __init__(self, config: KDConfig):
        self.config = config
        self.teacher = None

    def attach(self, model, view) -> None:
        """Load the frozen teacher next to the student (same device, eval mode, no gradients)."""
        from ..config import ModelConfig
        from ..models.loading import load_model

        if not view.is_causal:
            raise TokentuneError("kd distils next-token distributions and needs a causal model",
                                 where="objective.name", fix="use cross_entropy for classification heads")
        device = view.embed_tokens.weight.device
        loaded = load_model(ModelConfig(name=self.config.teacher, attn_implementation="sdpa"), device=device)
        s_vocab, t_vocab = view.lm_head.weight.shape[0], loaded.view.lm_head.weight.shape[0]
        if s_vocab != t_vocab:
            raise TokentuneError(f"teacher vocabulary {t_vocab} differs from the student's {s_vocab}",
                                 where="objective.teacher", fix="distil from a teacher with the same tokenizer")
        for p in loaded.model.parameters():
            p.requires_grad_(False)
        self.teacher = loaded.model.eval()
        self.teacher_view = loaded.view

    def weight_total(self, batch: dict) -> torch.Tensor:
        return token_weight_total(batch)

    def __call__(self, model, view, batch: dict, *, chunk_size: int = 1024) -> ObjectiveOutput:
        if self.teacher is None:
            raise TokentuneError("the kd objective is not attached to a model (no teacher loaded)")
        cfg = self.config
        hidden = backbone_hidden(view, batch)
        pos, targets, weights = shifted_targets(batch)
        with torch.no_grad():
            teacher_hidden = backbone_hidden(self.teacher_view, batch)[pos[:, 0], pos[:, 1]]
        head, t_head = view.lm_head, self.teacher_view.lm_head

        def per_token(h, th, y):
            logits = F.linear(h, head.weight, getattr(head, "bias", None))
            with torch.no_grad():
                t_logits = F.linear(th.to(t_head.weight.dtype), t_head.weight, getattr(t_head, "bias", None))
            loss = cfg.alpha * cfg.temperature ** 2 * divergence(logits, t_logits, cfg.mode, cfg.temperature)
            if cfg.alpha < 1:
                loss = loss + (1 - cfg.alpha) * F.cross_entropy(logits.float(), y, reduction="none")
            return loss

        losses = chunked_token_loss(per_token, hidden[pos[:, 0], pos[:, 1]], teacher_hidden, targets,
                                    chunk_size=chunk_size)
        return ObjectiveOutput(loss_sum=(losses * weights).sum(), weight_sum=weights.sum().detach(),
                               token_losses=losses.detach())
