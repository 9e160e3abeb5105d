"""The chunked LM-head loss equals full-logits cross-entropy, in value and in gradients."""

import pytest
import torch
import torch.nn.functional as F

from tokentune.objectives.chunked import chunked_cross_entropy


def _reference(hidden, head, targets):
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [3, 7, 1024])
def test_values_and_gradients_match_full_logits(train_head, bias, chunk):
    torch.manual_seed(0)
    n, h, v = 17, 8, 50
    head = torch.nn.Linear(h, v, bias=bias)
    head.requires_grad_(train_head)
    hidden = torch.randn(n, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    weights = torch.rand(n)

    ours = chunked_cross_entropy(hidden, head, targets, chunk)
    (ours * weights).sum().backward()
    grads = [hidden.grad.clone()] + ([head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else []) if train_head else [])
    hidden.grad = None
    head.zero_grad()

    ref = _reference(hidden, head, targets)
    (ref * weights).sum().backward()
    ref_grads = [hidden.grad] + ([head.weight.grad] + ([head.bias.grad] if bias else []) if train_head else [])

    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_no_grad_and_empty():
    head = torch.nn.Linear(4, 9, bias=False)
    with torch.no_grad():
        out = chunked_cross_entropy(torch.randn(5, 4), head, torch.randint(0, 9, (5,)), 2)
    assert out.shape == (5,)
    empty = chunked_cross_entropy(torch.randn(0, 4, requires_grad=True), head, torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,)
