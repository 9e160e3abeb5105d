"""IAPT inside the forward: which tokens are each record's instruction, the soft tokens of every layer made from
the hidden states entering that layer, and their keys/values offered to that layer's attention.

Per backbone forward (VirtualTokens' `before_forward`, which also shifts input positions by l_sp when the soft
tokens sit at positions 0..l_sp-1):
  records       one per row; a packed row (explicit position ids that restart, no 2-D mask, no cache: the same
                rule transformers uses for its block-diagonal mask) holds one record per position run
  instruction   with a batch in scope (adapter.before_batch): the attended tokens of a record before its first
                labelled token (labels == -100 and attention_mask == 1, cut at the response so that a later user
                turn of a chat never leaks backwards); without one: every attended token (generation: the prompt)
Per layer (a forward pre-hook on the block): S_l = generator(H_l), then the layer's own frozen input norm and k/v
projections (+ its RoPE at positions 0..l_sp-1) turn S_l into real keys/values, exactly as if the l_sp soft tokens
were hidden states entering the layer; the attention hook puts them in front of the real keys. A token of record r
sees only record r's soft tokens.
Generation: on the first call (empty cache) S_l is computed from the prompt; the keys/values are kept with the
identity of the cache and reused while that cache grows, so new tokens never change them.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass

import torch

from ..errors import TokentuneError
from ..models.attention import add_attention_hook, attention_modules
from .virtual_tokens import VirtualTokens, extend_mask, kv_shape

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED = LLAMA_LIKE + ("gpt2", "bert", "roberta", "xlm-roberta")


def require_supported(view) -> None:
    if view.model_type not in SUPPORTED:
        raise TokentuneError(
            f"iapt computes its soft tokens' keys/values with each layer's own norm and projections, which it knows "
            f"for {', '.join(SUPPORTED)}; this model is {view.model_type!r}", where="model.name",
            fix="use one of those families, or teach adapters/iapt_runtime.py:soft_kv this family's attention")


def soft_kv(view, layer: int, hidden: torch.Tensor, positions: torch.Tensor | None):
    """Keys and values [B, kv_heads, N, head_dim] that block `layer` computes for `hidden` [B, N, d] entering it
    (pre-attention norm, k/v projections, per-head k norm where the family has one, RoPE at `positions` [N])."""
    block = view.layers[layer]
    heads, head_dim = kv_shape(view)
    b, n, _ = hidden.shape
    if view.model_type == "gpt2":
        attn = block.attn
        _, k, v = attn.c_attn(block.ln_1(hidden)).split(attn.split_size, dim=2)
    elif view.is_encoder:  # post-norm encoders: the block's input goes straight into the projections
        attn = attention_modules(block)[0]
        k, v = attn.key(hidden), attn.value(hidden)
    else:
        attn, x = block.self_attn, block.input_layernorm(hidden)
        k, v = attn.k_proj(x), attn.v_proj(x)
    k, v = k.view(b, n, heads, head_dim), v.view(b, n, heads, head_dim)
    if hasattr(attn, "k_norm"):  # Qwen3: RMSNorm over each head
        k = attn.k_norm(k)
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    if positions is not None and view.model_type in LLAMA_LIKE:
        cos, sin = view.backbone.rotary_emb(v, positions.unsqueeze(0).expand(b, -1))
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the family's own RoPE
        _, k = rotate(k, k, cos, sin)
    return k, v


def leading_unlabelled(labelled: torch.Tensor, segments: torch.Tensor, records: int) -> torch.Tensor:
    """[B, T] bool: the token comes before the first labelled token of its record (segment)."""
    lab = labelled.long()
    upto = lab.cumsum(-1)  # labelled tokens of the row up to and including t
    before = torch.full((lab.shape[0], records), lab.shape[1] + 1, dtype=lab.dtype, device=lab.device)
    before = before.scatter_reduce(1, segments, upto - lab, "amin")  # count before each record's first token
    return (upto - before.gather(1, segments)) == 0


@dataclass
class Plan:
    members: torch.Tensor  # [B, R, T] bool: token t is part of record r's instruction
    visible: torch.Tensor | None  # [B, 1, T, R * l_sp] bool: which soft tokens each query may see (None: all)


class IaptRuntime:
    def __init__(self, view, generators, soft_tokens: int, *, positions: str):
        self.view, self.generators, self.soft_tokens = view, generators, soft_tokens
        self.rope = positions == "prefix"
        self.vt = VirtualTokens(view, soft_tokens, shift_positions=view.is_causal and self.rope, layers=[])
        self.vt.before_forward = self._start
        self.batch: dict | None = None  # set by the adapter's before_batch
        self.generator_calls = 0  # how often a layer's soft tokens were generated (tests: once per generation)
        self._pending: dict | None = None
        self._plan: Plan | None = None
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cached: tuple[weakref.ref, dict] | None = None  # (a generation's cache, its keys/values)
        self._reuse = False
        self.vt.install()
        self._handles = [view.backbone.register_forward_hook(self._finish)]
        for i, block in enumerate(view.layers):
            self._handles.append(block.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
            self._handles += add_attention_hook(view, i, self._attention_hook(i))

    @property
    def enabled(self) -> bool:
        return self.vt.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.vt.enabled = value

    def remove(self) -> None:
        self.vt.remove()
        for handle in self._handles:
            handle.remove()

    # --- the backbone's forward ----------------------------------------------------------------------
    def _start(self, kwargs) -> dict:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        self._kv, self._plan, self._reuse = {}, None, seen > 0
        if self._reuse:
            if self._cached is None or self._cached[0]() is not cache:
                raise TokentuneError(
                    "iapt generates its prompts on the first call of a generation (empty cache) and reuses them; "
                    "this call continues a cache whose first call it did not see",
                    fix="start generation from an empty cache (model.generate does), with the adapter attached")
            self._kv = self._cached[1]
            return {}
        use_cache = kwargs.get("use_cache")
        use_cache = getattr(self.view.model.config, "use_cache", False) if use_cache is None else use_cache
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise TokentuneError(f"iapt reads the instruction from a 2-D attention mask; got shape {tuple(mask.shape)}",
                                 fix="pass attention_mask as [batch, tokens] of 0/1")
        packed = (self.view.is_causal and kwargs.get("position_ids") is not None and mask is None and cache is None
                  and not use_cache)
        self._pending = {"positions": self.vt.positions, "mask": mask, "packed": packed}
        return {}

    def _finish(self, module, args, output):
        """Keeps this forward's keys/values for a generation that continues its cache. They also stay until the
        next forward starts: gradient checkpointing replays attention (not the block's pre-hooks) in backward."""
        if self.enabled and self._kv and not self._reuse:
            cache = output.get("cache") if isinstance(output, dict) else None  # the cache this forward filled
            self._cached = (weakref.ref(cache), dict(self._kv)) if cache is not None else None
        self._pending = None
        return None

    def _make_plan(self, b: int, t: int, device) -> Plan:
        pending = self._pending
        positions = pending["positions"]
        positions = torch.arange(t, device=device).expand(b, t) if positions is None else positions.expand(b, t)
        if pending["packed"]:
            step = torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1)
            segments = (step != 1).long().cumsum(-1)  # transformers' find_packed_sequence_indices
        else:
            segments = torch.zeros(b, t, dtype=torch.long, device=device)
        records = int(segments.max()) + 1
        if self.batch is not None:
            ids = self.batch["input_ids"]
            if tuple(ids.shape) != (b, t):
                raise TokentuneError(
                    f"iapt reads the instruction tokens from the batch ({tuple(ids.shape)}), but the model runs on "
                    f"{(b, t)} tokens", where="adapter / objective / selectors",
                    fix="iapt needs the forward to see the batch's own input_ids (no objective that rebuilds the "
                        "inputs, no selector that removes tokens)")
            attended = self.batch["attention_mask"].to(device).bool()
            labelled = self.batch["labels"].to(device) != -100
            instruction = attended & leading_unlabelled(labelled, segments, records)
        else:
            mask = pending["mask"]
            instruction = torch.ones(b, t, dtype=torch.bool, device=device) if mask is None else mask.bool()
        ids = torch.arange(records, device=device)
        members = (segments.unsqueeze(1) == ids[None, :, None]) & instruction.unsqueeze(1)
        visible = None
        if records > 1:
            visible = (segments[:, None, :, None] == ids).repeat_interleave(self.soft_tokens, -1)
        return Plan(members, visible)

    # --- per layer ------------------------------------------------------------------------------------
    def _layer_hook(self, layer: int):
        def hook(module, args, kwargs):
            if not self.enabled or self._reuse or self._pending is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if self._plan is None:
                self._plan = self._make_plan(hidden.shape[0], hidden.shape[1], hidden.device)
            s = self.generators(layer, hidden, self._plan.members)  # [B, R, l_sp, d]
            self.generator_calls += 1
            b, r, p, d = s.shape
            positions = torch.arange(p, device=s.device).repeat(r) if self.rope else None
            self._kv[layer] = soft_kv(self.view, layer, s.reshape(b, r * p, d).to(hidden.dtype), positions)
            return None

        return hook

    def _attention_hook(self, layer: int):
        def hook(module, query, key, value, mask, kwargs):
            if not self.enabled or layer not in self._kv:
                return query, key, value, mask
            pk, pv = self._kv[layer]
            b, n = key.shape[0], pk.shape[2]
            if pk.shape[0] != b:
                raise TokentuneError(f"iapt's prompts were made for batch {pk.shape[0]} but attention runs on {b}",
                                     fix="keep the batch fixed during generation (no beam search that changes it)")
            mask = extend_mask(mask, query.shape[2], key.shape[2], n, getattr(module, "is_causal", False), b)
            if self._plan is not None and self._plan.visible is not None:
                mask = _only_own_record(mask, self._plan.visible, n)
            return query, torch.cat([pk.to(key.dtype), key], 2), torch.cat([pv.to(value.dtype), value], 2), mask

        return hook


def _only_own_record(mask: torch.Tensor, visible: torch.Tensor, n: int) -> torch.Tensor:
    """Hide the first `n` (soft-token) columns of `mask` from queries of other records."""
    front, rest = mask[..., :n], mask[..., n:]
    if front.dtype == torch.bool:
        front = front & visible
    else:
        front = front.masked_fill(~visible, torch.finfo(front.dtype).min)
    lead = front.shape[:-1]
    return torch.cat([front, rest.expand(*lead, rest.shape[-1])], -1)
