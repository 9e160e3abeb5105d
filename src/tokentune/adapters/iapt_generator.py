"""IAPT's per-layer prompt generator: from the hidden states of the instruction entering layer l to that layer's
l_sp soft tokens,

    Z = H W_down  (d -> m)     U = Pool(Z)  (l_sp rows)     U' = R_l(U)     S_l = U' W_up  (m -> d)

Pool is self-attention pooling with one learnable query per soft token (W_sa in R^{m x l_sp}): scores = Z W_sa,
a softmax over the instruction positions only (padding and the response get weight exactly 0), U = alpha^T Z.
Because Z is linear in H, the scores are computed as H (W_down W_sa) and the pooling as (alpha^T H) W_down: the
same numbers, without projecting every token to m dimensions.

Records: a packed row carries several records, each with its own instruction; `members` [B, R, T] says which
tokens are the instruction of record r, and the generator returns S [B, R, l_sp, d]. A record with no
instruction token (a padding segment) pools to U = 0 instead of dividing by zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .iapt_rational import DENOMINATOR_ORDER, NUMERATOR_ORDER, RationalActivation

RATIONAL_PARAMS = (NUMERATOR_ORDER + 1) + DENOMINATOR_ORDER  # 12 coefficients per layer


def parameter_count(hidden: int, layers: int, bottleneck: int, soft_tokens: int, share: bool = False) -> int:
    """The spec's count: per layer 2 d m (W_down, W_up, no biases) + m l_sp (the pooler, in the bottleneck space)
    + 12 (the rational). With cross-layer sharing the projections and pooler exist once, the rationals per layer.
    LLaMA-2 7B (d 4096, 32 layers, m 320, l_sp 4): 83,927,424 (MiLoRA reports 83.9M)."""
    projections = 2 * hidden * bottleneck + bottleneck * soft_tokens
    return (projections if share else layers * projections) + layers * RATIONAL_PARAMS


def config_parameter_count(model_config, bottleneck: int = 320, soft_tokens: int = 4, share: bool = False) -> int:
    """parameter_count read off a transformers config (hidden_size / n_embd, num_hidden_layers / n_layer)."""
    hidden = getattr(model_config, "hidden_size", None) or model_config.n_embd
    layers = getattr(model_config, "num_hidden_layers", None) or model_config.n_layer
    return parameter_count(hidden, layers, bottleneck, soft_tokens, share)


class Projections(nn.Module):
    """W_down [m, d], the pooler's queries W_sa [m, l_sp] and W_up [d, m] (nn.Linear layout, no biases)."""

    def __init__(self, hidden: int, bottleneck: int, soft_tokens: int):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck, bias=False)
        # Distinct random queries: with equal ones the l_sp soft tokens would stay identical forever.
        self.pool = nn.Parameter(torch.randn(bottleneck, soft_tokens) / math.sqrt(bottleneck))
        self.up = nn.Linear(bottleneck, hidden, bias=False)


def pool_weights(hidden: torch.Tensor, queries: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """alpha [B, R, T, l_sp]: per record, a softmax of hidden @ queries over its member positions, exactly 0
    elsewhere; all 0 for a record without members. hidden [B, T, d], queries [d, l_sp], members [B, R, T] bool."""
    scores = (hidden.float() @ queries.float()).unsqueeze(1)  # [B, 1, T, l_sp]
    keep = members.unsqueeze(-1)  # [B, R, T, 1]
    # finfo.min underflows to an exact 0 after the softmax's max subtraction; an empty record softmaxes a
    # constant row (finite) and is then zeroed, so no NaN reaches the backward pass.
    masked = scores.masked_fill(~keep, torch.finfo(torch.float32).min)
    return torch.softmax(masked, dim=2) * keep


class IaptGenerators(nn.Module):
    """The generators of every layer. share=True: one set of projections for all layers (rationals stay per
    layer: the point of learning them is that layers prefer different activations)."""

    def __init__(self, hidden: int, layers: int, bottleneck: int, soft_tokens: int, share: bool = False):
        super().__init__()
        self.hidden, self.soft_tokens, self.share = hidden, soft_tokens, share
        self.projections = nn.ModuleList(Projections(hidden, bottleneck, soft_tokens)
                                         for _ in range(1 if share else layers))
        self.activations = nn.ModuleList(RationalActivation() for _ in range(layers))

    def projection(self, layer: int) -> Projections:
        return self.projections[0 if self.share else layer]

    def activation_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"activations.{n}", p) for n, p in self.activations.named_parameters()]

    def projection_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"projections.{n}", p) for n, p in self.projections.named_parameters()]

    def forward(self, layer: int, hidden: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """S [B, R, l_sp, d] from the hidden states entering `layer` [B, T, d] and the instruction of each
        record `members` [B, R, T]."""
        proj = self.projection(layer)
        with torch.autocast(hidden.device.type, enabled=False):  # fp32: masked softmax and x^6 in the rational
            down = proj.down.weight.float()  # [m, d]
            alpha = pool_weights(hidden, down.t() @ proj.pool.float(), members)  # Z W_sa == H (W_down W_sa)
            pooled = torch.einsum("brtp,btd->brpd", alpha, hidden.float())  # alpha^T H
            u = pooled @ down.t()  # (alpha^T H) W_down == alpha^T Z: [B, R, l_sp, m]
            return self.activations[layer](u) @ proj.up.weight.float().t()
