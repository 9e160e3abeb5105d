"""The parallel bottleneck of He et al. (2022) and where it sits in a block.

    Δ(x) = s · up(dropout(f(down(x))))        down: d -> r, up: r -> d, both with bias

As in the reference code (petl_factory.Adapter_Layer), the scale multiplies the whole up-projection, bias
included; with the "lora" init (down Kaiming-uniform, up and both biases zero) Δ is exactly 0 at attach.

Placement. A sublayer is the module that owns a block's output projection: the parent of the "down"
projection (FFN) or of the "o" projection (attention), so the model view decides it for every family.
  pre-LN decoders (Llama, GPT-2)   x = the sublayer's input (after its pre-norm); Δ(x) is added to the
                                   sublayer's output, before the residual (the reference's hi_lnbefore=0)
  post-LN encoders (BERT)          the sublayer's parent is BertOutput / BertSelfOutput, which computes
                                   LN(dropout(dense(h)) + x) from the sublayer input x; adding Δ(x) to x
                                   there gives LN(x + F(x) + Δ(x)), the reference's placement
Δ enters through forward hooks, so no base module is replaced and every parameter name stays as it was;
the bottleneck lives as a child `parallel_adapter` of the sublayer module.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from ..errors import TokentuneError

CHILD = "parallel_adapter"
Placement = Literal["ffn", "attn", "both"]
Activation = Literal["relu", "gelu", "silu", "tanh"]
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
_ROLE = {"ffn": "down", "attn": "o"}


class Bottleneck(nn.Module):
    def __init__(self, d: int, r: int, *, activation: Activation, dropout: float, scale: float, learn_scale: bool,
                 init: Literal["lora", "bert"], device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(d, r, device=device, dtype=dtype)
        self.up = nn.Linear(r, d, device=device, dtype=dtype)
        self.act = _ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if learn_scale:
            self.scale = nn.Parameter(torch.full((1,), float(scale), device=device, dtype=dtype))
        else:
            self.scale = float(scale)
        with torch.no_grad():
            if init == "lora":
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
                nn.init.zeros_(self.up.weight)
            else:  # "bert": the reference's init_bert_weights (used for its Houlsby baseline); Δ != 0 at start
                nn.init.normal_(self.down.weight, std=0.02)
                nn.init.normal_(self.up.weight, std=0.02)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.act(self.down(x.to(self.down.weight.dtype))))
        return (self.up(h) * self.scale).to(x.dtype)


def sublayers(view, placement: Placement) -> dict[str, nn.Module]:
    """Full module names -> the sublayer modules the adapter sits beside, in block order."""
    kinds = ("attn", "ffn") if placement == "both" else (placement,)
    found: dict[str, nn.Module] = {}
    for kind in kinds:
        for name in view.modules_for_roles([_ROLE[kind]]):
            parent = name.rpartition(".")[0]
            found[parent] = view.model.get_submodule(parent)
    return dict(sorted(found.items(), key=lambda kv: (view.layer_of(kv[0] + ".x"), kv[0])))


def hidden_size(view) -> int:
    return view.embed_tokens.weight.shape[1]


def model_dropout(view) -> float:
    """The model's own dropout on hidden states, which the reference code gives its adapters (BERT's
    hidden_dropout_prob, GPT-2's resid_pdrop); Llama-family models have none, so 0."""
    cfg = view.model.config
    for key in ("hidden_dropout_prob", "resid_pdrop", "hidden_dropout"):
        value = getattr(cfg, key, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0


def _add_to_output(module, args, kwargs, output):
    x = args[0] if args else kwargs["hidden_states"]
    delta = getattr(module, CHILD)(x)
    if isinstance(output, tuple):  # attention modules return (output, weights)
        return (output[0] + delta, *output[1:])
    return output + delta


def _add_to_residual_input(module, args, kwargs):
    # BertOutput / BertSelfOutput.forward(hidden_states, input_tensor): Δ joins the residual input.
    if len(args) > 1:
        x = args[1]
        return (args[0], x + getattr(module, CHILD)(x), *args[2:]), kwargs
    x = kwargs["input_tensor"]
    return args, {**kwargs, "input_tensor": x + getattr(module, CHILD)(x)}


def install(view, name: str, module: nn.Module, bottleneck: Bottleneck) -> list:
    """Put `bottleneck` beside the sublayer `module`; returns the hook handles."""
    if hasattr(module, CHILD):
        raise TokentuneError(f"{name} already has a parallel adapter", where="adapter",
                             fix="attach one parallel adapter per model (MAM already includes one on the FFN)")
    module.add_module(CHILD, bottleneck.train(module.training))  # a new module would start in training mode
    if view.is_encoder:
        return [module.register_forward_pre_hook(_add_to_residual_input, with_kwargs=True)]
    return [module.register_forward_hook(_add_to_output, with_kwargs=True)]
