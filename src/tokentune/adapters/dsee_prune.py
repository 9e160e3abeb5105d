"""DSEE Phase II, the pruning of the final weights.

unstructured  one-shot global magnitude pruning: the lowest-scoring fraction of entries over all matrices of a
              group together (so per-matrix sparsity differs) becomes 0 in the pretrained weight (mask S₁).
structured    learnable coefficients ξ on every attention head (inputs of the attention output projection)
              and every FFN neuron (inputs of the down projection), trained with an L1 penalty; then the
              lowest-|ξ| heads (the same fraction in every block) and FFN neurons are removed (ξ := 0, kept 1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..errors import TokentuneError
from .lora_layer import linear_shape


@torch.no_grad()
def global_keep_masks(scores: dict[str, Tensor], fraction: float) -> dict[str, Tensor]:
    """Keep masks (True = kept) shaped like each score: exactly round(fraction · total) of the lowest scores,
    over all matrices together, are pruned (ties broken by position)."""
    names = list(scores)
    device = scores[names[0]].device
    flat = torch.cat([scores[n].detach().float().flatten().to(device) for n in names])
    k = round(fraction * flat.numel())
    pruned = torch.zeros(flat.shape, dtype=torch.bool, device=device)
    if k:
        kth = flat.kthvalue(k).values
        pruned = flat < kth
        ties = (flat == kth).nonzero().flatten()[: k - int(pruned.sum())]
        pruned[ties] = True
    keep, start = {}, 0
    for n in names:
        size = scores[n].numel()
        keep[n] = ~pruned[start:start + size].view(scores[n].shape)
        start += size
    return keep


def fold_input_scale(module: nn.Module, scale: Tensor) -> None:
    """Scale the input features of a Linear / Conv1D inside its weight: layer(x * s) == folded(x)."""
    weight = module.weight
    with torch.no_grad():
        s = scale.detach().to(weight.device, weight.dtype)
        weight.mul_(s[:, None] if isinstance(module, Conv1D) else s[None, :])


class Coefficients(nn.Module):
    """ξ of one block: one per attention head, one per FFN neuron (either may be absent)."""

    def __init__(self, heads: int, neurons: int, device):
        super().__init__()
        self.heads = nn.Parameter(torch.ones(heads, device=device)) if heads else None
        self.ffn = nn.Parameter(torch.ones(neurons, device=device)) if neurons else None


def _scale_input(coef: nn.Parameter, repeat: int):
    def hook(module, args):
        x = args[0]
        scale = coef.repeat_interleave(repeat) if repeat > 1 else coef
        return (x * scale.to(x.dtype),) + tuple(args[1:])

    return hook


class StructuredPruning:
    """Owns the ξ coefficients of every block: attach, L1 subgradient, prune, fold into the weights."""

    def __init__(self, head_sparsity: float, ffn_sparsity: float, l1_penalty: float):
        self.head_sparsity, self.ffn_sparsity, self.l1 = head_sparsity, ffn_sparsity, l1_penalty
        self.blocks: list[tuple[nn.Module, Coefficients, str, str]] = []  # (block, ξ, o name, down name)
        self.handles = []

    def attach(self, model: nn.Module, view) -> None:
        """Call after the DSEE wrappers are in place: the hooks go on whatever module sits at o / down."""
        heads = getattr(view.model.config, "num_attention_heads", None)
        if not heads:
            raise TokentuneError(f"{view.model_type} does not say its number of attention heads",
                                 where="adapter.pruning", fix="use pruning: unstructured")
        o_names, down_names = list(view.modules_for_roles(["o"])), list(view.modules_for_roles(["down"]))
        for i, (block, o_name, down_name) in enumerate(zip(view.layers, o_names, down_names)):
            o_in, _ = linear_shape(model.get_submodule(o_name), o_name)
            down_in, _ = linear_shape(model.get_submodule(down_name), down_name)
            if o_in % heads:
                raise TokentuneError(f"{o_name} takes {o_in} inputs, not a multiple of {heads} heads",
                                     where="adapter.pruning", fix="use pruning: unstructured")
            for what, count, size in (("heads", heads, self.head_sparsity),
                                      ("FFN neurons", down_in, self.ffn_sparsity)):
                if round(size * count) >= count:
                    raise TokentuneError(f"pruning {size:.0%} of {count} {what} per block would remove all of them",
                                         where="adapter", fix="choose a smaller fraction")
            coef = Coefficients(heads if self.head_sparsity else 0, down_in if self.ffn_sparsity else 0,
                                device=view.embed_tokens.weight.device)
            block.dsee_coef = coef
            if coef.heads is not None:
                self.handles.append(model.get_submodule(o_name).register_forward_pre_hook(
                    _scale_input(coef.heads, o_in // heads)))
            if coef.ffn is not None:
                self.handles.append(model.get_submodule(down_name).register_forward_pre_hook(
                    _scale_input(coef.ffn, 1)))
            self.blocks.append((block, coef, o_name, down_name))
        self.prefixes = [view.layer_prefix(i) + "dsee_coef." for i in range(len(self.blocks))]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(prefix + n, p) for prefix, (_, coef, _, _) in zip(self.prefixes, self.blocks)
                for n, p in coef.named_parameters()]

    def add_l1_gradient(self) -> None:
        """d/dξ of l1 · ‖ξ‖₁ added to the task-loss gradient (the trainer's loss is already a mean)."""
        for _, p in self.named_parameters():
            g = self.l1 * torch.sign(p.detach())
            p.grad = g if p.grad is None else p.grad + g

    @torch.no_grad()
    def prune(self) -> dict[str, float]:
        """In every block, ξ of the lowest-|ξ| heads / neurons := 0, of the rest := 1. From then on ξ is fixed:
        drop_grads() after every backward (ξ keeps requires_grad, so DDP's set of parameters never changes)."""
        for _, coef, _, _ in self.blocks:
            for p, fraction in ((coef.heads, self.head_sparsity), (coef.ffn, self.ffn_sparsity)):
                if p is None:
                    continue
                keep = torch.ones_like(p)
                keep[p.abs().topk(round(fraction * p.numel()), largest=False).indices] = 0
                p.copy_(keep)
        self.drop_grads()
        return {"heads_kept": self._kept("heads"), "ffn_kept": self._kept("ffn")}

    def drop_grads(self) -> None:
        for _, p in self.named_parameters():
            p.grad = None  # AdamW skips a parameter without a gradient: no update, no decay

    def _kept(self, which: str) -> float:
        vals = [getattr(c, which) for _, c, _, _ in self.blocks if getattr(c, which) is not None]
        return float(torch.cat(vals).ne(0).float().mean()) if vals else 1.0

    def fold_and_remove(self, model: nn.Module) -> None:
        """Scale the o / down weights' input features by ξ and drop the hooks and coefficients (exact)."""
        for h in self.handles:
            h.remove()
        for block, coef, o_name, down_name in self.blocks:
            if coef.heads is not None:
                o = model.get_submodule(o_name)
                fold_input_scale(o, coef.heads.repeat_interleave(linear_shape(o, o_name)[0] // coef.heads.numel()))
            if coef.ffn is not None:
                fold_input_scale(model.get_submodule(down_name), coef.ffn)
            del block.dsee_coef
        self.handles, self.blocks = [], []
