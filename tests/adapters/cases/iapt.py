"""Conformance cases of IAPT: per layer 2 d m + m l_sp + 12 (projections, pooler queries, rational), computed here
from the bare model's config (plus a fresh classifier on encoders)."""

from ..conformance import Case


def _dims(model):
    c = model.config
    return (getattr(c, "hidden_size", None) or c.n_embd), (getattr(c, "num_hidden_layers", None) or c.n_layer)


def _head(model):
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier."))


def _per_layer(model, m=8, p=4):
    d, layers = _dims(model)
    return layers * (2 * d * m + m * p + 7 + 5) + _head(model)


def _shared(model, m=8, p=2):
    d, layers = _dims(model)
    return 2 * d * m + m * p + layers * (7 + 5) + _head(model)


CASES = [
    Case("iapt", {"name": "iapt", "bottleneck": 8}, families=("llama", "gpt2", "bert"),
         expected_trainable=_per_layer, identity_at_init=False),
    Case("iapt-shared", {"name": "iapt", "bottleneck": 8, "soft_tokens": 2, "share_across_layers": True,
                         "soft_token_positions": "none", "bilevel": False},
         families=("llama", "gpt2"), expected_trainable=_shared, identity_at_init=False, e2e=False),
]
