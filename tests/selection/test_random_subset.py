"""The random baseline keeps exactly its budget of samples and tokens, and everything at ratio 1."""

import math

import torch

from tokentune.selection.random_subset import RandomSubset, RandomSubsetConfig, sample_spans


def _packed_batch():
    # row 0: samples 0 (prompt 2 + 4 response) and 1 (prompt 1 + 3 response); row 1: sample 2 (prompt 2 + 5)
    labels = torch.tensor([[-100, -100, 5, 6, 7, 8, -100, 9, 9, 9, -100, -100],
                           [-100, -100, 4, 4, 4, 4, 4, -100, -100, -100, -100, -100]])
    index = torch.tensor([[0] * 6 + [1] * 4 + [-1] * 2, [2] * 7 + [-1] * 5])
    return {"labels": labels, "loss_weights": (labels != -100).float(), "sample_index": index,
            "input_ids": labels.clamp_min(0)}


def test_budget_is_exact():
    batch = _packed_batch()
    assert [len(p) for _, p in sample_spans(batch)] == [4, 3, 5]
    torch.manual_seed(0)
    out = RandomSubset(RandomSubsetConfig(sample_ratio=2 / 3, token_ratio=0.5)).select(batch, None)
    kept = [int((out["loss_weights"][row, pos] > 0).sum()) for row, pos in sample_spans(batch)]
    assert sum(k > 0 for k in kept) == 2
    assert all(k in (0, math.ceil(0.5 * n)) for k, n in zip(kept, [4, 3, 5]))
    assert torch.equal(batch["loss_weights"], (batch["labels"] != -100).float())  # input untouched


def test_ratio_one_keeps_everything():
    batch = _packed_batch()
    out = RandomSubset(RandomSubsetConfig()).select(batch, None)
    assert torch.equal(out["loss_weights"], batch["loss_weights"])
