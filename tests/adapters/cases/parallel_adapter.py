"""Conformance cases of the parallel adapters: per adapted sublayer 2·r·d weights + r + d biases (+1 learned s),
counted on the bare model from its config, plus a fresh task head (BERT's classifier)."""

from ..conformance import Case


def _dims(model):
    c = model.config
    layers = getattr(c, "num_hidden_layers", None) or c.n_layer
    return layers, getattr(c, "hidden_size", None) or c.n_embd


def _head(model):
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier."))


def count(model, r, per_layer=1, learn_scale=False):
    """The spec's formula: 2·r·d (+ biases r + d) per adapted sublayer, `per_layer` sublayers per block."""
    layers, d = _dims(model)
    return layers * per_layer * (2 * r * d + r + d + int(learn_scale)) + _head(model)


CASES = [
    Case("parallel_adapter", {"name": "parallel_adapter", "r": 8}, families=("llama", "gpt2", "bert"),
         expected_trainable=lambda m: count(m, 8), e2e=False),  # the scaled case below runs the trainer
    Case("scaled_parallel_adapter-both-learned",
         {"name": "scaled_parallel_adapter", "r": 8, "placement": "both", "scale": 2.0, "learn_scale": True},
         families=("llama", "gpt2", "bert"), expected_trainable=lambda m: count(m, 8, 2, learn_scale=True)),
]
