"""Conformance cases of LT-SFT. Every parameter trains in phase 1 (a fresh classifier in full, the rest maskable),
so the trainable count is the whole model; with freeze_layer_norm the norm weights and biases are left out."""

import re

from ..conformance import Case


def _all(model):
    return sum(p.numel() for p in model.parameters())


def _without_norms(model):
    # Norm parameters by name, independently of the adapter's module-type rule.
    norm = re.compile(r"(norm|ln_\d|ln_f|LayerNorm)\.(weight|bias)$")
    return sum(p.numel() for n, p in model.named_parameters() if not norm.search(n))


CASES = [
    Case("lt_sft", {"name": "lt_sft", "ft_params_num": 300}, families=("llama", "gpt2", "bert"),
         expected_trainable=_all, mergeable=True, train={"max_steps": 4}),
    Case("lt_sft-frozen-norms", {"name": "lt_sft", "ft_params_proportion": 0.02, "freeze_layer_norm": True},
         families=("llama", "gpt2", "bert"), expected_trainable=_without_norms, mergeable=True, e2e=False),
]
