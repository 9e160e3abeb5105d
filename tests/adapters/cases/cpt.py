"""Conformance cases of CPT: N x d trainable delta values for an N-token context (explicit token ids and types,
PEFT's cpt_token_ids / cpt_tokens_type_mask, so the battery needs no data or tokenizer)."""

from ..conformance import Case

# Two context examples: input template (4i+1), input text (4i+2), separator (0), output template (4i+3),
# label (4i+4), EOS (0).
TOKEN_IDS = [5, 6, 7, 8, 9, 10, 11, 2, 5, 6, 12, 13, 9, 10, 14, 15, 2]
TYPE_MASK = [1, 2, 2, 2, 0, 3, 4, 0, 5, 6, 6, 6, 0, 7, 8, 8, 0]


def _expected(model):
    return len(TOKEN_IDS) * (getattr(model.config, "hidden_size", None) or model.config.n_embd)


CASES = [
    Case("cpt", {"name": "cpt", "token_ids": TOKEN_IDS, "type_mask": TYPE_MASK, "epsilon": 2.0, "format_epsilon": 1.0,
                 "weighting": "decay", "decay": 0.9, "render_queries": False},
         expected_trainable=_expected, identity_at_init=False, train={"lr": 0.05}),
]
