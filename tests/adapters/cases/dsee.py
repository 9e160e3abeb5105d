"""Conformance cases of DSEE: unstructured pruning mid-run (the default phases), structured head / FFN pruning,
and the code's alternative support (largest |W|) with the other projections pruned too."""

from ..conformance import Case


def _qv_sizes(model) -> list[tuple[int, int]]:
    """(in, out) of the q and v matrices DSEE targets, from the model config (GPT-2: the fused c_attn)."""
    c = model.config
    kind = c.model_type
    if kind == "gpt2":
        return [(c.n_embd, 3 * c.n_embd)] * c.n_layer
    head_dim = c.hidden_size // c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return [(c.hidden_size, c.hidden_size), (c.hidden_size, kv * head_dim)] * c.num_hidden_layers


def _head(model) -> int:
    """A sequence classifier's fresh head trains (hidden x labels + bias); a causal LM head stays frozen."""
    c = model.config
    return c.hidden_size * c.num_labels + c.num_labels if c.model_type == "bert" else 0


def _dsee(r: int, n: int, structured: bool = False):
    """Σ_targets [(m + n)·r + N] + head, plus (structured) one ξ per head and per FFN neuron in every block."""
    def count(model):
        total = sum((i + o) * r + n for i, o in _qv_sizes(model)) + _head(model)
        if structured:
            c = model.config
            layers = getattr(c, "num_hidden_layers", None) or c.n_layer
            heads = c.num_attention_heads
            ffn = (c.n_inner or 4 * c.n_embd) if c.model_type == "gpt2" else c.intermediate_size
            total += layers * (heads + ffn)
        return total
    return count


CASES = [
    Case("dsee", {"name": "dsee", "r": 4, "num_sparse": 8}, families=("llama", "gpt2", "bert"),
         expected_trainable=_dsee(4, 8), mergeable=True),
    Case("dsee-structured", {"name": "dsee", "r": 4, "num_sparse": 8, "pruning": "structured",
                             "head_sparsity": 0.25, "ffn_sparsity": 0.4},
         families=("llama", "gpt2", "bert"), expected_trainable=_dsee(4, 8, structured=True), mergeable=True),
    Case("dsee-magnitude-other", {"name": "dsee", "r": 2, "num_sparse": 4, "sparse_init": "magnitude",
                                  "other_sparsity": 0.3, "prune_at": 1.0},
         families=("llama",), expected_trainable=_dsee(2, 4), mergeable=True),
]
