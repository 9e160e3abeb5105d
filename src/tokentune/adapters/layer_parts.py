"""Where each parameter sits in the stack, bottom to top: embeddings, blocks 0..L-1, then the top (final
norm, pooler, LM head, task head); and re-drawing modules with the model's own initialiser. The layer-wise
adapter builds its presets, freezing, LLRD groups and re-initialisation on these two pieces."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

PARTS = ("embeddings", "block", "final_norm", "pooler", "lm_head", "task_head")


@dataclass(frozen=True)
class Slot:
    name: str  # the parameter's name in model.named_parameters() (a tied weight appears once)
    param: nn.Parameter
    part: str  # one of PARTS
    layer: int | None  # block index when part == "block"
    tied: bool  # the token embedding that is also the LM head

    def depth(self, num_layers: int) -> int:
        """Layers below the top: block i is L-1-i (the top block is 0), embeddings L, everything above 0."""
        if self.part == "block":
            return num_layers - 1 - self.layer
        return num_layers if self.part == "embeddings" else 0


def pooler_of(view) -> nn.Module | None:
    """BERT-style encoders pool the first token through a dense layer that feeds the classifier; the model
    view does not name it, so it is looked up on the encoder's backbone (None when absent)."""
    return getattr(view.backbone, "pooler", None) if view.is_encoder else None


def partition(model: nn.Module, view, tied_as: str = "embedding") -> list[Slot]:
    """Every parameter of `model` once, with its part. A tied embedding/LM-head tensor is one slot whose part
    is "embeddings" (tied_as="embedding") or "lm_head" (tied_as="head")."""

    def ids(module) -> set[int]:
        return {id(p) for p in module.parameters()} if module is not None else set()

    final_norm, pooler = ids(view.final_norm), ids(pooler_of(view))
    task = set().union(*(ids(m) for m in view.task_heads.values()))
    tied = id(view.embed_tokens.weight) if view.tied_embeddings else None
    in_backbone = view.backbone_attr + "."
    out = []
    for name, p in model.named_parameters():
        layer = view.layer_of(name)
        if layer is not None:
            part = "block"
        elif id(p) == tied:
            part = "lm_head" if tied_as == "head" else "embeddings"
        elif id(p) in final_norm:
            part = "final_norm"
        elif id(p) in pooler:
            part = "pooler"
        elif id(p) in task:
            part = "task_head"
        elif name.startswith(in_backbone):
            part = "embeddings"  # the backbone below the blocks: token / position / type tables, their norm
        else:
            part = "lm_head"  # outside the backbone and not a task head: the LM head (BERT: the MLM `cls`)
        out.append(Slot(name, p, part, layer, id(p) == tied))
    return out


@torch.no_grad()
def reinitialise(model: nn.Module, modules: list[nn.Module], seed: int) -> None:
    """Re-draw `modules` with the model's own `_init_weights` (Llama / BERT: linear N(0, initializer_range),
    biases 0, norms 1 / 0; GPT-2 also scales the residual projections by 1/sqrt(2 n_layer)).

    The draws come from a forked RNG seeded with `seed`: the same seed gives the same weights, and the
    caller's RNG stream (data order, dropout) is left exactly where it was."""
    tensors = [t for m in modules for t in list(m.parameters()) + list(m.buffers())]
    # transformers skips tensors flagged as loaded from a checkpoint; lift the flag for the re-draw only.
    flags = [getattr(t, "_is_hf_initialized", None) for t in tensors]
    for t in tensors:
        t._is_hf_initialized = False
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for m in modules:
                m.apply(model._init_weights)  # children first, as transformers does (GPT-2's scaled c_proj last)
    finally:
        for t, flag in zip(tensors, flags):
            if flag is None:
                del t._is_hf_initialized
            else:
                t._is_hf_initialized = flag
