"""Masked Thought against the spec's checks: p = 0 equals plain training through the real trainer, prompts
and labels never change, the empirical masked share follows the warm-up schedule, the number of mask ids
equals the number drawn; packed rows; and composition with q_tuning in one run."""

import json
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from tests.e2e.helpers import losses, write_config
from tokentune.cli import main
from tokentune.errors import TokentuneError
from tokentune.selection.masked_thought import MaskedThought, MaskedThoughtConfig

PAD, MASK, VOCAB = 0, 99, 100


class _Tokenizer:
    pad_token_id = PAD

    def __len__(self):
        return VOCAB


class _Signals:
    def __init__(self, step=0, total_steps=1):
        self.step, self.total_steps, self.reported = step, total_steps, {}

    def report(self, key, value):
        self.reported[key] = value


def _selector(**cfg):
    selector = MaskedThought(MaskedThoughtConfig(**cfg))
    view = SimpleNamespace(embed_tokens=torch.nn.Embedding(VOCAB + 28, 2))  # rows past the vocabulary, as in Qwen
    selector.attach(SimpleNamespace(tokenizer=_Tokenizer(), view=view))
    return selector


def _packed_batch(rows=2, repeat=1):
    """Row 0: sample 0 (3 prompt + 4 response) and sample 1 (2 + 3); row 1: sample 2 (4 + 5), then padding.
    Ids are 10..89 (never PAD or MASK)."""
    layout = [[(0, 3, 4), (1, 2, 3)], [(2, 4, 5)]]
    width = 12 * repeat
    labels = torch.full((rows, width), -100)
    index = torch.full((rows, width), -1)
    for row in range(rows):
        t = 0
        for r in range(repeat):
            for sample, prompt, response in layout[row % 2]:
                index[row, t:t + prompt + response] = sample + 3 * (row // 2) + 100 * r
                start = t + prompt
                labels[row, start:start + response] = 10 + torch.arange(start, start + response) % 80
                t += prompt + response
    ids = torch.where(index >= 0, 10 + torch.arange(width) % 80, PAD).expand(rows, -1).clone()
    ids = torch.where(labels != -100, labels, ids)
    return {"input_ids": ids, "labels": labels, "loss_weights": (labels != -100).float(), "sample_index": index,
            "position_ids": torch.zeros_like(ids), "attention_mask": (index >= 0).long()}


def test_rate_one_replaces_every_response_input_and_nothing_else():
    batch = _packed_batch()
    original = {k: v.clone() for k, v in batch.items()}
    out = _selector(rate=1.0, warmup=False).select(batch, _Signals())
    response = batch["labels"] != -100
    assert (out["input_ids"][response] == PAD).all()
    assert torch.equal(out["input_ids"][~response], batch["input_ids"][~response])  # prompts and padding untouched
    assert torch.equal(out["labels"], original["labels"]) and torch.equal(out["loss_weights"], original["loss_weights"])
    for key, value in original.items():  # the input batch is not mutated
        assert torch.equal(batch[key], value)


def test_mask_prompt_also_masks_prompts_but_never_padding():
    batch = _packed_batch()
    out = _selector(rate=1.0, warmup=False, replacement="mask_token", mask_token_id=MASK, mask_prompt=True).select(
        batch, _Signals())
    real = batch["sample_index"] >= 0
    assert (out["input_ids"][real] == MASK).all() and (out["input_ids"][~real] == PAD).all()
    assert torch.equal(out["labels"], batch["labels"])


def test_mask_count_equals_the_number_drawn_per_sample():
    batch = _packed_batch(rows=4, repeat=6)
    torch.manual_seed(0)
    signals = _Signals()
    out = _selector(rate=0.3, warmup=False, replacement="mask_token", mask_token_id=MASK).select(batch, signals)
    response = batch["labels"] != -100
    is_mask = out["input_ids"] == MASK
    assert not (is_mask & ~response).any()
    changed = out["input_ids"] != batch["input_ids"]
    assert torch.equal(changed, is_mask)  # every replaced id is the mask id, and only those
    assert signals.reported["select/masked_thought_rate"] == pytest.approx(float(is_mask.sum()) / float(response.sum()))
    torch.manual_seed(0)
    again = _selector(rate=0.3, warmup=False, replacement="mask_token", mask_token_id=MASK).select(batch, _Signals())
    assert torch.equal(again["input_ids"], out["input_ids"])  # the global RNG, re-seeded, gives the same draw


@pytest.mark.parametrize("fraction", [0.0, 0.33, 0.66, 1.0])
def test_empirical_share_follows_the_schedule(fraction):
    total = 300
    step = round(fraction * total)
    expected = min(0.4, 0.4 * step / (0.66 * total + 1))  # the official code's formula, by hand
    batch = _packed_batch(rows=8, repeat=160)
    response = batch["labels"] != -100
    torch.manual_seed(1)
    signals = _Signals(step, total)
    out = _selector(replacement="mask_token", mask_token_id=MASK).select(batch, signals)
    share = float((out["input_ids"] == MASK).sum()) / float(response.sum())
    assert signals.reported["select/masked_thought_p"] == pytest.approx(expected)
    assert share == pytest.approx(expected, abs=0.015)  # ~15,000 candidates: 4 standard deviations
    assert signals.reported["select/masked_thought_rate"] == pytest.approx(share)


def test_random_replacement_draws_real_vocabulary_ids():
    batch = _packed_batch(rows=4, repeat=20)
    response = batch["labels"] != -100
    torch.manual_seed(2)
    out = _selector(rate=1.0, warmup=False, replacement="random").select(batch, _Signals())
    ids = out["input_ids"][response]
    assert ids.min() >= 0 and ids.max() < VOCAB  # never the embedding's padding rows past the tokenizer
    assert float((ids != batch["input_ids"][response]).float().mean()) > 0.9
    mixed = _selector(rate=1.0, warmup=False, random_rate=0.5).select(batch, _Signals())
    pad_share = float((mixed["input_ids"][response] == PAD).float().mean())
    assert 0.4 < pad_share < 0.6


def test_configuration_errors():
    with pytest.raises(ValidationError, match="mask_token_id"):
        MaskedThoughtConfig(replacement="mask_token")
    with pytest.raises(ValidationError, match="only used with"):
        MaskedThoughtConfig(mask_token_id=5)
    with pytest.raises(ValidationError, match="random_rate"):
        MaskedThoughtConfig(replacement="random", random_rate=0.5)
    with pytest.raises(TokentuneError, match="outside the model"):
        _selector(replacement="mask_token", mask_token_id=VOCAB + 28)


def test_rate_zero_equals_plain_training_and_composes_with_q_tuning(tmp_path):
    runs = {name: write_config(tmp_path / name, train={"max_steps": 2}, eval={"at_end": False})
            for name in ("plain", "zero", "both")}
    assert main(["train", str(runs["plain"])]) == 0
    assert main(["train", str(runs["zero"]), "selectors=[{name: masked_thought, rate: 0}]"]) == 0
    assert losses(tmp_path / "zero" / "run") == losses(tmp_path / "plain" / "run")
    both = "selectors=[{name: masked_thought, warmup: false}, {name: q_tuning, sample_ratio: 0.5}]"
    assert main(["train", str(runs["both"]), both]) == 0
    records = [json.loads(l) for l in (tmp_path / "both" / "run" / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert 0.2 < record["select/masked_thought_rate"] < 0.6
        assert record["select/samples_kept"] == pytest.approx(0.5, abs=0.05)
        kept = record["select/q_tuning_Q2"] + record["select/q_tuning_Q4"]
        assert kept == pytest.approx(record["select/samples_kept"])
    assert losses(tmp_path / "both" / "run") != losses(tmp_path / "plain" / "run")
