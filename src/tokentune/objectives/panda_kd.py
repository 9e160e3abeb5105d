"""PANDA's student loss (Zhong et al., 2022): cross-entropy plus distillation from a prompt-transfer teacher.

    L = CE(z_s, y) + 0.1 · β · MSE(z_s, z_t) / B

z are the classifier's logits (classification) or the LM head's logits at the loss positions (causal models), MSE is
the mean over every logit of the micro-batch and B its number of rows, exactly as the reference code
(`mse_loss(logit, logit2) / logit.shape[0]`, added to the mean CE). In tokentune's units (summed losses, divided by
the global weight) that is a per-row (classification) or per-token (causal) term 0.1 · β · mean_c (z_s − z_t)² / B,
which equals the reference with gradient accumulation as well.

The teacher is the same frozen backbone with the teacher's deep prompt (prefix_tuning state) and head: no second
model. Its logits come from one extra no-grad forward in which `torch.func.functional_call` substitutes the teacher's
tensors for the student's prefix and head parameters — nothing is copied into or out of the student's parameters, so
the student's autograd graph is untouched and the teacher tensors (plain tensors, never parameters) cannot change.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import TokentuneError
from ..registry import register
from .base import ObjectiveOutput, backbone_hidden, shifted_targets, token_weight_total
from .chunked import chunked_cross_entropy, chunked_token_loss

PREFIX_MODULE = "tokentune_prefix"  # where prefix_tuning keeps its parameters (soft_prompt.own_module)
WEIGHTS, META = "prefix.safetensors", "panda_kd.json"


class PandaKDConfig(BaseModel):
    """teacher          the teacher's prefix_tuning artefact: a run directory (its final/ is read) or the final/ itself
    beta             the distillation weight β in L = CE + 0.1·β·MSE/B (the reference script's default 0.1; the
                     panda recipe sets it from the transferability metric); 0 = plain prompt tuning
    teacher_dropout  true: the teacher runs in the model's current mode (train mode while training, dropout on, as
                     the reference code does); false: the teacher always runs in eval mode"""

    model_config = ConfigDict(extra="forbid")
    name: Literal["panda_kd"] = "panda_kd"
    teacher: str
    beta: float = Field(0.1, ge=0)
    teacher_dropout: bool = True


def teacher_dir(path: str | Path) -> Path:
    path = Path(path)
    for candidate in (path / "final", path):
        if (candidate / WEIGHTS).is_file():
            return candidate
    raise TokentuneError(f"no {WEIGHTS} in {path} or {path / 'final'}", where="objective.teacher",
                         fix="point at a finished prefix_tuning run (the panda recipe's teacher/ stage)")


class _Forward(nn.Module):
    """Holds the model as a submodule so functional_call can substitute the teacher tensors by their model names."""

    def __init__(self, model: nn.Module, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, batch):
        return self.fn(self.model, batch)


@register("objective", "panda_kd", config=PandaKDConfig,
          description="PANDA: cross-entropy + 0.1·β·MSE to a prefix-transfer teacher's logits (same frozen backbone)")
class PandaKD:
    name = "panda_kd"

    def __init__(self, config: PandaKDConfig):
        self.config = config
        self.teacher: dict[str, torch.Tensor] | None = None

    def attach(self, model: nn.Module, view) -> None:
        """Read the teacher's prefix (and head) and map its tensors onto the student's parameter names."""
        if not hasattr(model, PREFIX_MODULE):
            raise TokentuneError("panda_kd distils between deep prompts and needs the prefix_tuning adapter",
                                 where="adapter.name", fix="use adapter: {name: prefix_tuning, ...}")
        where = teacher_dir(self.config.teacher)
        from ..adapters.state_io import read_tensors

        state = read_tensors(where / WEIGHTS)
        params = dict(model.named_parameters())
        teacher = {}
        for key, value in state.items():
            name = f"{PREFIX_MODULE}.{key}" if f"{PREFIX_MODULE}.{key}" in params else key
            if name not in params:
                raise TokentuneError(f"the teacher's tensor {key!r} has no counterpart in the student",
                                     where=str(where / WEIGHTS), fix="train student and teacher with the same adapter "
                                     "options (num_virtual_tokens, reparameterize) on the same model and labels")
            if params[name].shape != value.shape:
                raise TokentuneError(f"teacher {key} has shape {tuple(value.shape)}, the student's "
                                     f"{tuple(params[name].shape)}", where=str(where / WEIGHTS),
                                     fix="the teacher must be trained on the target task (same label set) with the "
                                         "same prefix options")
            teacher[name] = value.to(device=params[name].device, dtype=params[name].dtype)
        prefix = {f"{PREFIX_MODULE}.{n}" for n, _ in getattr(model, PREFIX_MODULE).named_parameters()}
        if not prefix <= set(teacher):
            raise TokentuneError(f"the teacher lacks prefix tensors {sorted(prefix - set(teacher))}",
                                 where=str(where / WEIGHTS), fix="train the teacher with the same prefix options")
        self.teacher, self.source = teacher, str(where)

    def weight_total(self, batch: dict) -> torch.Tensor:
        if "class_labels" in batch:
            return batch.get("sample_weights", torch.ones_like(batch["class_labels"], dtype=torch.float32)).sum()
        return token_weight_total(batch)

    def _teacher_run(self, model, fn, batch):
        """fn(model, batch) with the teacher's prefix and head in place of the student's, without gradients."""
        if self.teacher is None:
            raise TokentuneError("the panda_kd objective is not attached to a model (no teacher loaded)")
        mode = contextlib.nullcontext()
        if not self.config.teacher_dropout and model.training:
            mode = _eval_mode(model)
        with torch.no_grad(), mode:
            return torch.func.functional_call(_Forward(model, fn), {f"model.{k}": v for k, v in self.teacher.items()},
                                              (batch,), strict=False)

    def __call__(self, model, view, batch: dict, *, chunk_size: int = 1024) -> ObjectiveOutput:
        if "class_labels" in batch:
            return self._classification(model, batch)
        return self._causal(model, view, batch, chunk_size)

    def _classification(self, model, batch: dict) -> ObjectiveOutput:
        labels = batch["class_labels"]
        if labels.is_floating_point():
            raise TokentuneError("panda_kd takes one label per record; the data is multi-label",
                                 where="objective.name", fix="use single-label data")
        beta = self.config.beta

        def classify(m, b):
            return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()

        # The teacher runs first: its forward cannot touch anything the student's backward will need.
        teacher = self._teacher_run(model, classify, batch) if beta > 0 else None
        logits = classify(model, batch)
        losses = F.cross_entropy(logits, labels, reduction="none")
        if teacher is not None:
            losses = losses + 0.1 * beta * (logits - teacher).square().mean(-1) / logits.shape[0]
        weights = batch.get("sample_weights", torch.ones_like(losses))
        correct = (logits.argmax(-1) == labels).float().sum().item()
        return ObjectiveOutput(loss_sum=(losses * weights).sum(), weight_sum=weights.sum().detach(),
                               token_losses=losses.detach(), metrics={"correct": correct})

    def _causal(self, model, view, batch: dict, chunk_size: int) -> ObjectiveOutput:
        beta, head = self.config.beta, view.lm_head
        pos, targets, weights = shifted_targets(batch)
        rows = batch["input_ids"].shape[0]
        if beta == 0:  # plain prompt tuning: the cross_entropy objective's own chunked loss
            hidden = backbone_hidden(view, batch)[pos[:, 0], pos[:, 1]]
            losses = chunked_cross_entropy(hidden, head, targets, chunk_size)
            return ObjectiveOutput(loss_sum=(losses * weights).sum(), weight_sum=weights.sum().detach(),
                                   token_losses=losses.detach())
        teacher_hidden = self._teacher_run(model, lambda m, b: backbone_hidden(view, b), batch)[pos[:, 0], pos[:, 1]]
        hidden = backbone_hidden(view, batch)[pos[:, 0], pos[:, 1]]

        def per_token(h, y, th):
            logits = F.linear(h, head.weight, getattr(head, "bias", None)).float()
            with torch.no_grad():
                t = F.linear(th.to(head.weight.dtype), head.weight, getattr(head, "bias", None)).float()
            return F.cross_entropy(logits, y, reduction="none") + 0.1 * beta * (logits - t).square().mean(-1) / rows

        losses = chunked_token_loss(per_token, hidden, targets, teacher_hidden, chunk_size=chunk_size)
        return ObjectiveOutput(loss_sum=(losses * weights).sum(), weight_sum=weights.sum().detach(),
                               token_losses=losses.detach())

    def save(self, out_dir: Path) -> None:
        """Where the teacher came from (its tensors stay in the teacher's run)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / META).write_text(json.dumps({"objective": "panda_kd", "teacher": self.source,
                                                "beta": self.config.beta}, indent=1) + "\n")


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    model.eval()
    try:
        yield
    finally:
        model.train()
