"""The LoRA wrapper: base(x) + scale * B(A(dropout(x))), laid out like PEFT's (base_layer, lora_A, lora_B,
lora_dropout) so that parameter names map one to one onto PEFT's adapter file."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import TokentuneError


def linear_shape(module: nn.Module, name: str) -> tuple[int, int]:
    """(in_features, out_features) of a layer LoRA can wrap."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):  # GPT-2: weight is [in, out]
        return module.weight.shape[0], module.weight.shape[1]
    raise TokentuneError(f"LoRA cannot wrap {name} ({type(module).__name__})", where="adapter.target_regex",
                         fix="LoRA wraps nn.Linear and transformers' Conv1D; narrow the targets to projections")


class LoraLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, name: str, r: int, alpha: float, dropout: float, rslora: bool):
        super().__init__()
        in_features, out_features = linear_shape(base_layer, name)
        weight = base_layer.weight
        if not weight.is_floating_point():
            raise TokentuneError(f"LoRA cannot wrap {name}: its weight is {weight.dtype}, not floating point",
                                 fix="load the base model unquantised")
        # Half-precision bases keep fp32 adapters (as PEFT does): tiny updates vanish in bf16.
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=weight.device, dtype=dtype)
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        # PEFT's default init: A kaiming-uniform, B zero, so the wrapped layer starts as the base layer.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.disabled = False  # True: the base layer alone (a reference model without a second copy)

    # Code that reads `proj.weight` (dtype checks, probes) keeps seeing the base weight.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.disabled:
            return out
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return out + (delta * self.scale).to(out.dtype)

    @torch.no_grad()
    def merge_into_base(self) -> nn.Module:
        """Add scale * B @ A to the base weight (transposed for Conv1D) and return the base layer."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scale  # [out, in], in the adapter's fp32
        weight = self.base_layer.weight
        weight += (delta.T if self.fan_in_fan_out else delta).to(weight.dtype)
        return self.base_layer
