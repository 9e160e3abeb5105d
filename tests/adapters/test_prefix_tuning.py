"""Prefix tuning against independent references: a prefix made of real tokens' keys/values equals those tokens
in front of the input; PEFT's prefix tuning with the same keys/values gives the same logits."""

import pytest
import torch

from tokentune.adapters.prefix_tuning import PrefixTuning, PrefixTuningConfig
from tokentune.models.anatomy import ModelView

from .conformance import make_model
from .helpers import ids


def _attach(model, **kw):
    adapter = PrefixTuning(PrefixTuningConfig(num_virtual_tokens=4, **kw))
    torch.manual_seed(0)
    adapter.attach(model, ModelView(model))
    return adapter


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_of_real_tokens_equals_those_tokens_in_front(family):
    model = make_model(family)
    adapter = _attach(model, reparameterize=False)
    words, x = ids(7, shape=(1, 4)), ids(8, shape=(1, 6))
    adapter.virtual.enabled = False
    with torch.no_grad():
        reference = model(input_ids=torch.cat([words, x], 1)).logits[:, 4:]
        # the words' own keys/values, captured layer by layer, become the prefix
        captured = adapter.virtual.run_alone(ModelView(model).embed_tokens(words))
        rows = [torch.stack([captured[i][0][0], captured[i][1][0]]) for i in range(len(captured))]
        adapter.prefix.prefix.copy_(torch.stack(rows).transpose(2, 3).flatten(3))
    adapter.virtual.enabled = True
    with torch.no_grad():
        ours = model(input_ids=x).logits
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_vocab_init_is_real_word_activations_not_noise():
    model = make_model("llama")
    adapter = _attach(model, reparameterize=False)
    prefix = adapter.prefix.prefix
    assert prefix.shape == (2, 2, 4, 2 * 8)  # layers, k/v, P, kv_heads * head_dim
    assert prefix.std() > 0 and torch.isfinite(prefix).all()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_matches_peft_prefix_tuning_with_the_same_keys_and_values(family):
    from peft import PrefixTuningConfig as PeftPrefix, get_peft_model

    model = make_model(family)
    adapter = _attach(model, reparameterize=False)
    with torch.no_grad():
        adapter.prefix.prefix.normal_(0, 0.5)
    x = ids(shape=(2, 7))
    with torch.no_grad():
        ours = model(input_ids=x).logits
    base = make_model(family)
    base.config._attn_implementation = "sdpa"
    peft_model = get_peft_model(base, PeftPrefix(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    L, _, P, w = adapter.prefix.prefix.shape
    table = peft_model.prompt_encoder.default.embedding.weight  # [P, L * 2 * token_dim], layer-major then k/v
    if table.shape[1] != L * 2 * w:
        pytest.skip(f"this PEFT version lays out grouped-query prefixes differently ({table.shape[1]} vs {L * 2 * w})")
    with torch.no_grad():
        table.copy_(adapter.prefix.prefix.permute(2, 0, 1, 3).reshape(P, L * 2 * w))
        theirs = peft_model(input_ids=x, attention_mask=torch.ones_like(x)).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_reparameterised_prefix_trains_embedding_and_mlp_only():
    model = make_model("llama")
    adapter = _attach(model, reparameterize=True, hidden=16)
    model(input_ids=ids()).logits.sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {"tokentune_prefix.embedding", "tokentune_prefix.mlp.0.weight", "tokentune_prefix.mlp.0.bias",
                       "tokentune_prefix.mlp.2.weight", "tokentune_prefix.mlp.2.bias"}


def test_encoder_prefix_keeps_positions_and_changes_the_output():
    model = make_model("bert")
    x = ids(shape=(2, 8))
    with torch.no_grad():
        before = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
    adapter = _attach(model, reparameterize=False)
    assert adapter.virtual.shift is False
    with torch.no_grad():
        after = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
    assert not torch.allclose(before, after)
