"""Conformance cases of GreenTrainer. Until the first selection (which needs the first step's batch) every
tensor trains, so right after attach the trainable count is the whole model's."""

from ..conformance import Case

CASES = [
    Case("greentrainer", {"name": "greentrainer", "rho": 0.7}, families=("llama", "gpt2", "bert"),
         expected_trainable=lambda m: sum(p.numel() for p in m.parameters()), mergeable=True),
]
