"""Virtual tokens inside attention: extra key/value positions that every query of a layer can see.

Prefix tuning, prompt tuning on causal models, DePT, IAPT, PTEC and MAM all come down to this. In a causal
model a prompt placed before the input never attends to the input, so its keys and values at every layer
depend on the prompt alone: running the prompt by itself (positions 0..P-1) and offering its keys/values to
the real tokens (positions shifted to P..) is exactly prompt tuning, at a cost of P tokens per forward instead
of B x P. Everything goes through the attention hook (models/attention.py), never through transformers'
cache classes, so it composes with

  packing      every packed record sees the prefix (positions restart per record, shifted by P)
  generation   the prefix is offered at every call; the KV cache only ever holds real tokens
  accumulation and selectors, which see ordinary batches.

Owners (adapters) set `before_forward`, a callable run at the start of every backbone forward that returns
{layer index: (key, value)} with shapes [1 or B, kv_heads, P, head_dim], already position-encoded.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import TokentuneError
from ..models.attention import add_attention_hook

Prefixes = dict[int, tuple[torch.Tensor, torch.Tensor]]


class VirtualTokens:
    def __init__(self, view, length: int, *, shift_positions: bool | None = None, layers=None):
        self.view, self.length = view, int(length)
        self.shift = view.is_causal if shift_positions is None else shift_positions
        self.layers = list(range(view.num_layers)) if layers is None else list(layers)
        self.before_forward: Callable[[dict], Prefixes] | None = None
        self.positions: torch.Tensor | None = None  # record-relative positions of the current forward (unshifted)
        self.enabled = True  # False: the model behaves as the bare base (reference model for DPO-style losses)
        self._prefixes: Prefixes = {}
        self._capture: Prefixes | None = None
        self._inner = False
        self._handles: list = []

    # --- installation ------------------------------------------------------------------------
    def install(self) -> None:
        _require_hookable(self.view)
        for layer in self.layers:
            self._handles += add_attention_hook(self.view, layer, self._hook_for(layer))
        self._handles.append(self.view.backbone.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        self._handles.append(self.view.backbone.register_forward_hook(self._post_forward))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def check_length(self, total: int) -> None:
        limit = getattr(self.view.model.config, "n_positions", None) if self.shift else None
        if limit is not None and total > limit:
            raise TokentuneError(
                f"{self.length} virtual tokens + {total - self.length} input tokens exceed the model's {limit} positions",
                where="adapter.num_virtual_tokens / data.max_length", fix="shorten the prompt or data.max_length")

    # --- the backbone's forward --------------------------------------------------------------------
    def _pre_forward(self, module, args, kwargs):
        if self._inner or not self.enabled:
            return None
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = _default_positions(args, kwargs)
        self.positions = positions
        self._prefixes = self.before_forward(kwargs) if self.before_forward is not None else {}
        if self.shift and positions is not None:
            self.check_length(int(positions.max()) + 1 + self.length)
            kwargs = {**kwargs, "position_ids": positions + self.length}
            return args, kwargs
        return None

    def _post_forward(self, module, args, output):
        if not self._inner:
            self._prefixes, self.positions = {}, None
        return None

    def run_alone(self, embeds: torch.Tensor) -> Prefixes:
        """Keys and values of every hooked layer when `embeds` [B, P, d] runs by itself from position 0
        (a causal prompt's own keys/values)."""
        b, p = embeds.shape[:2]
        self._capture, self._inner = {}, True
        try:
            pos = torch.arange(p, device=embeds.device).unsqueeze(0).expand(b, -1)
            self.view.backbone(inputs_embeds=embeds, position_ids=pos, use_cache=False)
            return self._capture
        finally:
            self._capture, self._inner = None, False

    # --- inside attention --------------------------------------------------------------------------
    def _hook_for(self, layer: int):
        def hook(module, query, key, value, mask, kwargs):
            if self._capture is not None:
                self._capture[layer] = (key, value)
                return query, key, value, mask
            if self._inner or not self.enabled or layer not in self._prefixes:
                return query, key, value, mask
            pk, pv = self._prefixes[layer]
            b = key.shape[0]
            pk = pk.to(key.dtype).expand(b, -1, -1, -1) if pk.shape[0] == 1 else pk.to(key.dtype)
            pv = pv.to(value.dtype).expand(b, -1, -1, -1) if pv.shape[0] == 1 else pv.to(value.dtype)
            if pk.shape[0] != b:
                raise TokentuneError(f"virtual tokens were computed for batch {pk.shape[0]} but attention runs on {b}",
                                     fix="input-dependent prompts need the same batch in every call (no beam search)")
            mask = extend_mask(mask, query.shape[2], key.shape[2], pk.shape[2], getattr(module, "is_causal", False), b)
            return query, torch.cat([pk, key], 2), torch.cat([pv, value], 2), mask

        return hook


def extend_mask(mask, q_len: int, kv_len: int, p: int, causal: bool, batch: int):
    """The attention mask with `p` always-visible columns in front of the `kv_len` real keys."""
    device = None
    if mask is None:
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool)
        if causal and q_len > 1:
            allowed = allowed.tril(kv_len - q_len)
        mask = allowed[None, None]
    else:
        device = mask.device
        mask = mask[..., :kv_len]
    if device is not None:
        mask = mask.to(device)
    shape = (*mask.shape[:-1], p)
    front = torch.ones(shape, dtype=torch.bool, device=mask.device) if mask.dtype == torch.bool \
        else torch.zeros(shape, dtype=mask.dtype, device=mask.device)
    return torch.cat([front, mask], -1)


def _default_positions(args, kwargs) -> torch.Tensor | None:
    """Positions transformers would use when none are passed: after the cache, else 0..T-1."""
    cache_position = kwargs.get("cache_position")
    ids = kwargs.get("input_ids", args[0] if args else None)
    ref = ids if ids is not None else kwargs.get("inputs_embeds")
    if ref is None:
        return None
    b, t = ref.shape[:2]
    if cache_position is not None:
        return cache_position.unsqueeze(0).expand(b, -1)
    past = kwargs.get("past_key_values")
    start = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
    return torch.arange(start, start + t, device=ref.device).unsqueeze(0).expand(b, -1)


def _require_hookable(view) -> None:
    from ..models import attention

    attention.register()
    impl = getattr(view.model.config, "_attn_implementation", None)
    if impl in ("sdpa", "eager", None):  # tokentune's attention wraps SDPA: switching keeps the numbers
        view.model.config._attn_implementation = attention.NAME
        for module in view.model.modules():
            cfg = getattr(module, "config", None)
            if cfg is not None and cfg is not view.model.config and hasattr(cfg, "_attn_implementation"):
                cfg._attn_implementation = attention.NAME


def kv_shape(view) -> tuple[int, int]:
    """(key/value heads, head dim) of the model's attention."""
    cfg = view.model.config
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return kv_heads, head_dim


def word_embeddings(view) -> nn.Embedding:
    return view.embed_tokens
