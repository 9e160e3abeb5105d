"""The DSEE wrapper: h = x (W ⊙ S₁)ᵀ + c · x (UV + S₂)ᵀ, with S₂ non-zero only on a fixed support Ω.

S₂ is parametrised by its N values on Ω (a trainable vector) and Ω's flat indices (a buffer), so it is exactly
zero off Ω at any step. The pruning mask S₁ is applied to the frozen pretrained weight in place (pruned
entries become 0); it never touches UV or S₂. Laid out like the official code (lora_A = V, lora_B = U).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..errors import TokentuneError
from .lora_layer import linear_shape


def oriented(weight: Tensor, fan_in_fan_out: bool) -> Tensor:
    """The weight as [out, in] (GPT-2's Conv1D stores [in, out])."""
    return weight.T if fan_in_fan_out else weight


class DseeLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, name: str, r: int, alpha: float, support: Tensor):
        super().__init__()
        in_features, out_features = linear_shape(base_layer, name)
        weight = base_layer.weight
        if not weight.is_floating_point():
            raise TokentuneError(f"DSEE cannot wrap {name}: its weight is {weight.dtype}, not floating point",
                                 fix="load the base model unquantised")
        # Half-precision bases keep fp32 adapters: tiny updates vanish in bf16.
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.base_layer = base_layer
        self.name = name
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.in_features, self.out_features = in_features, out_features
        self.lora_A = nn.Linear(in_features, r, bias=False, device=weight.device, dtype=dtype)  # V: r × n
        self.lora_B = nn.Linear(r, out_features, bias=False, device=weight.device, dtype=dtype)  # U: m × r
        self.sparse_values = nn.Parameter(torch.zeros(support.numel(), device=weight.device, dtype=dtype))
        self.register_buffer("sparse_index", support.to(weight.device, torch.long).clone(), persistent=False)
        self.scale = alpha / r  # the code scales the low-rank and the sparse term alike
        # The official code's init: lora_a ~ N(0, 0.02), lora_b = 0, S₂ = 0: the first forward is the base model.
        nn.init.normal_(self.lora_A.weight, std=0.02)
        nn.init.zeros_(self.lora_B.weight)

    # Code that reads `proj.weight` (dtype checks, probes) keeps seeing the base weight.
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def set_support(self, index: Tensor, where: str) -> None:
        index = index.to(self.sparse_index.device, torch.long)
        size = self.in_features * self.out_features
        ok = (index.shape == self.sparse_index.shape
              and (index.numel() == 0 or (int(index.min()) >= 0 and int(index.max()) < size))
              and index.unique().numel() == index.numel())
        if not ok:
            raise TokentuneError(f"{self.name}: the saved sparse support is not {self.sparse_index.numel()} distinct "
                                 f"entries of a {self.out_features}x{self.in_features} matrix", where=where,
                                 fix="load state saved by a DSEE adapter with the same num_sparse and base model")
        self.sparse_index.copy_(index)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        h = x.to(self.lora_A.weight.dtype)
        delta = self.lora_B(self.lora_A(h))
        if self.sparse_index.numel():
            rows = self.sparse_index // self.in_features
            cols = self.sparse_index % self.in_features
            # (x S₂ᵀ)_i = Σ_{(i,j) ∈ Ω} S₂[i, j] x_j: gather the N inputs, scatter-add into their output rows.
            delta = delta.index_add(-1, rows, h[..., cols] * self.sparse_values)
        return out + (delta * self.scale).to(out.dtype)

    def sparse_dense(self) -> Tensor:
        """S₂ as a dense [out, in] matrix (zero off Ω by construction)."""
        flat = torch.zeros(self.out_features * self.in_features, device=self.sparse_values.device,
                           dtype=self.sparse_values.dtype)
        return flat.index_put((self.sparse_index,), self.sparse_values).view(self.out_features, self.in_features)

    def update(self) -> Tensor:
        """c · (UV + S₂) as [out, in], in the adapter's dtype."""
        return (self.lora_B.weight @ self.lora_A.weight + self.sparse_dense()) * self.scale

    @torch.no_grad()
    def merge_into_base(self) -> nn.Module:
        """W ⊙ S₁ + c (UV + S₂) into the base weight (which already holds W ⊙ S₁); return the base layer."""
        weight = self.base_layer.weight
        update = self.update()
        weight += (update.T if self.fan_in_fan_out else update).to(weight.dtype)
        return self.base_layer


# --- pruning masks travel bit-packed (n/8 bytes) ---------------------------------------------------

_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_mask(mask: Tensor) -> Tensor:
    flat = mask.flatten().to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BITS.to(flat.device)).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, shape: torch.Size) -> Tensor:
    bits = packed.to(torch.uint8).unsqueeze(-1) & _BITS.to(packed.device)
    numel = 1
    for d in shape:
        numel *= d
    return (bits != 0).flatten()[:numel].view(shape)
