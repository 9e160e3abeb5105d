"""cDPO critical tokens: the spec's checks on the score, the model plumbing against full logits, the selector's
weights on hand-made batches, and end-to-end runs (two contrast runs, training with the selector, the offline
command)."""

import json

import pytest
import torch

from tests.conftest import tiny_llama_model
from tests.e2e.helpers import losses, write_config, write_pairs
from tokentune.cli import main
from tokentune.config import config_from_dict
from tokentune.errors import TokentuneError
from tokentune.models.anatomy import ModelView
from tokentune.selection.critical_tokens import CriticalTokens, CriticalTokensConfig, token_weights
from tokentune.selection.critical_tokens_models import ContrastPair, ContrastSide, StateSwap, check_same_vocab
from tokentune.selection.critical_tokens_score import contrastive_scores, critical_scores
from tokentune.selection.token_stats import token_stats


def _side(model):
    return ContrastSide(model, ModelView(model))


def _pair(pos, neg):
    return ContrastPair(_side(pos), _side(neg))


def _batch(ids, labels, position_ids=None):
    b, t = ids.shape
    return {"input_ids": ids, "labels": labels, "loss_weights": (labels != -100).float(),
            "position_ids": torch.arange(t).expand(b, -1) if position_ids is None else position_ids,
            "attention_mask": torch.ones_like(ids), "sample_index": torch.arange(b)[:, None].expand(b, t)}


def _prompt_masked(ids, n_prompt=3):
    labels = ids.clone()
    labels[:, :n_prompt] = -100
    return labels


class _Signals:
    def __init__(self):
        self.reported = {}

    def report(self, key, value):
        self.reported[key] = value


# --- the score --------------------------------------------------------------------------------------------


def test_same_model_with_beta_one_gives_the_model_probability():
    """Spec check 2, on logits and through the model plumbing."""
    torch.manual_seed(0)
    z = torch.randn(6, 11) * 3
    y = torch.randint(0, 11, (6,))
    torch.testing.assert_close(contrastive_scores(z, z, y, 1.0), torch.softmax(z, -1)[torch.arange(6), y])

    model = tiny_llama_model()
    ids = torch.randint(3, 120, (2, 9))
    batch = _batch(ids, _prompt_masked(ids))
    scores = critical_scores(_pair(model, model), batch, beta=1.0, chunk_size=4)
    logp, _ = token_stats(model, ModelView(model), batch)
    torch.testing.assert_close(scores, logp.exp().masked_fill(batch["labels"] == -100, 0))


def test_negative_mass_on_a_and_positive_on_b():
    """Spec check 3: s(A) ~ 0, s(B) ~ 1, so the rejected weight is ~1 on A and ~0 on B."""
    a, b, vocab = 2, 5, 8
    z_neg, z_pos = torch.zeros(2, vocab), torch.zeros(2, vocab)
    z_neg[:, a] = 40.0  # the negative model puts (numerically) all its mass on A ...
    z_pos[:, b] = 40.0  # ... the positive one on B
    s = contrastive_scores(z_pos, z_neg, torch.tensor([a, b]), beta=1.0)
    assert s[0] < 1e-6 and s[1] > 1 - 1e-6
    w = token_weights(s, "rejected", None)
    assert w[0] > 1 - 1e-6 and w[1] < 1e-6


def test_scores_are_a_distribution_over_the_vocabulary_and_weights_lie_in_unit_range():
    torch.manual_seed(1)
    zp, zn = torch.randn(5, 13) * 4, torch.randn(5, 13) * 4
    for beta in (0.0, 0.5, 1.0, 3.0):
        every = torch.stack([contrastive_scores(zp, zn, torch.full((5,), v), beta) for v in range(13)], 1)
        assert ((every >= 0) & (every <= 1)).all()
        torch.testing.assert_close(every.sum(1), torch.ones(5))
        for mode, only_neg in (("rejected", None), ("chosen", False), ("chosen", True)):
            w = token_weights(every, mode, only_neg)
            assert ((w >= 0) & (w <= 1)).all()
    # beta = 0 is the positive model alone; adding a constant to a row changes nothing
    y = torch.randint(0, 13, (5,))
    torch.testing.assert_close(contrastive_scores(zp, zn, y, 0.0), torch.softmax(zp, -1)[torch.arange(5), y])
    torch.testing.assert_close(contrastive_scores(zp + 7, zn - 3, y, 1.0), contrastive_scores(zp, zn, y, 1.0))


def test_chunked_scores_match_full_logits_of_two_models():
    pos, neg = tiny_llama_model(0), tiny_llama_model(1)
    ids = torch.randint(3, 120, (2, 10))
    batch = _batch(ids, _prompt_masked(ids, 4))
    beta = 0.7
    small = critical_scores(_pair(pos, neg), batch, beta, chunk_size=3)
    whole = critical_scores(_pair(pos, neg), batch, beta, chunk_size=10_000)
    torch.testing.assert_close(small, whole, rtol=0, atol=1e-6)
    with torch.no_grad():
        z = (1 + beta) * pos(ids).logits - beta * neg(ids).logits
    probs = torch.softmax(z, -1)
    for r in range(2):
        for t in range(4, 10):
            assert small[r, t].item() == pytest.approx(probs[r, t - 1, ids[r, t]].item(), abs=1e-5)
    assert small[:, :4].abs().sum() == 0


def test_packed_row_scores_like_its_records_alone():
    pos, neg = tiny_llama_model(0), tiny_llama_model(2)
    a, b = torch.randint(3, 120, (1, 6)), torch.randint(3, 120, (1, 5))
    la, lb = _prompt_masked(a, 2), _prompt_masked(b, 1)
    packed = _batch(torch.cat([a, b], 1), torch.cat([la, lb], 1),
                    position_ids=torch.cat([torch.arange(6), torch.arange(5)])[None])
    got = critical_scores(_pair(pos, neg), packed, 1.0)
    alone = torch.cat([critical_scores(_pair(pos, neg), _batch(a, la), 1.0),
                       critical_scores(_pair(pos, neg), _batch(b, lb), 1.0)], 1)
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-6)


def test_state_swap_exchanges_tensors_and_restores_them():
    p = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    swap = StateSwap([p], [torch.ones(3)])
    with swap.swapped():
        assert p.tolist() == [1.0] * 3
    assert p.tolist() == [0.0] * 3
    pos, neg = tiny_llama_model(0), tiny_llama_model(3)
    params = list(pos.parameters())
    shared = ContrastPair(_side(pos), swap=StateSwap(params, [q.data for q in neg.parameters()]))
    ids = torch.randint(3, 120, (1, 8))
    batch = _batch(ids, _prompt_masked(ids))
    torch.testing.assert_close(critical_scores(shared, batch, 1.0, 3), critical_scores(_pair(pos, neg), batch, 1.0, 3))


# --- the selector -----------------------------------------------------------------------------------------


def _selector(pos, neg, **cfg):
    sel = CriticalTokens(CriticalTokensConfig(positive="p", negative="n", **cfg))
    sel.pair, sel.chunk_size = _pair(pos, neg), 4
    return sel


def test_selector_weights_label_tokens_and_leaves_the_rest():
    pos, neg = tiny_llama_model(0), tiny_llama_model(1)
    ids = torch.randint(3, 120, (2, 8))
    batch = _batch(ids, _prompt_masked(ids))
    batch["loss_weights"][1, 5] = 0.0  # an earlier selector dropped this token: it stays dropped
    before = {k: v.clone() for k, v in batch.items()}
    signals = _Signals()
    out = _selector(pos, neg).select(batch, signals)
    s = critical_scores(_pair(pos, neg), batch, 1.0)
    torch.testing.assert_close(out["critical_scores"], s)
    on_label = batch["labels"] != -100
    torch.testing.assert_close(out["loss_weights"], before["loss_weights"] * torch.where(on_label, 1 - s, 1))
    assert out["loss_weights"][1, 5] == 0 and (out["loss_weights"][:, :3] == 0).all()
    assert all(torch.equal(batch[k], before[k]) for k in before)  # input untouched
    assert signals.reported["signals/critical_tokens_seconds"] > 0
    assert 0 < signals.reported["select/critical_tokens_mean_score"] < 1

    chosen = _selector(pos, neg, mode="chosen").select(batch, _Signals())
    assert torch.equal(chosen["loss_weights"], batch["loss_weights"])  # only_neg (default): chosen weight 1
    chosen_s = _selector(pos, neg, mode="chosen", only_neg=False).select(batch, _Signals())
    torch.testing.assert_close(chosen_s["loss_weights"], before["loss_weights"] * torch.where(on_label, s, 1))


def test_config_checks():
    with pytest.raises(TokentuneError, match="only_neg"):
        config_from_dict({"model": {"name": "x"}, "data": {"train": "x"},
                          "selectors": [{"name": "critical_tokens", "positive": "a", "negative": "b", "only_neg": True}]})
    with pytest.raises(TokentuneError, match="beat"):
        config_from_dict({"model": {"name": "x"}, "data": {"train": "x"},
                          "selectors": [{"name": "critical_tokens", "positive": "a", "negative": "b", "beat": 1}]})


def test_vocabulary_mismatch_is_an_error():
    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    check_same_vocab(Tok({"a": 0, "b": 1}), Tok({"a": 0, "b": 1}), "here")
    with pytest.raises(TokentuneError, match="vocabulary"):
        check_same_vocab(Tok({"a": 0, "b": 1}), Tok({"a": 1, "b": 0}), "here")


# --- end to end -------------------------------------------------------------------------------------------


def _wrong_pairs(path, n, seed):
    write_pairs(path, n, seed)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "completion": f" {int(r['completion']) + 1}"}) + "\n" for r in rows))
    return path


_QUICK = {"eval": {"at_end": False}, "log": {"progress": False, "report": False, "tensorboard": False}}


@pytest.fixture(scope="module")
def contrast_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contrast")
    pos = write_config(tmp / "pos", train={"max_steps": 1}, **_QUICK)
    neg = write_config(tmp / "neg", data={"train": str(_wrong_pairs(tmp / "wrong.jsonl", 48, 3))},
                       train={"max_steps": 1}, **_QUICK)
    assert main(["train", str(pos)]) == 0 and main(["train", str(neg)]) == 0
    return tmp, tmp / "pos" / "run", tmp / "neg" / "run"


def test_training_with_the_selector(contrast_runs):
    tmp, pos, neg = contrast_runs
    sel = f"{{name: critical_tokens, positive: '{pos}', negative: '{neg}'"
    plain, chosen, rejected = (write_config(tmp / name, train={"max_steps": 2}, **_QUICK)
                               for name in ("plain", "chosen", "rejected"))
    assert main(["train", str(plain)]) == 0
    assert main(["train", str(chosen), f"selectors=[{sel}, mode: chosen}}]"]) == 0
    assert main(["train", str(rejected), f"selectors=[{sel}}}]"]) == 0
    # weight 1 on every token (chosen, only_neg) is exactly plain training: loading the contrast runs
    # changes neither the data order nor the RNG
    assert losses(tmp / "chosen" / "run") == losses(tmp / "plain" / "run")
    record, plain_record = (json.loads((tmp / name / "run" / "metrics.jsonl").read_text().splitlines()[0])
                            for name in ("rejected", "plain"))
    assert record["signals/critical_tokens_seconds"] > 0
    assert 0 < record["select/critical_tokens_mean_weight"] < 1
    assert record["loss_tokens"] < plain_record["loss_tokens"]  # weights 1 - s < 1 on every label token


def test_offline_command_writes_aligned_jsonl(contrast_runs):
    tmp, pos, neg = contrast_runs
    data = write_pairs(tmp / "score.jsonl", 5, seed=9)
    shared, separate = tmp / "shared.jsonl", tmp / "separate.jsonl"
    assert main(["critical-tokens", str(data), "--positive", str(pos), "--negative", str(neg), "-o", str(shared),
                 "--batch-size", "2"]) == 0
    assert main(["critical-tokens", str(data), "--positive", str(pos), "--negative", str(neg), "-o", str(separate),
                 "--no-share-base"]) == 0
    inputs = [json.loads(line) for line in data.read_text().splitlines()]
    rows = [json.loads(line) for line in shared.read_text().splitlines()]
    assert len(rows) == 5 and not list(tmp.glob(".shared.jsonl.*"))
    for source, row in zip(inputs, rows):
        assert {k: row[k] for k in source} == source
        ids, scores = row["critical_token_ids"], row["critical_scores"]
        assert len(ids) == len(scores) and scores[0] is None
        assert all(0 <= s <= 1 for s in scores if s is not None)
        # prompt/completion: the completion (and EOS) tokens are scored, the prompt is not
        assert scores[-1] is not None and scores[1] is None
    # one base with two swapped adapter states scores exactly as two whole models
    for a, b in zip(rows, (json.loads(line) for line in separate.read_text().splitlines())):
        assert a["critical_token_ids"] == b["critical_token_ids"]
        assert [x if x is None else pytest.approx(x, abs=1e-6) for x in a["critical_scores"]] == b["critical_scores"]
    assert main(["critical-tokens", str(data), "--positive", str(tmp), "--negative", str(neg), "-o",
                 str(tmp / "x.jsonl")]) == 2  # not a run directory
