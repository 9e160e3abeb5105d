"""PTEC, prompt-tuned embedding classification (Buchner, Cao, Kalo, von Ehrenheim; NAACL 2024 Industry): a soft
prompt P [sp_len, d] and the classification head W_score [L, d] of a sequence-classification model train together,
with two learning rates (prompt 3e-3, head 1e-5); everything else is frozen. Pair it with the multilabel_bce
objective for multi-label data (the paper's setting) or cross_entropy for single-label data.

The prompt enters through soft_prompt.PromptEntry. On decoders it runs alone and its keys/values are offered to the
real tokens at every layer (positions shifted by P), which equals the reference's query [P placeholders] + text: a
causal prompt never attends to the text. The classifier reads the last non-pad token of the text as it would
without the prompt (transformers picks the rightmost token that is not the pad id, for left and right padding
alike); multilabel_bce checks that this is each record's own last token. On encoders the prompt sits after [CLS].

Prompt init (reference `PromptEncoder.random_init`):
  labels  embeddings of the tokens of all label names joined by spaces; a random subset of them (in random order)
          when there are more than P, padded with token ids 1000, 1001, ... when there are fewer
  random  embeddings of token ids 1000 .. 1000 + P - 1
Ids past the vocabulary wrap around (tiny test vocabularies).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import TokentuneError
from ..registry import register
from .base import ParamGroup
from .soft_prompt import PromptEntry, freeze_base, own_module, refuse_merge, task_head_params
from .state_io import copy_state, read_tensors, require_attached, tensor_state, write_tensors

WEIGHTS = "ptec.safetensors"
CONFIG = "ptec_config.json"
PAD_FROM = 1000  # the reference pads (and "random"-initialises) the prompt with token ids 1000, 1001, ...


class PtecConfig(BaseModel):
    """num_virtual_tokens  sp_len, the prompt length P (reference default 100)
    init                labels (default): the label names' token embeddings, random subset / padded with ids
                        1000, 1001, ...; random: embeddings of token ids 1000 .. 1000+P-1
    prompt_lr           learning rate of P (reference --lr 3e-3); None = train.lr
    head_lr             learning rate of the classification head (reference --ch_lr 1e-5, differential learning
                        rates on by default); None = train.lr
    weight_decay        AdamW weight decay of both groups (reference 0)"""

    model_config = ConfigDict(extra="forbid")
    name: Literal["ptec"] = "ptec"
    num_virtual_tokens: int = Field(100, gt=0)
    init: Literal["labels", "random"] = "labels"
    prompt_lr: float | None = Field(3e-3, gt=0)
    head_lr: float | None = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)


def label_names(model) -> list[str]:
    """The classifier's label names in id order (the session passes the data's names to the model config)."""
    id2label = getattr(model.config, "id2label", None) or {}
    return [id2label[i] for i in sorted(id2label)]


def init_token_ids(view, num_tokens: int, init: str, names: list[str]) -> torch.Tensor:
    """The token ids whose embeddings initialise the prompt (reference `random_init`); the subset is drawn from
    torch's global generator, which the session seeds with train.seed before attach."""
    vocab = view.embed_tokens.weight.shape[0]
    if init == "random":
        return (PAD_FROM + torch.arange(num_tokens)) % vocab
    if view.tokenizer is None:
        raise TokentuneError("init: labels needs the model's tokenizer, which this model view does not have",
                             where="adapter.init", fix="attach through a tokentune session, or set view.tokenizer")
    if not names:
        raise TokentuneError("init: labels needs the classifier's label names (model.config.id2label)",
                             where="adapter.init", fix="use init: random")
    # Special tokens left out: every row starts as the embedding of a real label token.
    ids = torch.tensor(view.tokenizer(" ".join(names), add_special_tokens=False)["input_ids"], dtype=torch.long)
    if len(ids) > num_tokens:
        return ids[torch.randperm(len(ids))[:num_tokens]]
    pad = (PAD_FROM + torch.arange(num_tokens - len(ids))) % vocab
    return torch.cat([ids, pad])


@register("adapter", "ptec", config=PtecConfig,
          description="PTEC: soft prompt + classification head trained with two learning rates (multi-label)")
class PtecAdapter:
    name = "ptec"

    def __init__(self, config: PtecConfig | None = None):
        self.config = config or PtecConfig()
        self._attached = False

    def attach(self, model: nn.Module, view) -> None:
        if self._attached:
            raise TokentuneError("the ptec adapter is already attached")
        if not view.task_heads:
            raise TokentuneError(f"ptec trains a classification head, but {type(model).__name__} has none",
                                 where="model.task", fix="set model.task: classification (a sequence-classification "
                                                         "model with one output per label)")
        cfg = self.config
        self.init_ids = init_token_ids(view, cfg.num_virtual_tokens, cfg.init, label_names(model))
        freeze_base(model)
        holder = own_module(model, "ptec", nn.Module())  # -> model.tokentune_ptec
        table = view.embed_tokens.weight.detach()
        holder.prompt = nn.Parameter(table[self.init_ids.to(table.device)].clone())
        self.prompt = holder.prompt
        self.entry = PromptEntry(view, cfg.num_virtual_tokens, lambda kwargs: self.prompt.unsqueeze(0))
        self._head = task_head_params(view, True)  # W_score (and a bias where the head has one, e.g. BERT's)
        self.model, self.view = model, view
        self._attached = True

    def _own(self) -> list[tuple[str, nn.Parameter]]:
        return [("prompt", self.prompt)]

    def param_groups(self) -> list[ParamGroup]:
        require_attached(self)
        cfg = self.config
        return [ParamGroup("prompt", self._own(), lr=cfg.prompt_lr, weight_decay=cfg.weight_decay),
                ParamGroup("head", list(self._head), lr=cfg.head_lr, weight_decay=cfg.weight_decay)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        require_attached(self)
        return tensor_state(self._own() + self._head)

    def load_state_dict(self, state) -> None:
        require_attached(self)
        copy_state(self._own() + self._head, state, source="ptec adapter state")

    def save(self, out_dir: Path, base_ref: str) -> None:
        require_attached(self)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_tensors(out_dir / WEIGHTS, self.state_dict())
        meta = {"method": "ptec", "base_model": base_ref, "num_virtual_tokens": self.config.num_virtual_tokens,
                "init": self.config.init, "labels": label_names(self.model),
                "problem_type": getattr(self.model.config, "problem_type", None)}
        (out_dir / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")

    def load(self, in_dir: Path) -> None:
        require_attached(self)
        in_dir = Path(in_dir)
        path = in_dir / CONFIG
        if not path.is_file():
            raise TokentuneError(f"{CONFIG} not found in {in_dir}", where=str(in_dir),
                                 fix="point at a ptec run's final/ directory")
        saved = json.loads(path.read_text())
        if saved.get("num_virtual_tokens") != self.config.num_virtual_tokens:
            raise TokentuneError(f"the saved prompt has {saved.get('num_virtual_tokens')} tokens, the attached one "
                                 f"{self.config.num_virtual_tokens}", where=str(path),
                                 fix=f"set adapter.num_virtual_tokens={saved.get('num_virtual_tokens')}")
        if saved.get("labels") != label_names(self.model):
            raise TokentuneError(f"the saved head predicts labels {saved.get('labels')}, the model "
                                 f"{label_names(self.model)}", where=str(path),
                                 fix="load it into a model built with the same label set")
        copy_state(self._own() + self._head, read_tensors(in_dir / WEIGHTS), source=str(in_dir / WEIGHTS))

    def merge(self) -> None:
        refuse_merge("ptec", "a soft prompt is extra input, not a weight change")
