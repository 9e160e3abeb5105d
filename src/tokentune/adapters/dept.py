"""DePT, decomposed prompt tuning (Shi & Lipani, ICLR 2024): a short soft prompt P (m x d) plus a position-wise
low-rank offset c·A@B (A: s x r, B: r x d, c = alpha / sqrt(r)) added to the frozen input word embeddings,
trained with two learning rates. The budget of a long prompt is spent on a shorter input.

The prompt enters through soft_prompt.PromptEntry (causal: run alone, keys/values offered to every layer;
encoders: inserted after [CLS]); the offset through a forward hook on the word embedding (decomposed_prompt.py),
indexed by each record's own positions, so packing, left padding and cached generation work. B = 0 at init:
the first forward is exactly prompt tuning with P.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ..errors import TokentuneError
from ..registry import register
from .base import ParamGroup
from .decomposed_prompt import (Beyond, LowRankOffset, OffsetHook, check_record_lengths, load_tensors,
                                save_tensors)
from .soft_prompt import PromptEntry, PromptInit, freeze_base, init_prompt, own_module, refuse_merge, task_head_params
from .state_io import copy_state, require_attached, tensor_state

WEIGHTS = "dept.safetensors"
REFERENCE_TEXT = "Classify this text is postive or not:"  # the reference train.py default, typo included


class DeptConfig(BaseModel):
    """num_virtual_tokens  m, the short prompt's length (released T5-Base configs: m=60 with r=30, m=40 with r=45)
    r                   rank of the offset: A is [max_length, r], B is [r, d]
    max_length          s, the positions the offset covers (the reference pads every input to exactly s)
    alpha               offset scale c = alpha / sqrt(r) (the reference's lora_alpha default 8; sqrt(r), not r)
    init                the prompt's init: text (the released checkpoints), vocab (sampled common tokens), random
    init_text           the text for init: text, repeated or cut to m tokens; None = the reference's string
                        (written for binary sentiment: describe your own task instead)
    prompt_lr           learning rate of P (README grid 3e-1, 4e-1); 0 freezes P; None = train.lr
    low_rank_lr         learning rate of A and B (README grid 5e-3, 3e-1, 5e-4); 0 freezes them; None = train.lr
    weight_decay        AdamW weight decay of P, A and B (the reference built transformers' AdamW without it: 0)
    beyond              a position >= max_length: error (default), or zero = no offset there (an extension that
                        lets generation run past s)
    train_head          None: a fresh task head (encoder classifier) trains, the LM head stays frozen"""

    model_config = ConfigDict(extra="forbid")
    name: Literal["dept"] = "dept"
    num_virtual_tokens: int = Field(60, gt=0)
    r: int = Field(30, gt=0)
    max_length: int = Field(256, gt=0)
    alpha: float = Field(8.0, gt=0)
    init: PromptInit = "text"
    init_text: str | None = None
    prompt_lr: float | None = Field(3e-1, ge=0)
    low_rank_lr: float | None = Field(5e-3, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    beyond: Beyond = "error"
    train_head: bool | None = None

    @model_validator(mode="after")
    def _text_only_with_text_init(self):
        if self.init_text is not None and self.init != "text":
            raise ValueError(f"init_text is used by init: text only (init is {self.init!r})")
        return self


def dept_parameter_count(m: int, r: int, s: int, d: int) -> int:
    """The spec's budget m·d + r·(s + d) (76,800 for m=60, r=30, s=256, d=768)."""
    return m * d + r * (s + d)


@register("adapter", "dept", config=DeptConfig,
          description="DePT: short soft prompt + position-wise low-rank offset on the input embeddings, two lrs")
class DeptAdapter:
    name = "dept"

    def __init__(self, config: DeptConfig | None = None):
        self.config = config or DeptConfig()
        self._attached = False

    # --- data time ------------------------------------------------------------------------------
    def prepare_data(self, splits, data_cfg, tokenizer, *, is_main: bool = True):
        return check_record_lengths(splits, self.config.max_length, self.config.beyond, "dept")

    # --- structure ------------------------------------------------------------------------------
    def attach(self, model: nn.Module, view) -> None:
        if self._attached:
            raise TokentuneError("the dept adapter is already attached", fix="create a new adapter for another model")
        cfg = self.config
        freeze_base(model)
        table = view.embed_tokens.weight
        holder = own_module(model, "dept", nn.Module())  # -> model.tokentune_dept
        text = cfg.init_text or REFERENCE_TEXT
        holder.prompt = nn.Parameter(init_prompt(view, cfg.num_virtual_tokens, cfg.init, text))
        holder.offset = LowRankOffset(cfg.max_length, cfg.r, table.shape[1], cfg.alpha / math.sqrt(cfg.r))
        holder.offset.to(device=table.device)
        self.prompt, self.offset = holder.prompt, holder.offset
        self.entry = PromptEntry(view, cfg.num_virtual_tokens, lambda kwargs: self.prompt.unsqueeze(0))
        self.hook = OffsetHook(view, self.entry, self.offset, cfg.beyond, "dept")
        self._head_params = task_head_params(view, cfg.train_head)
        self.model, self.view = model, view
        self._attached = True

    def _own(self) -> list[tuple[str, nn.Parameter]]:
        return [("prompt_embeddings", self.prompt), ("lora_embedding_A", self.offset.lora_embedding_A),
                ("lora_embedding_B", self.offset.lora_embedding_B)]

    def param_groups(self) -> list[ParamGroup]:
        require_attached(self)
        cfg, own = self.config, self._own()
        groups = [ParamGroup("prompt", own[:1], lr=cfg.prompt_lr, weight_decay=cfg.weight_decay),
                  ParamGroup("low_rank", own[1:], lr=cfg.low_rank_lr, weight_decay=cfg.weight_decay)]
        if self._head_params:
            groups.append(ParamGroup("head", list(self._head_params)))
        return groups

    # --- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        require_attached(self)
        return tensor_state(self._own() + self._head_params)

    def load_state_dict(self, state) -> None:
        require_attached(self)
        copy_state(self._own() + self._head_params, state, source="dept adapter state")

    def save(self, out_dir: Path, base_ref: str) -> None:
        require_attached(self)
        save_tensors(out_dir, WEIGHTS, self._own() + self._head_params, self.config, base_ref)

    def load(self, in_dir: Path) -> None:
        require_attached(self)
        load_tensors(in_dir, WEIGHTS, self._own() + self._head_params, self.config,
                     ("num_virtual_tokens", "r", "max_length", "alpha"))

    def merge(self) -> None:
        refuse_merge("dept", "the soft prompt is extra input, and the offset depends on a token's position, "
                             "not on its id, so no embedding row can hold it")
