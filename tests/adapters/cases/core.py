"""Conformance cases of the core adapters (full, freeze, LoRA)."""

from ..conformance import Case


def _lora_params(model, r=4, roles=("q_proj", "v_proj")):
    return sum(r * (m.in_features + m.out_features) for n, m in model.named_modules() if n.endswith(roles))


CASES = [
    Case("full", {"name": "full"}, families=("llama", "gpt2", "bert"),
         expected_trainable=lambda m: sum(p.numel() for p in m.parameters()), mergeable=True),
    Case("freeze-last-block", {"name": "freeze", "layers": [-1]},
         expected_trainable=lambda m: sum(p.numel() for n, p in m.named_parameters() if ".1." in n), mergeable=True),
    Case("lora", {"name": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]}, families=("llama",),
         expected_trainable=_lora_params, mergeable=True),
]
