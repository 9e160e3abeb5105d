"""Conformance cases of the layer-wise adapter: presets, freezing the lower layers with LLRD, re-init of the top."""

import re

from ..conformance import Case

EMBEDDINGS = re.compile(r"embed|wte|wpe")  # token / position / type tables (and BERT's embedding LayerNorm)
HEADS = re.compile(r"lm_head|pooler|classifier")


def _count(model, keep) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if keep(n))  # a tied head is listed once


CASES = [
    # F = 1: the embeddings (with them a tied LM head) and block 0 are frozen; the rest trains in LLRD groups.
    Case("layerwise-freeze-lower-llrd", {"name": "layerwise", "freeze_lower": 1, "llrd_decay": 0.8},
         families=("llama", "gpt2", "bert"), mergeable=True, e2e=False,
         expected_trainable=lambda m: _count(m, lambda n: not EMBEDDINGS.search(n) and ".0." not in n)),
    # The top block (and BERT's pooler) is re-drawn at attach: the base changes and the logits move on purpose.
    # Its end-to-end run covers LLRD groups in the trainer and re-init followed by reload in a fresh process.
    Case("layerwise-reinit-top", {"name": "layerwise", "reinit_top": 1, "llrd_decay": 0.9},
         families=("llama", "gpt2", "bert"), mergeable=True, changes_base=True, identity_at_init=False,
         expected_trainable=lambda m: _count(m, lambda n: True)),
    Case("layerwise-embeddings-head", {"name": "layerwise", "preset": "embeddings_head"},
         families=("llama", "gpt2", "bert"), mergeable=True, e2e=False,
         expected_trainable=lambda m: _count(m, lambda n: bool(EMBEDDINGS.search(n) or HEADS.search(n)))),
    Case("layerwise-last-block", {"name": "layerwise", "preset": "last_block", "include_final_norm": True},
         families=("llama", "gpt2"), mergeable=True, e2e=False,
         expected_trainable=lambda m: _count(m, lambda n: ".1." in n or re.search(r"(\.norm|ln_f)\.", n))),
]
