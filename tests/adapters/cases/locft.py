"""Conformance cases of LocFT-BF: one location trains (by default the down projection's weight of the block
at relative depth 0.7, i.e. block 1 of 2), plus a fresh classifier on encoders."""

from ..conformance import Case

# The spec's "only the configured tensor", written out per family on the bare model.
_DEFAULT = {"llama": "model.layers.1.mlp.down_proj.weight", "gpt2": "transformer.h.1.mlp.c_proj.weight",
            "bert": "bert.encoder.layer.1.output.dense.weight"}


def _default_location(model):
    params = dict(model.named_parameters())
    head = sum(p.numel() for n, p in params.items() if n.startswith("classifier."))
    return params[_DEFAULT[model.config.model_type]].numel() + head


def _last_block(model):
    prefix = "model.layers.1." if model.config.model_type == "llama" else "transformer.h.1."
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


CASES = [
    Case("locft", {"name": "locft"}, families=("llama", "gpt2", "bert"),
         expected_trainable=_default_location, mergeable=True),
    Case("locft-block", {"name": "locft", "location": "layers.-1"}, expected_trainable=_last_block,
         mergeable=True),
]
