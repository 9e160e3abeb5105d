"""The attention hook: one attention function registered with transformers' attention registry.

It wraps SDPA and, before calling it, runs the hooks registered on that layer's attention module. Prefix
and prompt methods, attention-based token scores and token elimination act here, without patching
transformers' cache classes.
"""

from __future__ import annotations

from typing import Callable


from torch import nn

NAME = "tokentune"

# hook(module, query, key, value, attention_mask, kwargs) -> (query, key, value, attention_mask)
AttentionHook = Callable[..., tuple]


def tokentune_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    for hook in getattr(module, "_tokentune_hooks", ()):
        query, key, value, attention_mask = hook(module, query, key, value, attention_mask, kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    """Make `attn_implementation="tokentune"` valid (idempotent). Masks are built as for SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, tokentune_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def attention_modules(layer: nn.Module) -> list[nn.Module]:
    """The innermost attention modules of one block (LlamaAttention, GPT2Attention, BertSelfAttention)."""
    found = []
    for mod in layer.modules():
        if "Attention" in type(mod).__name__ and not any(
            "Attention" in type(c).__name__ for c in mod.children()
        ):
            found.append(mod)
    return found


class HookHandle:
    def __init__(self, module: nn.Module, hook: AttentionHook):
        self.module, self.hook = module, hook

    def remove(self) -> None:
        hooks = getattr(self.module, "_tokentune_hooks", [])
        if self.hook in hooks:
            hooks.remove(self.hook)


def add_attention_hook(view, layer_index: int, hook: AttentionHook) -> list[HookHandle]:
    """Run `hook` inside every attention call of block `layer_index`. Requires the tokentune
    attention implementation (model.attn_implementation: tokentune)."""
    from ..errors import TokentuneError

    impl = getattr(view.model.config, "_attn_implementation", None)
    if impl != NAME:
        raise TokentuneError(
            f"attention hooks need model.attn_implementation: {NAME} (this model uses {impl!r})",
            where="model.attn_implementation", fix=f"set model.attn_implementation: {NAME}",
        )
    handles = []
    for mod in attention_modules(view.layers[layer_index]):
        if not hasattr(mod, "_tokentune_hooks"):
            mod._tokentune_hooks = []
        mod._tokentune_hooks.append(hook)
        handles.append(HookHandle(mod, hook))
    return handles


