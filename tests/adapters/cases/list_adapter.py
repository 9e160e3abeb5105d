"""Conformance cases of the LiST adapter: per adapted projection 2·r·d weights (W1: d×r, W2: r×d, no bias), counted
on the bare model from its config, plus the heads' parameters other than the output embedding (BERT's classifier)."""

from ..conformance import Case


def _dims(model):
    c = model.config
    layers = getattr(c, "num_hidden_layers", None) or c.n_layer
    return layers, getattr(c, "hidden_size", None) or c.n_embd


def _head(model):
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier."))


def count(model, r, per_layer=2, head=True):
    """The spec's formula: 2·r·d per adapted dense projection, `per_layer` of them per block (+ trainable heads)."""
    layers, d = _dims(model)
    return layers * per_layer * 2 * r * d + (_head(model) if head else 0)


CASES = [
    # W1, W2 ~ N(0, 0.02): the model is perturbed at attach (identity_at_init False); the map is linear: mergeable
    Case("list_adapter", {"name": "list_adapter", "r": 4}, families=("llama", "gpt2", "bert"),
         expected_trainable=lambda m: count(m, 4), identity_at_init=False, mergeable=True),
    Case("list_adapter-ffn-no-head", {"name": "list_adapter", "r": 4, "placement": "ffn", "train_head": False},
         families=("llama", "bert"), expected_trainable=lambda m: count(m, 4, 1, head=False),
         identity_at_init=False, mergeable=True, e2e=False),
]
