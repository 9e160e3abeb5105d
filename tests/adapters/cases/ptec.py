"""Conformance cases of PTEC: a P x d soft prompt plus the classification head W_score (L x d, and the bias BERT's
classifier has). The battery's llama and gpt2 models are causal LMs with no classification head, which ptec refuses
(it trains a classifier), so only its BERT classifier runs here; tests/adapters/test_ptec.py runs the same checks
(trainable count, state round trip, merge refusal, a trainer run and reload) on Llama and GPT-2 classifiers."""

from ..conformance import Case


def _expected(model):
    num_labels, d = model.config.num_labels, model.config.hidden_size
    return 4 * d + num_labels * d + num_labels  # P, W_score, BERT's classifier bias


CASES = [
    Case("ptec", {"name": "ptec", "num_virtual_tokens": 4, "init": "random"}, families=("bert",),
         expected_trainable=_expected, identity_at_init=False, e2e=False),
]
