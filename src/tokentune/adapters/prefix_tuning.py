"""Prefix tuning (Li & Liang, 2021; deep prompts as in P-tuning v2): trainable keys and values in front of every
layer's attention, offered through the attention hook (virtual_tokens.py); the model stays frozen.

With `reparameterize` the prefix is the output of a small MLP over P embeddings, as in the paper (it stabilises
training); without it the keys/values are the parameters themselves. Causal models see the prefix at positions
0..P-1 and the input from P on (as PEFT does with a P-long cache); encoders keep their positions.
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
from .base import ParamGroup
from .soft_prompt import freeze_base, init_prompt, own_module, refuse_merge, task_head_params
from .state_io import copy_state, read_tensors, require_attached, tensor_state, write_tensors
from .virtual_tokens import VirtualTokens, kv_shape

WEIGHTS, META = "prefix.safetensors", "tokentune_adapter.json"


class PrefixTuningConfig(BaseModel):
    """num_virtual_tokens  prefix length P (per layer)
    reparameterize      prefix = MLP(embeddings) (Li & Liang); false: the keys/values are trained directly
    hidden              the MLP's hidden width (PEFT's encoder_hidden_size)
    init                without the MLP: vocab = the keys/values of P sampled vocabulary tokens run through the
                        model (the paper's "real word activations" init), random = normal at their scale
    lr                  the prefix's own learning rate; None = train.lr
    train_head          None: a fresh task head (encoder classifier) trains, the LM head stays frozen"""

    model_config = ConfigDict(extra="forbid")
    name: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: int = Field(20, gt=0)
    reparameterize: bool = True
    hidden: int = Field(512, gt=0)
    init: Literal["vocab", "random"] = "vocab"
    lr: float | None = Field(None, gt=0)
    train_head: bool | None = None


class PrefixParameters(nn.Module):
    """The prefix of every layer: [L, 2, P, kv_heads * head_dim], directly or through the MLP."""

    def __init__(self, layers: int, tokens: int, kv_heads: int, head_dim: int, width: int, cfg: PrefixTuningConfig,
                 initial: torch.Tensor | None):
        super().__init__()
        self.shape = (layers, 2, tokens, kv_heads * head_dim)
        self.kv_heads, self.head_dim = kv_heads, head_dim
        out = layers * 2 * kv_heads * head_dim
        if cfg.reparameterize:
            self.embedding = nn.Parameter(torch.randn(tokens, width))  # PEFT: nn.Embedding's N(0, 1)
            self.mlp = nn.Sequential(nn.Linear(width, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, out))
        else:
            self.prefix = nn.Parameter(initial.clone())

    def forward(self) -> torch.Tensor:
        if hasattr(self, "mlp"):
            L, two, P, w = self.shape
            return self.mlp(self.embedding).view(P, L, 2, w).permute(1, 2, 0, 3)
        return self.prefix

    def per_layer(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        prefix = self()
        L, _, P, _ = self.shape
        kv = prefix.view(L, 2, P, self.kv_heads, self.head_dim).transpose(2, 3)  # [L, 2, kv_heads, P, hd]
        return {i: (kv[i, 0].unsqueeze(0), kv[i, 1].unsqueeze(0)) for i in range(L)}


def real_word_prefix(view, tokens: int, init: str) -> torch.Tensor:
    """[L, 2, P, kv_heads * hd]: keys/values of sampled vocabulary tokens run through the model (or noise at
    their scale)."""
    vt = VirtualTokens(view, tokens, shift_positions=False)
    vt.install()
    try:
        with torch.no_grad():
            words = init_prompt(view, tokens, "vocab").unsqueeze(0)
            captured = vt.run_alone(words)
    finally:
        vt.remove()
    layers = [torch.stack([captured[i][0][0], captured[i][1][0]]) for i in range(view.num_layers)]  # [2, kvh, P, hd]
    prefix = torch.stack(layers).transpose(2, 3).flatten(3)  # [L, 2, P, kvh*hd]
    if init == "random":
        return torch.randn_like(prefix) * prefix.std()
    return prefix


@register("adapter", "prefix_tuning", config=PrefixTuningConfig,
          description="prefix tuning: trainable per-layer keys/values (optional MLP reparameterisation), frozen model")
class PrefixTuning:
    name = "prefix_tuning"

    def __init__(self, config: PrefixTuningConfig | None = None):
        self.config = config or PrefixTuningConfig()
        self._attached = False

    def attach(self, model: nn.Module, view, *, module_name: str = "prefix") -> None:
        if self._attached:
            raise TokentuneError("the prefix_tuning adapter is already attached")
        cfg = self.config
        freeze_base(model)
        kv_heads, head_dim = kv_shape(view)
        initial = None if cfg.reparameterize else real_word_prefix(view, cfg.num_virtual_tokens, cfg.init)
        width = view.embed_tokens.weight.shape[1]
        params = PrefixParameters(view.num_layers, cfg.num_virtual_tokens, kv_heads, head_dim, width, cfg, initial)
        self.prefix = own_module(model, module_name, params.to(view.embed_tokens.weight.device))
        self.virtual = VirtualTokens(view, cfg.num_virtual_tokens)
        self.virtual.before_forward = lambda kwargs: self.prefix.per_layer()
        self.virtual.install()
        self._head_params = task_head_params(view, cfg.train_head)
        self.model, self.view = model, view
        self._attached = True

    def _own(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.prefix.named_parameters())

    def param_groups(self) -> list[ParamGroup]:
        require_attached(self)
        groups = [ParamGroup("prefix", self._own(), lr=self.config.lr)]
        if self._head_params:
            groups.append(ParamGroup("head", list(self._head_params)))
        return groups

    def state_dict(self) -> dict[str, torch.Tensor]:
        require_attached(self)
        return tensor_state(self._own() + self._head_params)

    def load_state_dict(self, state) -> None:
        require_attached(self)
        copy_state(self._own() + self._head_params, state, source="prefix_tuning adapter state")

    def save(self, out_dir: Path, base_ref: str) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_tensors(out_dir / WEIGHTS, self.state_dict())
        (out_dir / META).write_text(json.dumps({"adapter": self.config.model_dump(), "base_model": base_ref}, indent=1))

    def load(self, in_dir: Path) -> None:
        require_attached(self)
        meta_path = Path(in_dir) / META
        if meta_path.is_file():
            saved = json.loads(meta_path.read_text()).get("adapter", {})
            differ = {k: v for k, v in saved.items() if k in ("num_virtual_tokens", "reparameterize", "hidden")
                      and v != getattr(self.config, k)}
            if differ:
                raise TokentuneError(f"the prefix was trained with {differ}", where=str(meta_path),
                                     fix="set " + " ".join(f"adapter.{k}={v}" for k, v in differ.items()))
        copy_state(self._own() + self._head_params, read_tensors(Path(in_dir) / WEIGHTS), source=str(in_dir))

    @contextlib.contextmanager
    def disabled(self):
        """The base model's computation while inside (a reference model without a second copy)."""
        require_attached(self)
        self.virtual.enabled = False
        try:
            yield
        finally:
            self.virtual.enabled = True

    def merge(self) -> None:
        refuse_merge("prefix_tuning", "extra attention positions are not a weight change")
