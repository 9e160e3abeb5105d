"""Packing isolation: a token's hidden state does not change when another record is packed beside it."""

import pytest
import torch

from tests.conftest import tiny_gpt2_model, tiny_llama_model
from tokentune.models import attention
from tokentune.models.anatomy import ModelView
from tokentune.objectives.base import backbone_hidden


def _hidden(view, segments):
    ids = torch.tensor([sum(segments, [])])
    pos = torch.tensor([sum((list(range(len(s))) for s in segments), [])])
    return backbone_hidden(view, {"input_ids": ids, "position_ids": pos, "attention_mask": torch.ones_like(ids)})[0]


@pytest.mark.parametrize("factory", [tiny_llama_model, tiny_gpt2_model])
@pytest.mark.parametrize("impl", ["tokentune", "sdpa", "eager"])
def test_packed_equals_alone(factory, impl):
    attention.register()
    model = factory()
    model.set_attn_implementation(impl)
    view = ModelView(model)
    a, b, pad = [5, 9, 17, 33, 4], [7, 8, 60, 61, 62, 63, 70], [0, 0, 0]
    with torch.no_grad():
        alone_a, alone_b = _hidden(view, [a]), _hidden(view, [b])
        packed = _hidden(view, [b, a, pad])  # right padding restarts positions: its own segment
    torch.testing.assert_close(packed[:len(b)], alone_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[len(b):len(b) + len(a)], alone_a, rtol=1e-5, atol=1e-5)
    # And the mask is real: without restarting positions, record a would see record b.
    with torch.no_grad():
        ids = torch.tensor([b + a])
        leaked = backbone_hidden(view, {"input_ids": ids, "position_ids": torch.arange(len(b + a))[None],
                                        "attention_mask": torch.ones_like(ids)})[0]
    assert not torch.allclose(leaked[len(b):], alone_a, atol=1e-4)
