"""Conformance cases of APT: per block p·C (memory M) + C·4 (W_a) + 4·C (W_b) + 1 (s), counted on the bare model
from its config, plus a fresh task head (BERT's classifier). Not identity at init (M ~ N(0, 0.02) moves the
output a little); test_apt.py checks that M = 0 is."""

from ..conformance import Case


def count(model, p=50, rank=4):
    c = model.config
    layers = getattr(c, "num_hidden_layers", None) or c.n_layer
    dim = getattr(c, "hidden_size", None) or c.n_embd
    head = sum(q.numel() for n, q in model.named_parameters() if n.startswith("classifier."))
    return layers * (p * dim + dim * rank + rank * dim + 1) + head


CASES = [
    Case("apt", {"name": "apt"}, families=("llama", "gpt2", "bert"), expected_trainable=count,
         identity_at_init=False),
    Case("apt-p8-dropout", {"name": "apt", "num_memory": 8, "dropout": 0.1}, families=("llama", "gpt2", "bert"),
         expected_trainable=lambda m: count(m, p=8), identity_at_init=False, e2e=False),
]
