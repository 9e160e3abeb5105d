"""Conformance cases of the MAM adapter: the prefix (L x 2 x l x kv-width keys/values, or the MLP that makes them)
plus a scaled parallel adapter on every FFN (2·r·d + r + d per block), plus a fresh task head."""

from ..conformance import Case
from .parallel_adapter import count as ffn_count


def _dims(model):
    c = model.config
    heads = getattr(c, "num_attention_heads", None) or c.n_head
    d = getattr(c, "hidden_size", None) or c.n_embd
    kv_width = (getattr(c, "num_key_value_heads", None) or heads) * (d // heads)
    return getattr(c, "num_hidden_layers", None) or c.n_layer, d, kv_width


def count(model, l, r, hidden=None):
    """Prefix keys/values directly (hidden None) or the MLP embedding l·d -> hidden -> 2·L·kv-width; FFN adapters
    and the head come from the parallel adapter's formula."""
    layers, d, kv = _dims(model)
    if hidden is None:
        prefix = layers * 2 * l * kv
    else:
        out = layers * 2 * kv
        prefix = l * d + (d * hidden + hidden) + (hidden * out + out)
    return prefix + ffn_count(model, r)


CASES = [
    Case("mam_adapter", {"name": "mam_adapter", "num_virtual_tokens": 4, "prefix_hidden": 16, "r": 8, "scale": 2.0},
         families=("llama", "gpt2", "bert"), expected_trainable=lambda m: count(m, 4, 8, hidden=16),
         identity_at_init=False),
    Case("mam_adapter-direct", {"name": "mam_adapter", "num_virtual_tokens": 4, "reparameterize": False, "r": 8},
         families=("llama", "gpt2", "bert"), expected_trainable=lambda m: count(m, 4, 8), identity_at_init=False,
         e2e=False),
]
