"""The attention hook: same logits as SDPA when no hook acts; hooks act per layer and can be removed."""

import torch

from tokentune.models import attention
from tokentune.models.anatomy import ModelView


def _pair(factory):
    attention.register()
    ref = factory()
    ref.config._attn_implementation = "sdpa"
    ours = factory()
    ours.set_attn_implementation(attention.NAME)
    return ref, ours


def test_identity_and_removal(tiny_llama):
    from tests.conftest import tiny_llama_model

    ref, ours = _pair(tiny_llama_model)
    ids = torch.randint(3, 120, (2, 12))
    base = ref(ids).logits
    torch.testing.assert_close(ours(ids).logits, base)

    seen = []

    def zero_values(module, q, k, v, mask, kwargs):
        seen.append(q.shape)
        return q, k, torch.zeros_like(v), mask

    handles = attention.add_attention_hook(ModelView(ours), 1, zero_values)
    changed = ours(ids).logits
    assert len(seen) == 1 and seen[0][2] == 12  # called once, for layer 1 only
    assert not torch.allclose(changed, base)
    for h in handles:
        h.remove()
    torch.testing.assert_close(ours(ids).logits, base)


def test_hook_requires_tokentune_attention(tiny_gpt2):
    import pytest

    from tokentune.errors import TokentuneError

    tiny_gpt2.config._attn_implementation = "sdpa"
    with pytest.raises(TokentuneError, match="attn_implementation"):
        attention.add_attention_hook(ModelView(tiny_gpt2), 0, lambda *a: a[1:5])


def test_gpt2_hook_runs(tiny_gpt2):
    from tests.conftest import tiny_gpt2_model

    ref, ours = _pair(tiny_gpt2_model)
    ids = torch.randint(3, 120, (1, 9))
    torch.testing.assert_close(ours(ids).logits, ref(ids).logits)
    calls = []
    attention.add_attention_hook(ModelView(ours), 0, lambda m, q, k, v, mask, kw: (calls.append(1), (q, k, v, mask))[1])
    ours(ids)
    assert calls == [1]
