"""Conformance cases of DePT: m·d + r·(s + d) trainable values (plus a fresh classifier on encoders)."""

from ..conformance import Case


def _width(model):
    return getattr(model.config, "hidden_size", None) or model.config.n_embd


def _head(model):
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier."))


def _expected(model, m=4, r=3, s=64):
    d = _width(model)
    return m * d + r * (s + d) + _head(model)


CASES = [
    Case("dept", {"name": "dept", "num_virtual_tokens": 4, "r": 3, "max_length": 64, "init": "random",
                  "prompt_lr": 0.1, "low_rank_lr": 0.05},
         families=("llama", "gpt2", "bert"), expected_trainable=_expected, identity_at_init=False),
]
