"""Prompt tuning (Lester et al., 2021): P trainable embeddings in front of every input; the model stays frozen.

Saved in PEFT's PROMPT_TUNING format (adapter_config.json + adapter_model.safetensors with `prompt_embeddings`),
so PEFT loads our prompts and we load PEFT's. On causal models the prompt's keys/values are computed by running it
alone (soft_prompt.py), which equals prepending it; on encoders it is inserted after [CLS].
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import TokentuneError
from ..registry import register
from . import peft_format
from .base import ParamGroup
from .soft_prompt import (PromptEntry, PromptInit, freeze_base, init_prompt, own_module, refuse_merge,
                          task_head_params)
from .state_io import copy_state, read_tensors, require_attached, tensor_state, write_tensors

_PEFT_INIT = {"vocab": "SAMPLE_VOCAB", "text": "TEXT", "random": "RANDOM"}
HEAD_WEIGHTS = "task_head.safetensors"


class PromptTuningConfig(BaseModel):
    """num_virtual_tokens  prompt length P
    init                vocab (sampled common tokens, Lester et al.'s best general init), text, or random
    init_text           the text for init: text (repeated or cut to P tokens)
    lr                  the prompt's own learning rate (prompt tuning wants far larger rates than weight
                        tuning: Lester et al. use 0.3 with Adafactor); None = train.lr
    train_head          None: a fresh task head (encoder classifier) trains, the LM head stays frozen"""

    model_config = ConfigDict(extra="forbid")
    name: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = Field(20, gt=0)
    init: PromptInit = "vocab"
    init_text: str | None = None
    lr: float | None = Field(None, gt=0)
    train_head: bool | None = None


@register("adapter", "prompt_tuning", config=PromptTuningConfig,
          description="prompt tuning: trainable soft prompt, frozen model; PEFT format")
class PromptTuningAdapter:
    name = "prompt_tuning"

    def __init__(self, config: PromptTuningConfig | None = None):
        self.config = config or PromptTuningConfig()
        self._attached = False

    def attach(self, model: nn.Module, view) -> None:
        if self._attached:
            raise TokentuneError("the prompt_tuning adapter is already attached")
        cfg = self.config
        freeze_base(model)
        holder = own_module(model, "prompt", nn.Module())  # -> model.tokentune_prompt
        holder.embeddings = nn.Parameter(init_prompt(view, cfg.num_virtual_tokens, cfg.init, cfg.init_text))
        self.prompt = holder.embeddings
        self.entry = PromptEntry(view, cfg.num_virtual_tokens, lambda kwargs: self.prompt.unsqueeze(0))
        self._head_params = task_head_params(view, cfg.train_head)
        self.model, self.view = model, view
        self._attached = True

    def _own(self) -> list[tuple[str, nn.Parameter]]:
        return [("prompt_embeddings", self.prompt)]

    def param_groups(self) -> list[ParamGroup]:
        require_attached(self)
        groups = [ParamGroup("prompt", self._own(), lr=self.config.lr, weight_decay=0.0)]
        if self._head_params:
            groups.append(ParamGroup("head", list(self._head_params)))
        return groups

    def state_dict(self) -> dict[str, torch.Tensor]:
        require_attached(self)
        return tensor_state(self._own() + self._head_params)

    def load_state_dict(self, state) -> None:
        require_attached(self)
        copy_state(self._own() + self._head_params, state, source="prompt_tuning adapter state")

    def save(self, out_dir: Path, base_ref: str) -> None:
        require_attached(self)
        cfg, mc = self.config, self.model.config
        config = {
            "peft_type": "PROMPT_TUNING", "task_type": peft_format.task_type(self.model),
            "base_model_name_or_path": base_ref, "revision": None, "inference_mode": True,
            "num_virtual_tokens": cfg.num_virtual_tokens, "token_dim": self.prompt.shape[1],
            "num_transformer_submodules": 1,
            "num_attention_heads": getattr(mc, "num_attention_heads", None) or getattr(mc, "n_head", None),
            "num_layers": self.view.num_layers,
            "prompt_tuning_init": _PEFT_INIT[cfg.init], "prompt_tuning_init_text": cfg.init_text,
            "tokenizer_name_or_path": base_ref if cfg.init == "text" else None,
            "modules_to_save": None,
        }
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_tensors(out_dir / peft_format.WEIGHTS, {"prompt_embeddings": self.prompt.detach()})
        (out_dir / peft_format.CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if self._head_params:  # PEFT keeps heads in modules_to_save; ours live beside the prompt
            write_tensors(out_dir / HEAD_WEIGHTS, tensor_state(self._head_params))

    def load(self, in_dir: Path) -> None:
        """Read a PEFT prompt-tuning adapter (ours or PEFT's); its prompt length must match."""
        require_attached(self)
        in_dir = Path(in_dir)
        path = in_dir / peft_format.CONFIG
        if not path.is_file():
            raise TokentuneError(f"{peft_format.CONFIG} not found in {in_dir}", where=str(in_dir),
                                 fix="point at a prompt-tuning run's final/ directory")
        config = json.loads(path.read_text())
        if config.get("peft_type") != "PROMPT_TUNING":
            raise TokentuneError(f"adapter is {config.get('peft_type')!r}, not PROMPT_TUNING", where=str(path),
                                 fix="load it with the adapter that wrote it")
        if config.get("num_transformer_submodules", 1) != 1:
            raise TokentuneError("encoder-decoder prompts (two submodules) are not supported", where=str(path))
        tensors = read_tensors(in_dir / peft_format.WEIGHTS)
        prompt = tensors.get("prompt_embeddings")
        if prompt is None or tuple(prompt.shape) != tuple(self.prompt.shape):
            got = None if prompt is None else tuple(prompt.shape)
            raise TokentuneError(f"saved prompt has shape {got}, the attached one {tuple(self.prompt.shape)}",
                                 where=str(in_dir / peft_format.WEIGHTS),
                                 fix=f"set adapter.num_virtual_tokens={config.get('num_virtual_tokens')}")
        with torch.no_grad():
            self.prompt.copy_(prompt.to(self.prompt))
        if self._head_params:
            copy_state(self._head_params, read_tensors(in_dir / HEAD_WEIGHTS), source=str(in_dir / HEAD_WEIGHTS))

    @contextlib.contextmanager
    def disabled(self):
        """The base model's computation while inside (a reference model without a second copy)."""
        require_attached(self)
        self.entry.enabled = False
        try:
            yield
        finally:
            self.entry.enabled = True

    def merge(self) -> None:
        refuse_merge("prompt_tuning", "a soft prompt is extra input, not a weight change")
