"""Conformance cases of EPT (reference design): the prompt budget s·d + r·(n + d) plus the fusion attention
(4·d²), N·d² projections and the d x N gate (plus a fresh classifier on encoders)."""

from ..conformance import Case


def _width(model):
    return getattr(model.config, "hidden_size", None) or model.config.n_embd


def _head(model):
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier."))


def _expected(model, s=4, r=3, n=64, spaces=2):
    d = _width(model)
    return s * d + r * (n + d) + 4 * d * d + spaces * d * d + d * spaces + _head(model)


CASES = [
    Case("ept-svd", {"name": "ept", "num_virtual_tokens": 4, "r": 3, "max_length": 64, "num_spaces": 2,
                     "init": "svd", "long_prompt_length": 8, "prompt_init": "random",
                     "prompt_lr": 0.1, "low_rank_lr": 0.05, "network_lr": 0.01},
         families=("llama", "gpt2", "bert"), expected_trainable=_expected, identity_at_init=False),
    Case("ept-dept-init", {"name": "ept", "num_virtual_tokens": 4, "r": 3, "max_length": 64, "num_spaces": 2,
                           "init": "dept", "prompt_init": "random", "network_lr": 0.01},
         families=("llama",), expected_trainable=_expected, identity_at_init=False, e2e=False),
]
