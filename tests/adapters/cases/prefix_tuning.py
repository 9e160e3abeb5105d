"""Conformance cases of prefix tuning: L x 2 x P x (kv_heads * head_dim) keys/values, or the MLP that makes them."""

from ..conformance import Case


def _kv_width(model):
    c = model.config
    heads = getattr(c, "num_attention_heads", None) or c.n_head
    hidden = getattr(c, "hidden_size", None) or c.n_embd
    return (getattr(c, "num_key_value_heads", None) or heads) * (hidden // heads)


def _layers(model):
    return getattr(model.config, "num_hidden_layers", None) or model.config.n_layer


def _head(model):
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier."))


def _direct(model, p=4):
    return _layers(model) * 2 * p * _kv_width(model) + _head(model)


def _mlp(model, p=4, hidden=16):
    d = getattr(model.config, "hidden_size", None) or model.config.n_embd
    out = _layers(model) * 2 * _kv_width(model)
    return p * d + (d * hidden + hidden) + (hidden * out + out) + _head(model)


CASES = [
    Case("prefix_tuning", {"name": "prefix_tuning", "num_virtual_tokens": 4, "reparameterize": False},
         families=("llama", "gpt2", "bert"), expected_trainable=_direct, identity_at_init=False, train={"lr": 0.05}),
    Case("prefix_tuning-mlp", {"name": "prefix_tuning", "num_virtual_tokens": 4, "hidden": 16},
         families=("llama", "gpt2"), expected_trainable=_mlp, identity_at_init=False),
]
