"""Parallel and scaled parallel adapters (He et al., "Towards a Unified View of PETL", 2022): a bottleneck
Δ(x) = s · ReLU(x W_down + b_down) W_up (+ b_up) beside the FFN and/or attention sublayer of every block,
added to the sublayer's output (parallel insertion). The plain variant has s = 1; the base stays frozen."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import TokentuneError
from ..registry import register
from .base import ParamGroup
from .parallel_layer import (CHILD, Activation, Bottleneck, Placement, hidden_size, install, model_dropout,
                             sublayers)
from .state_io import check_meta, copy_state, read_tensors, require_attached, tensor_state, write_meta, write_tensors

WEIGHTS = "trainable.safetensors"
# Keys that change the function the saved weights compute; a load with different values is refused.
_SHAPING = ("r", "placement", "activation", "scale", "learn_scale")


class ParallelAdapterConfig(BaseModel):
    """Parallel adapter (h <- h + Δ).

    r            bottleneck width (the paper's FFN PA uses r = 512 on BART-large, d = 1024)
    placement    ffn (default: the paper's PA/MAM choice), attn, or both; see parallel_layer.py for where Δ enters
    activation   the nonlinearity f between down and up (the paper: relu)
    dropout      dropout on f's output, in training only; None = the model's own hidden dropout, as the reference
                 code does (BERT/MiniLM 0.1, GPT-2 resid_pdrop, Llama-family 0)
    init         lora: W_down Kaiming-uniform, W_up and biases zero, so the model starts as the base model
                 (the paper's choice for PA/MAM); bert: all weights N(0, 0.02), biases zero (Δ != 0 at start)
    train_head   None: task heads that transformers initialises fresh (classifier, score) train, the LM head
                 stays frozen; true: task heads train (error if there is none); false: no head trains
    """

    model_config = ConfigDict(extra="forbid")
    name: Literal["parallel_adapter"] = "parallel_adapter"
    r: int = Field(512, gt=0)
    placement: Placement = "ffn"
    activation: Activation = "relu"
    dropout: float | None = Field(None, ge=0, lt=1)
    init: Literal["lora", "bert"] = "lora"
    train_head: bool | None = None


class ScaledParallelAdapterConfig(ParallelAdapterConfig):
    """Scaled parallel adapter (h <- h + s·Δ): every key of parallel_adapter, plus

    scale        s (the paper: 4 on XSum / en-ro; the GLUE script's MAM uses 2)
    learn_scale  s is a trainable scalar per adapter, initialised at `scale` (the paper's "trainable s"
                 ablation starts it at 1: set scale: 1, learn_scale: true)
    """

    name: Literal["scaled_parallel_adapter"] = "scaled_parallel_adapter"
    scale: float = Field(4.0, gt=0)
    learn_scale: bool = False


@register("adapter", "parallel_adapter", config=ParallelAdapterConfig,
          description="parallel adapter (He et al. 2022): ReLU bottleneck beside the FFN/attention, added to its "
                      "output; not mergeable")
class ParallelAdapter:
    name = "parallel_adapter"
    config_cls: type[ParallelAdapterConfig] = ParallelAdapterConfig

    def __init__(self, config: ParallelAdapterConfig | None = None):
        self.config = config or self.config_cls()
        if type(self.config) is not self.config_cls:  # a scaled config must not pass as a plain one
            raise TokentuneError(f"{self.name} needs a {self.config_cls.__name__}, got {type(self.config).__name__}")
        self._attached = False

    @property
    def scale(self) -> float:
        return getattr(self.config, "scale", 1.0)

    @property
    def learn_scale(self) -> bool:
        return getattr(self.config, "learn_scale", False)

    # --- attach -----------------------------------------------------------------------------
    def attach(self, model: nn.Module, view) -> None:
        if self._attached:
            raise TokentuneError(f"the {self.name} adapter is already attached",
                                 fix="create a new adapter for another model")
        cfg = self.config
        heads = self._heads(view)
        targets = sublayers(view, cfg.placement)
        d = hidden_size(view)
        dropout = model_dropout(view) if cfg.dropout is None else cfg.dropout
        for p in model.parameters():
            p.requires_grad_(False)
        self.handles, self._adapter_params = [], []
        for name, module in targets.items():
            weight = next(module.parameters())
            # Half-precision bases keep fp32 adapters (as LoRA does): small updates vanish in bf16.
            dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
            bottleneck = Bottleneck(d, cfg.r, activation=cfg.activation, dropout=dropout, scale=self.scale,
                                    learn_scale=self.learn_scale, init=cfg.init, device=weight.device, dtype=dtype)
            self.handles += install(view, name, module, bottleneck)
            self._adapter_params += [(f"{name}.{CHILD}.{n}", p) for n, p in bottleneck.named_parameters()]
        self._head_params = [(f"{h}.{n}", p) for h, m in heads.items() for n, p in m.named_parameters()]
        for _, p in self._head_params:
            p.requires_grad_(True)
        self.sublayers = list(targets)
        self.model, self.view = model, view
        self._attached = True

    def _heads(self, view) -> dict[str, nn.Module]:
        if self.config.train_head is False:
            return {}
        heads = view.task_heads
        if self.config.train_head and not heads:
            raise TokentuneError(f"train_head is true but {type(view.model).__name__} has no task head",
                                 where="adapter.train_head",
                                 fix="the causal LM head stays frozen; use the freeze adapter (include_head: true) "
                                     "to train it")
        return heads

    # --- training state ---------------------------------------------------------------------
    @property
    def _params(self) -> list[tuple[str, nn.Parameter]]:
        return self._adapter_params + self._head_params

    def param_groups(self) -> list[ParamGroup]:
        require_attached(self)
        groups = [ParamGroup(self.name, list(self._adapter_params))]
        if self._head_params:
            groups.append(ParamGroup("head", list(self._head_params)))
        return groups

    def state_dict(self):
        require_attached(self)
        return tensor_state(self._params)

    def load_state_dict(self, state) -> None:
        require_attached(self)
        copy_state(self._params, state, source=f"{self.name} adapter state")

    # --- artefact ---------------------------------------------------------------------------
    def save(self, out_dir: Path, base_ref: str) -> None:
        """The adapter (and trained head) tensors, and the config and base they belong to."""
        require_attached(self)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_tensors(out_dir / WEIGHTS, self.state_dict())
        write_meta(out_dir, self.name, base_ref, self.config, parameters=[n for n, _ in self._params])

    def load(self, in_dir: Path) -> None:
        require_attached(self)
        in_dir = Path(in_dir)
        check_meta(in_dir, self.name, self.config, _SHAPING, required=False)
        copy_state(self._params, read_tensors(in_dir / WEIGHTS), source=str(in_dir / WEIGHTS))

    def merge(self) -> None:
        require_attached(self)
        raise TokentuneError(
            f"the {self.name} adapter cannot be merged into the base weights: Δ = s·{self.config.activation}"
            "(x W_down) W_up has a nonlinearity between its two matrices and is added beside the sublayer, so no "
            "change of the existing linear weights reproduces it",
            where="adapter", fix="deploy the model with the adapter attached (final/ holds its weights), or train "
                                 "lora for a mergeable adapter")


@register("adapter", "scaled_parallel_adapter", config=ScaledParallelAdapterConfig,
          description="scaled parallel adapter (He et al. 2022): s · ReLU bottleneck beside the FFN/attention; "
                      "not mergeable")
class ScaledParallelAdapter(ParallelAdapter):
    name = "scaled_parallel_adapter"
    config_cls = ScaledParallelAdapterConfig
