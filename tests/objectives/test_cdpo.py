"""cDPO: the spec's checks (weights 1 = DPO exactly, the critical-token toy, only_neg's chosen gradient), the
weighted losses by hand (sequence and token forms), a dense reference on tiny-llama with LoRA (the reference is
the base, gradients only through the policy), the selector checks, and an end-to-end run with contrast models."""

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.e2e.helpers import losses, write_config, write_pairs
from tokentune.adapters.lora import LoraAdapter, LoraConfig
from tokentune.cli import main
from tokentune.config import ModelConfig
from tokentune.errors import TokentuneError
from tokentune.models.loading import load_model
from tokentune.objectives.cdpo import CDPO, CDPOConfig
from tokentune.objectives.dpo import DPO, DPOConfig
from tokentune.objectives.preference import Reference, label_tokens, pair_rows
from tokentune.selection.critical_tokens import CriticalTokensConfig
from tokentune.selection.critical_tokens_score import contrastive_scores

TINY = "builtin:tiny-llama"


def lora_policy(perturb: float = 0.3):
    loaded = load_model(ModelConfig(name=TINY, attn_implementation="sdpa"))
    adapter = LoraAdapter(LoraConfig(r=4, alpha=8))
    torch.manual_seed(0)
    adapter.attach(loaded.model, loaded.view)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for group in adapter.param_groups():
            for _, p in group.params:
                p.add_(torch.randn(p.shape, generator=g) * perturb)
    return loaded, adapter


def pref_batch(vocab: int, lengths=((9, 7), (6, 10)), prompt=3, seed=0):
    """Chosen rows then rejected rows, right-padded, prompt masked, random critical scores on label tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = [c for c, _ in lengths] + [r for _, r in lengths]
    width, n = max(rows), len(lengths)
    ids = torch.randint(3, vocab, (2 * n, width), generator=g)
    labels = torch.full((2 * n, width), -100)
    for i, length in enumerate(rows):
        ids[i, :prompt] = ids[i % n, :prompt]
        ids[i, length:] = 0
        labels[i, prompt:length] = ids[i, prompt:length]
    pos = torch.stack([torch.cat([torch.arange(length), torch.arange(width - length)]) for length in rows])
    scores = torch.rand(2 * n, width, generator=g) * (labels != -100)
    return {"input_ids": ids, "labels": labels, "loss_weights": (labels != -100).float(), "position_ids": pos,
            "attention_mask": (pos >= 0).long(), "is_chosen": torch.arange(2 * n) < n,
            "pair_index": torch.arange(2 * n) % n, "critical_scores": scores}


def bound(objective, adapter):
    objective.reference = Reference(adapter=adapter)
    return objective


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run(objective, loaded, batch):
    loaded.model.zero_grad()
    out = objective(loaded.model, loaded.view, batch, chunk_size=3)
    out.loss_sum.backward()
    return out, grads(loaded.model)


# --- spec check 1: all weights 1 is DPO ---------------------------------------------------------------------


def test_all_weights_one_is_dpo_exactly():
    loaded, adapter = lora_policy()
    batch = pref_batch(loaded.model.config.vocab_size)
    dpo_out, dpo_grads = run(bound(DPO(DPOConfig(beta=0.2)), adapter), loaded, batch)
    ones = [  # scores that make w+ = w- = 1, and no scores at all (no selector)
        (True, torch.zeros_like(batch["critical_scores"])),
        (False, batch["is_chosen"][:, None].float().expand_as(batch["labels"]) * (batch["labels"] != -100)),
        (True, None),
    ]
    for only_neg, scores in ones:
        b = {k: v for k, v in batch.items() if k != "critical_scores"}
        if scores is not None:
            b["critical_scores"] = scores
        out, g = run(bound(CDPO(CDPOConfig(beta=0.2, only_neg=only_neg)), adapter), loaded, b)
        assert torch.equal(out.loss_sum, dpo_out.loss_sum)
        assert g.keys() == dpo_grads.keys() and all(torch.equal(g[k], dpo_grads[k]) for k in g)
        assert out.metrics == dpo_out.metrics


# --- the weighted losses by hand ------------------------------------------------------------------------------

R_CHOSEN, S_CHOSEN = [0.5, -1.0, 2.0], [0.9, 0.2, 0.5]
R_REJECTED, S_REJECTED = [1.0, 0.3], [0.1, 0.8]


def hand_pair():
    """One pair: a chosen reply of 3 tokens and a rejected one of 2 (prompt: 1 token), with their scores."""
    labels = torch.tensor([[-100, 5, 6, 7], [-100, 8, 9, -100]])
    scores = torch.tensor([[0.0, *S_CHOSEN], [0.0, *S_REJECTED, 0.0]])
    return {"labels": labels, "loss_weights": (labels != -100).float(), "critical_scores": scores,
            "is_chosen": torch.tensor([True, False]), "pair_index": torch.tensor([0, 0])}


def hand_loss(config, raw=None):
    """The objective's loss from given per-token log-ratios r_t (no model): weights, then the pair loss."""
    batch = hand_pair()
    cdpo = CDPO(config)
    rows, cols, _ = label_tokens(batch)
    r = torch.tensor(R_CHOSEN + R_REJECTED, requires_grad=True) if raw is None else raw
    chosen, rejected = pair_rows(batch)
    return cdpo.losses(r * cdpo.token_weights(batch, rows, cols), rows, 2, chosen, rejected).sum(), r


def nll(x):
    return -math.log(1 / (1 + math.exp(-x)))


def test_sequence_form_by_hand():
    z_neg = sum(R_CHOSEN) - sum((1 - s) * r for s, r in zip(S_REJECTED, R_REJECTED))  # 1.5 - 0.96
    assert float(hand_loss(CDPOConfig(beta=0.1))[0].detach()) == pytest.approx(nll(0.1 * z_neg), abs=1e-6)
    z_both = sum(s * r for s, r in zip(S_CHOSEN, R_CHOSEN)) - 0.96
    both = float(hand_loss(CDPOConfig(beta=0.1, only_neg=False))[0].detach())
    assert both == pytest.approx(nll(0.1 * z_both), abs=1e-6)
    ipo = float(hand_loss(CDPOConfig(beta=0.5, loss_type="ipo"))[0].detach())
    assert ipo == pytest.approx((z_neg - 1.0) ** 2, abs=1e-6)


def test_token_form_by_hand():
    """The released code's form: z_k per aligned reply position; the shorter reply contributes 0 at k = 2."""
    z = [R_CHOSEN[0] - 0.9 * R_REJECTED[0], R_CHOSEN[1] - 0.2 * R_REJECTED[1], R_CHOSEN[2]]
    got = float(hand_loss(CDPOConfig(beta=0.1, form="token"))[0].detach())
    assert got == pytest.approx(sum(nll(0.1 * zk) for zk in z) / 3, abs=1e-6)
    eps = 0.2
    smooth = float(hand_loss(CDPOConfig(beta=0.1, form="token", label_smoothing=eps))[0].detach())
    want = sum((1 - eps) * nll(0.1 * zk) + eps * nll(-0.1 * zk) for zk in z) / 3
    assert smooth == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="sigmoid"):
        CDPOConfig(form="token", loss_type="ipo")


def test_spec_toy_negative_mass_on_a_gives_rejected_weight_one_on_a_and_zero_on_b():
    """Spec check 3: the negative model puts its mass on A, the positive one on B."""
    a, b, vocab = 5, 6, 10
    z_pos, z_neg = torch.zeros(2, vocab), torch.zeros(2, vocab)
    z_neg[:, a], z_pos[:, b] = 40.0, 40.0
    s = contrastive_scores(z_pos, z_neg, torch.tensor([a, b]), beta=1.0)
    labels = torch.tensor([[-100, a, b], [-100, a, b]])  # the same two tokens in the chosen and the rejected reply
    batch = {"labels": labels, "loss_weights": (labels != -100).float(), "is_chosen": torch.tensor([True, False]),
             "pair_index": torch.tensor([0, 0]), "critical_scores": torch.cat([torch.zeros(1), s])[None].repeat(2, 1)}
    rows, cols, _ = label_tokens(batch)
    w = CDPO(CDPOConfig()).token_weights(batch, rows, cols)
    torch.testing.assert_close(w[:2], torch.ones(2))  # chosen, only_neg: 1
    assert w[2] > 1 - 1e-6 and w[3] < 1e-6  # rejected: A weighs 1, B nothing
    w_both = CDPO(CDPOConfig(only_neg=False)).token_weights(batch, rows, cols)
    assert w_both[0] < 1e-6 and w_both[1] > 1 - 1e-6  # chosen with s: A nothing, B 1


def test_only_neg_chosen_gradient_is_dpos():
    """Spec check 4: with only_neg every chosen token's log-ratio gets DPO's gradient −β·σ(−β·z); with
    only_neg false it is scaled by s_t."""
    beta = 0.1
    loss, r = hand_loss(CDPOConfig(beta=beta))
    loss.backward()
    z = sum(R_CHOSEN) - 0.96
    sig = 1 / (1 + math.exp(beta * z))
    torch.testing.assert_close(r.grad[:3], torch.full((3,), -beta * sig))
    torch.testing.assert_close(r.grad[3:], torch.tensor([beta * sig * (1 - s) for s in S_REJECTED]))
    loss, r = hand_loss(CDPOConfig(beta=beta, only_neg=False))
    loss.backward()
    z = sum(s * x for s, x in zip(S_CHOSEN, R_CHOSEN)) - 0.96
    sig = 1 / (1 + math.exp(beta * z))
    torch.testing.assert_close(r.grad[:3], torch.tensor([-beta * sig * s for s in S_CHOSEN]))


# --- on a model: dense reference, reference = base, gradients only through the policy ------------------------


def dense_weights(batch, only_neg):
    s = batch["critical_scores"]
    chosen = batch["is_chosen"][:, None]
    w = torch.where(chosen, torch.ones_like(s) if only_neg else s, 1 - s)
    return w * (batch["labels"] != -100)


@pytest.mark.parametrize("only_neg", [True, False])
def test_weighted_loss_and_gradients_equal_the_dense_reference(only_neg):
    loaded, adapter = lora_policy()
    base = load_model(ModelConfig(name=TINY, attn_implementation="sdpa")).model  # π_ref: the base, no LoRA
    batch = pref_batch(loaded.model.config.vocab_size)
    out, ours = run(bound(CDPO(CDPOConfig(beta=0.3, only_neg=only_neg)), adapter), loaded, batch)
    loaded.model.zero_grad()
    ids, pos, y = batch["input_ids"], batch["position_ids"], batch["labels"][:, 1:]

    def seq(model):
        lp = F.log_softmax(model(input_ids=ids, position_ids=pos).logits[:, :-1].float(), -1)
        return (lp.gather(2, y.clamp_min(0)[..., None]).squeeze(2) * dense_weights(batch, only_neg)[:, 1:]).sum(1)

    with torch.no_grad():
        ref = seq(base)
    ratio = seq(loaded.model) - ref
    dense = -F.logsigmoid(0.3 * (ratio[:2] - ratio[2:])).sum()
    dense.backward()
    torch.testing.assert_close(out.loss_sum, dense, atol=1e-5, rtol=1e-5)
    theirs = grads(loaded.model)
    assert ours.keys() == theirs.keys() and all("lora" in k for k in ours)  # only the policy's adapter learns
    scale = max(float(g.abs().max()) for g in theirs.values())
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=2e-5 * scale, rtol=1e-4)
    assert all(p.grad is None for p in base.parameters())


# --- the selector, checked when the objective is bound -----------------------------------------------------------


def _session(adapter, loaded, selectors):
    cfg = SimpleNamespace(model=ModelConfig(name=TINY, attn_implementation="sdpa"))
    return SimpleNamespace(cfg=cfg, adapter=adapter, view=loaded.view, selectors=selectors, splits=None,
                           device=torch.device("cpu"), env=SimpleNamespace(is_main=True))


def _selector(**kw):
    return SimpleNamespace(name="critical_tokens", config=CriticalTokensConfig(positive="p", negative="n", **kw))


def test_selector_must_leave_the_loss_weights_alone():
    loaded, adapter = lora_policy()
    for bad in (_selector(), _selector(mode="chosen", only_neg=False)):
        with pytest.raises(TokentuneError, match="mode: chosen"):
            CDPO(CDPOConfig()).bind(_session(adapter, loaded, [bad]))
    for good in (_selector(mode="chosen"), _selector(mode="chosen", only_neg=True)):
        cdpo = CDPO(CDPOConfig())
        cdpo.bind(_session(adapter, loaded, [good]))
        assert cdpo.reference.adapter is adapter


# --- end to end: contrast runs, then cDPO with the selector -----------------------------------------------------

_QUICK = {"eval": {"at_end": False}, "log": {"progress": False, "report": False, "tensorboard": False}}


def _preferences(path, n, seed=0):
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": f"What is {a} plus {b}?", "chosen": f" {a + b}", "rejected": f" {a + b + 1}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_training_with_critical_token_scores(tmp_path):
    wrong = write_pairs(tmp_path / "wrong.jsonl", 48, 3)
    rows = [json.loads(line) for line in wrong.read_text().splitlines()]
    wrong.write_text("".join(json.dumps({**r, "completion": f" {int(r['completion']) + 1}"}) + "\n" for r in rows))
    pos = write_config(tmp_path / "pos", train={"max_steps": 1}, **_QUICK)
    neg = write_config(tmp_path / "neg", data={"train": str(wrong)}, train={"max_steps": 1}, **_QUICK)
    assert main(["train", str(pos)]) == 0 and main(["train", str(neg)]) == 0
    data = {"train": str(_preferences(tmp_path / "prefs.jsonl", 12)), "eval": None, "max_length": 32}
    sel = (f"selectors=[{{name: critical_tokens, positive: '{tmp_path / 'pos' / 'run'}', "
           f"negative: '{tmp_path / 'neg' / 'run'}', mode: chosen}}]")
    runs = {}
    for name, objective, extra in (("dpo", "dpo", []), ("plain", "cdpo", []), ("critical", "cdpo", [sel])):
        cfg = write_config(tmp_path / name, data=data, objective={"name": objective, "beta": 0.5},
                           train={"max_steps": 3, "lr": 2e-2}, **_QUICK)
        assert main(["train", str(cfg), *extra]) == 0
        runs[name] = losses(tmp_path / name / "run")
    assert runs["plain"] == runs["dpo"]  # no selector: every weight 1
    assert runs["critical"][0] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference: z = 0 whatever w
    assert runs["critical"][1:] != pytest.approx(runs["dpo"][1:], abs=1e-6)
    record = json.loads((tmp_path / "critical" / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["signals/critical_tokens_seconds"] > 0 and "cdpo/reward_accuracy" in record
    bad = sel.replace(", mode: chosen", "")
    assert main(["train", str(tmp_path / "critical" / "config.yaml"), bad, f"train.output_dir={tmp_path / 'x'}"]) == 2
