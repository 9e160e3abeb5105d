"""Conformance cases of prompt tuning: P x d trainable embeddings (plus a fresh classifier on encoders)."""

from ..conformance import Case


def _hidden(model):
    return getattr(model.config, "hidden_size", None) or model.config.n_embd


def _expected(model):
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier."))
    return 5 * _hidden(model) + head


CASES = [
    Case("prompt_tuning", {"name": "prompt_tuning", "num_virtual_tokens": 5, "init": "random"},
         families=("llama", "gpt2", "bert"), expected_trainable=_expected, identity_at_init=False,
         train={"lr": 0.1}),
]
