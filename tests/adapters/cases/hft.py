"""Conformance cases of HFT (half fine-tuning).

With `reselect: stage` the trained half is drawn at attach, so which tensors train (and so their count: with GQA
k and v are smaller than q and o; GPT-2's FFN biases differ in size) depends on the draw. The battery's count
check therefore runs on the per-epoch case, where attach leaves every tensor that some epoch can train in the
optimiser (all of them, with the defaults); tests/adapters/test_hft.py checks the halving rule itself
(2 of 4 attention projections per layer, the FFN pattern, half the norms) by module on each family.
"""

from ..conformance import Case


def _all_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


CASES = [
    Case("hft", {"name": "hft"}, families=("llama", "gpt2", "bert"), mergeable=True),
    Case("hft-epoch", {"name": "hft", "reselect": "epoch", "seed": 3}, families=("llama", "gpt2", "bert"),
         expected_trainable=_all_params, mergeable=True, e2e=False),
]
