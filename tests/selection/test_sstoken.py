"""ssToken: the spec's checks (ρ = 1 is plain training; flat REL is handled deterministically; the attention
score is 1 − mass on response tokens, against eager attention; exactly ceil(ρ·L_resp) tokens per sample,
never a prompt token), hand-computed selections on packed rows, warm-up, and the EMA history model."""

import json
import math
from fractions import Fraction

import pytest
import torch

from tests.e2e.helpers import losses, write_config
from tokentune.cli import main
from tokentune.config import load_config
from tokentune.engine.distributed import DistEnv
from tokentune.engine.session import build_session
from tokentune.errors import TokentuneError
from tokentune.selection.random_subset import sample_spans
from tokentune.selection.signals import SelectionContext, TokenStats
from tokentune.selection.sstoken import SSToken, SSTokenConfig, keep_count
from tokentune.selection.token_stats import token_stats


# --- hand-made packed batch and fake signals -----------------------------------------------------

def _packed_batch():
    # row 0: sample 0 = prompt 2 + response 4 (pos 2-5), sample 1 = prompt 2 + response 3 (pos 8-10), 1 pad
    # row 1: sample 2 = prompt 1 + response 5 (pos 1-5), 6 pads
    labels = torch.tensor([[-100, -100, 5, 6, 7, 8, -100, -100, 9, 9, 9, -100],
                           [-100, 4, 4, 4, 4, 4, -100, -100, -100, -100, -100, -100]])
    index = torch.tensor([[0] * 6 + [1] * 5 + [-1], [2] * 6 + [-1] * 6])
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]])
    mask = (index >= 0).long()
    return {"input_ids": labels.clamp_min(3), "labels": labels, "loss_weights": (labels != -100).float(),
            "position_ids": positions, "attention_mask": mask, "sample_index": index}


class _FakeSignals:
    def __init__(self, rel, attn, step=0, history=True):
        self.rel, self.attn, self.step, self.has_history = rel, attn, step, history
        self.key_masks, self.reports = [], {}

    def current(self):
        return TokenStats(self.rel, torch.zeros_like(self.rel))

    def history(self):
        assert self.has_history, "history read while gamma = 0"
        return TokenStats(torch.zeros_like(self.rel), torch.zeros_like(self.rel))

    def attention_mass(self, layer, key_mask):
        self.key_masks.append(key_mask)
        return self.attn

    def report(self, key, value):
        self.reports[key] = value


def _kept(out):
    return [(r, c) for r, c in (out["loss_weights"] > 0).nonzero().tolist()]


def test_hand_computed_selection_on_packed_rows():
    batch = _packed_batch()
    rel = torch.full((2, 12), 50.0)  # prompt values are large: they must never matter
    attn = torch.full((2, 12), 0.99)
    rel[0, 2:6], attn[0, 2:6] = torch.tensor([0., 1, 2, 4]), torch.tensor([.9, .1, .2, 0])
    rel[0, 8:11], attn[0, 8:11] = torch.tensor([3., 3, 5]), torch.tensor([.2, .8, .1])
    rel[1, 1:6], attn[1, 1:6] = torch.tensor([1., 2, 3, 4, 5]), torch.tensor([1., 0, 0, 0, 0])
    signals = _FakeSignals(rel, attn)
    out = SSToken(SSTokenConfig(ratio=0.5, gamma=0.5)).select(batch, signals)
    # sample 0: scores .45 .175 .35 .5 -> keep 2 of 4: pos 5, 2.  sample 1: .1 .4 .55 -> keep 2 of 3: pos 10, 9.
    # sample 2: .5 .125 .25 .375 .5 -> keep 3 of 5: pos 1, 5, 4.
    assert _kept(out) == [(0, 2), (0, 5), (0, 9), (0, 10), (1, 1), (1, 4), (1, 5)]
    expected_keys = (batch["labels"] == -100) & (batch["attention_mask"] > 0)
    assert torch.equal(signals.key_masks[0], expected_keys)
    assert signals.reports["select/sstoken_rel_mean"] == pytest.approx((7 + 11 + 15) / 12)
    assert signals.reports["select/sstoken_attn_mean"] == pytest.approx((1.2 + 1.1 + 1.0) / 12)
    assert torch.equal(batch["loss_weights"], (batch["labels"] != -100).float())  # input untouched


def test_flat_rel_with_gamma_one_keeps_the_earliest_tokens():
    batch = _packed_batch()
    signals = _FakeSignals(torch.zeros(2, 12), torch.rand(2, 12))
    selector = SSToken(SSTokenConfig(ratio=0.5, gamma=1.0))
    assert selector.needs == {"current", "history"}  # gamma 1 never reads attention
    out = selector.select(batch, signals)
    assert _kept(out) == [(0, 2), (0, 3), (0, 8), (0, 9), (1, 1), (1, 2), (1, 3)]
    assert not signals.key_masks
    # Noise below 1e-6 nats is flat too (min-max would otherwise turn it into a ranking).
    noisy = _FakeSignals(torch.rand(2, 12) * 1e-7, torch.rand(2, 12))
    assert _kept(selector.select(batch, noisy)) == _kept(out)


def test_warmup_steps_score_by_attention_only():
    batch = _packed_batch()
    attn = torch.zeros(2, 12)
    attn[0, 5], attn[0, 10], attn[1, 5] = 0.9, 0.9, 0.9  # attention favours the last token of each sample
    rel = torch.zeros(2, 12)
    rel[0, 2], rel[0, 8], rel[1, 1] = 1.0, 1.0, 1.0  # REL favours the first
    selector = SSToken(SSTokenConfig(ratio=0.2, gamma=1.0, warmup_steps=2))
    assert selector.needs == {"current", "history", "attention:-1"}
    early = selector.select(batch, _FakeSignals(rel, attn, step=1, history=False))
    assert _kept(early) == [(0, 5), (0, 10), (1, 5)]
    late = selector.select(batch, _FakeSignals(rel, attn, step=2))
    assert _kept(late) == [(0, 2), (0, 8), (1, 1)]


@pytest.mark.parametrize("ratio", [0.1, 0.34, 0.5, 0.6, 0.7, 0.99, 1.0])
def test_keeps_ceil_ratio_of_each_sample_and_never_a_prompt_token(ratio):
    batch = _packed_batch()
    torch.manual_seed(0)
    out = SSToken(SSTokenConfig(ratio=ratio)).select(batch, _FakeSignals(torch.randn(2, 12), torch.rand(2, 12)))
    for (row, pos), n in zip(sample_spans(batch), [4, 3, 5]):
        assert int((out["loss_weights"][row, pos] > 0).sum()) == math.ceil(Fraction(str(ratio)) * n)
    assert not (out["loss_weights"] > 0)[batch["labels"] == -100].any()


def test_keep_count_ignores_float_noise():
    assert 0.55 * 100 > 55 and keep_count(0.55, 100) == 55
    assert keep_count(0.6, 5) == 3 and keep_count(0.61, 5) == 4 and keep_count(1.0, 1) == 1


def test_earlier_weights_are_kept_and_zeroed_tokens_do_not_count():
    batch = _packed_batch()
    batch["loss_weights"][0, 2:6] = torch.tensor([0.5, 0.0, 0.0, 2.0])  # an earlier selector left 2 live tokens
    batch["loss_weights"][1] = 0  # and dropped sample 2
    out = SSToken(SSTokenConfig(ratio=0.5, gamma=0.0)).select(
        batch, _FakeSignals(torch.zeros(2, 12), torch.linspace(0, 1, 12).expand(2, 12).clone(), history=False))
    assert out["loss_weights"][0].tolist()[2:11] == [0, 0, 0, 2.0, 0, 0, 0, 1.0, 1.0]
    assert out["loss_weights"][1].abs().sum() == 0


def test_config_choices_and_errors():
    assert SSToken(SSTokenConfig(gamma=0.0)).needs == {"current", "attention:-1"}
    sel = SSToken(SSTokenConfig(attention_layer=0, history="ema", ema_alpha=0.9))
    assert sel.needs == {"current", "history", "attention:0"} and sel.history_mode == ("ema", 0.9)
    assert SSToken(SSTokenConfig(history="ema")).history_mode == ("ema", 0.99)
    with pytest.raises(ValueError, match="ema_alpha applies only"):
        SSTokenConfig(ema_alpha=0.9)


# --- the real model: attention reference, flat REL, EMA history ------------------------------------

@pytest.fixture(scope="module")
def session(tmp_path_factory):
    cfg = load_config(write_config(tmp_path_factory.mktemp("sstoken")))
    s = build_session(cfg, DistEnv())
    s.model.train()
    return s


def _segments(batch):
    """(row, columns) of every packed record in the batch."""
    out = []
    for row in range(batch["input_ids"].shape[0]):
        for sample in batch["sample_index"][row].unique().tolist():
            if sample >= 0:
                out.append((row, (batch["sample_index"][row] == sample).nonzero(as_tuple=True)[0]))
    return out


def test_attention_score_is_one_minus_mass_on_response_tokens(session):
    from transformers import AutoModelForCausalLM

    from tokentune.models.builtin import resolve_builtin

    eager = AutoModelForCausalLM.from_pretrained(resolve_builtin("tiny-llama"), attn_implementation="eager").eval()
    batch = session.to_batch(session.train_rows()[:2])
    assert max(len(_segments({k: v[r:r + 1] for k, v in batch.items()})) for r in range(2)) > 1  # packed
    for layer in (-1, 0):
        selector = SSToken(SSTokenConfig(attention_layer=layer))
        signals = SelectionContext(session, [selector], 10).signals(batch)
        _, attn = selector.scores(batch, signals, gamma=0.5)
        for row, cols in _segments(batch):
            with torch.no_grad():
                probs = eager(batch["input_ids"][row, cols][None], output_attentions=True).attentions[layer][0].mean(0)
            response = batch["labels"][row, cols] != -100
            expected = 1 - probs[:, response].sum(-1)
            torch.testing.assert_close(attn[row, cols], expected, rtol=1e-5, atol=1e-5)
            assert (attn[row, cols][response] >= -1e-6).all() and (attn[row, cols][response] <= 1 + 1e-6).all()
    assert session.model.training  # signals restore the mode


def test_history_equal_to_current_gives_flat_rel_and_earliest_tokens(session):
    batch = session.to_batch(session.train_rows()[:3])
    selector = SSToken(SSTokenConfig(ratio=0.5, gamma=1.0))
    signals = SelectionContext(session, [selector], 10).signals(batch)  # step 0, base mode: history = weights
    rel, _ = selector.scores(batch, signals, gamma=1.0)
    assert rel.abs().max() < 1e-6
    out = selector.select(batch, signals)
    spans = sample_spans(batch)
    assert len(spans) > 3
    for row, pos in spans:
        k = math.ceil(Fraction(1, 2) * len(pos))
        assert out["loss_weights"][row, pos].tolist() == [1.0] * k + [0.0] * (len(pos) - k)
    assert not (out["loss_weights"] > 0)[batch["labels"] == -100].any()


def test_ema_history_follows_the_weights_and_base_stays(session):
    batch = session.to_batch(session.train_rows()[:2])
    params = [p for g in session.adapter.param_groups() for _, p in g.params]
    start = [p.detach().clone() for p in params]
    ema = SelectionContext(session, [SSToken(SSTokenConfig(history="ema", ema_alpha=0.5))], 10)
    base = SelectionContext(session, [SSToken(SSTokenConfig())], 10)
    session.model.eval()

    def stats_with(values):
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)
        return token_stats(session.model, session.view, batch)[0]

    try:
        torch.manual_seed(1)
        moved = [v + 0.05 * torch.randn_like(v) for v in start]
        before = stats_with(start)
        stats_with(moved)  # "an optimiser step"
        ema.after_optimizer_step()
        base.after_optimizer_step()
        assert torch.equal(ema.signals(batch).current().logprob, stats_with(moved))
        hist = ema.signals(batch).history().logprob
        assert not torch.allclose(hist, before, atol=1e-4)
        torch.testing.assert_close(hist, stats_with([(a + b) / 2 for a, b in zip(start, moved)]))
        stats_with(moved)
        torch.testing.assert_close(base.signals(batch).history().logprob, before)
    finally:
        stats_with(start)
        session.model.train()


def test_attach_checks_the_layer(session):
    with pytest.raises(TokentuneError, match="attention_layer 2 does not exist"):
        SSToken(SSTokenConfig(attention_layer=2)).attach(session)
    SSToken(SSTokenConfig(attention_layer=-2)).attach(session)


# --- through the trainer -------------------------------------------------------------------------

def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_ratio_one_equals_plain_training(tmp_path):
    plain = write_config(tmp_path / "plain", train={"max_steps": 3})
    sst = write_config(tmp_path / "sst", train={"max_steps": 3})
    assert main(["train", str(plain)]) == 0
    assert main(["train", str(sst), "selectors=[{name: sstoken, ratio: 1.0}]"]) == 0
    assert losses(tmp_path / "sst" / "run") == losses(tmp_path / "plain" / "run")
    first = _records(tmp_path / "sst" / "run")[0]
    assert first["select/loss_tokens_kept"] == 1.0 and first["signals/forwards"] == 2
    assert "select/sstoken_rel_mean" in first and 0 < first["select/sstoken_attn_mean"] <= 1


def test_selection_in_training_with_ema_and_warmup(tmp_path):
    cfg = write_config(tmp_path, train={"max_steps": 3})
    sel = "selectors=[{name: sstoken, ratio: 0.5, history: ema, ema_alpha: 0.9, warmup_steps: 1}]"
    assert main(["train", str(cfg), sel]) == 0
    records = _records(tmp_path / "run")
    assert all(0.4 < r["select/loss_tokens_kept"] < 1 for r in records)
    assert "select/sstoken_rel_mean" not in records[0] and records[0]["signals/forwards"] == 1  # warm-up
    assert records[1]["signals/forwards"] == 2 and records[1]["select/sstoken_rel_mean"] != 0  # EMA has moved
