"""DPO against a dense reference (full logits, log-softmax, sums written out by hand), closed forms of the
pairwise losses, the pair accounting and the engine plumbing (bind, reference, normaliser, metrics)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.e2e.helpers import losses, write_config
from tokentune.adapters.full import FullAdapter
from tokentune.adapters.lora import LoraAdapter, LoraConfig
from tokentune.cli import main
from tokentune.config import ModelConfig
from tokentune.errors import TokentuneError
from tokentune.models.loading import load_model
from tokentune.objectives.dpo import DPO, DPOConfig
from tokentune.objectives.preference import Reference, label_tokens, pair_losses, pair_rows
from tokentune.selection.base import drop_empty_rows

TINY = "builtin:tiny-llama"


def lora_policy(perturb: float = 0.3):
    """tiny-llama with LoRA whose B is random, so the policy differs from its base."""
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
    """Chosen rows then rejected rows, right-padded, prompt masked: like data/preference.collate_pairs."""
    g = torch.Generator().manual_seed(seed)
    rows = [c for c, _ in lengths] + [r for _, r in lengths]
    width, n = max(rows), len(lengths)
    ids = torch.zeros(2 * n, width, dtype=torch.long)
    labels = torch.full((2 * n, width), -100)
    for i, length in enumerate(rows):
        shared = torch.randint(3, vocab, (prompt,), generator=torch.Generator().manual_seed(seed + i % n))
        ids[i, :prompt] = shared  # the two rows of a pair share their prompt
        ids[i, prompt:length] = torch.randint(3, vocab, (length - prompt,), generator=g)
        labels[i, prompt:length] = ids[i, prompt:length]
    pos = torch.stack([torch.cat([torch.arange(length), torch.arange(width - length)]) for length in rows])
    mask = torch.stack([(torch.arange(width) < length).long() for length in rows])
    return {"input_ids": ids, "labels": labels, "loss_weights": (labels != -100).float(), "position_ids": pos,
            "attention_mask": mask, "sample_index": torch.arange(2 * n)[:, None].remainder(n).expand(-1, width),
            "is_chosen": torch.arange(2 * n) < n, "pair_index": torch.arange(2 * n) % n}


def dense_seq_logps(model, batch, weights=None):
    """Σ_t w_t log softmax(logits)[y_t] per row from the full [B, T, V] logits."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[:, :-1].float()
    y = batch["labels"][:, 1:]
    lp = F.log_softmax(logits, -1).gather(2, y.clamp_min(0)[..., None]).squeeze(2)
    w = (batch["loss_weights"] if weights is None else weights)[:, 1:] * (y != -100)
    return (lp * w).sum(1)


def dense_dpo(policy, base, batch, beta, loss_type="sigmoid", eps=0.0, weights=None):
    n = batch["input_ids"].shape[0] // 2
    with torch.no_grad():
        ref = dense_seq_logps(base, batch, weights)
    ratio = dense_seq_logps(policy, batch, weights) - ref
    h = ratio[:n] - ratio[n:]
    if loss_type == "ipo":
        return ((h - 1 / (2 * beta)) ** 2).sum()
    return (-(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)).sum()


def bound(objective, adapter=None, ref_model=None, ref_view=None):
    objective.reference = Reference(adapter=adapter) if ref_model is None else Reference(model=ref_model, view=ref_view)
    return objective


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(ours: dict, theirs: dict):
    """Equal up to float32 noise relative to the largest gradient entry (IPO's gradients are large)."""
    assert ours.keys() == theirs.keys() and len(ours) > 0
    scale = max(float(g.abs().max()) for g in theirs.values())
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=2e-5 * scale, rtol=1e-4)


# --- the loss against a dense reference -----------------------------------------------------------------


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_chunked_loss_and_gradients_equal_the_dense_reference(loss_type, eps):
    policy, adapter = lora_policy()
    base = load_model(ModelConfig(name=TINY, attn_implementation="sdpa")).model
    batch = pref_batch(policy.model.config.vocab_size)
    dpo = bound(DPO(DPOConfig(beta=0.5, loss_type=loss_type, label_smoothing=eps)), adapter)
    out = dpo(policy.model, policy.view, batch, chunk_size=3)
    out.loss_sum.backward()
    ours = grads(policy.model)
    policy.model.zero_grad()
    ref = dense_dpo(policy.model, base, batch, 0.5, loss_type, eps)
    ref.backward()
    torch.testing.assert_close(out.loss_sum, ref, atol=1e-5, rtol=1e-5)
    assert_same_grads(ours, grads(policy.model))
    assert float(out.weight_sum) == 2 and float(dpo.weight_total(batch)) == 2


def test_reference_mode_gives_the_base_model_and_no_gradient():
    policy, adapter = lora_policy()
    base = load_model(ModelConfig(name=TINY, attn_implementation="sdpa")).model
    batch = pref_batch(policy.model.config.vocab_size)
    rows, cols, targets = label_tokens(batch)
    policy.model.train()
    ref = Reference(adapter=adapter).logps(policy.model, policy.view, batch, rows, cols, targets, 4)
    assert policy.model.training and not ref.requires_grad  # eval mode inside only
    with torch.no_grad():
        dense = F.log_softmax(base(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits, -1)
        tuned = F.log_softmax(policy.model(input_ids=batch["input_ids"],
                                           position_ids=batch["position_ids"]).logits, -1)
    torch.testing.assert_close(ref, dense[rows, cols, targets], atol=1e-5, rtol=1e-5)
    assert (tuned[rows, cols, targets] - ref).abs().max() > 1e-2  # the policy itself is not the base


def test_closed_forms_of_the_pairwise_losses():
    h = torch.tensor([2.0, -1.0, 0.0])
    torch.testing.assert_close(pair_losses(h, DPOConfig(beta=0.1)), torch.log1p(torch.exp(-0.1 * h)))
    torch.testing.assert_close(pair_losses(h, DPOConfig(beta=0.25, loss_type="ipo")), (h - 2.0) ** 2)
    eps = 0.1
    want = (1 - eps) * torch.log1p(torch.exp(-0.1 * h)) + eps * torch.log1p(torch.exp(0.1 * h))
    torch.testing.assert_close(pair_losses(h, DPOConfig(beta=0.1, label_smoothing=eps)), want)
    with pytest.raises(ValueError, match="sigmoid"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1)


def test_policy_equal_to_reference_gives_log_two_and_zero_rewards():
    policy, adapter = lora_policy(perturb=0.0)  # LoRA's B starts at zero
    batch = pref_batch(policy.model.config.vocab_size)
    out = bound(DPO(DPOConfig()), adapter)(policy.model, policy.view, batch, chunk_size=5)
    assert float(out.loss_sum.detach()) == pytest.approx(2 * math.log(2), abs=1e-6)
    m = out.metrics
    assert m["pairs"] == 2 and m["reward_margin"] == pytest.approx(0, abs=1e-6) and m["reward_correct"] == 0


def test_steps_on_one_batch_raise_the_margin():
    policy, adapter = lora_policy(perturb=0.0)
    batch = pref_batch(policy.model.config.vocab_size)
    dpo = bound(DPO(DPOConfig(beta=0.5)), adapter)
    params = [p for g in adapter.param_groups() for _, p in g.params]
    opt = torch.optim.Adam(params, lr=1e-2)
    history = []
    for _ in range(8):
        out = dpo(policy.model, policy.view, batch, chunk_size=4)
        opt.zero_grad()
        out.loss_sum.backward()
        opt.step()
        history.append(out)
    assert float(history[-1].loss_sum.detach()) < float(history[0].loss_sum.detach()) - 0.1
    assert history[-1].metrics["reward_correct"] == 2 and history[-1].metrics["reward_margin"] > 0


def test_token_weights_scale_the_log_ratios():
    policy, adapter = lora_policy()
    base = load_model(ModelConfig(name=TINY, attn_implementation="sdpa")).model
    batch = pref_batch(policy.model.config.vocab_size)
    weights = batch["loss_weights"].clone()
    weights[0, 5], weights[3, 4], weights[2, 6] = 0.0, 0.5, 2.0
    batch["loss_weights"] = weights
    out = bound(DPO(DPOConfig(beta=0.3)), adapter)(policy.model, policy.view, batch, chunk_size=4)
    torch.testing.assert_close(out.loss_sum, dense_dpo(policy.model, base, batch, 0.3), atol=1e-5, rtol=1e-5)


def test_pairs_missing_a_row_are_left_out_and_accumulation_equals_a_bigger_batch():
    policy, adapter = lora_policy()
    dpo = bound(DPO(DPOConfig()), adapter)
    batch = pref_batch(policy.model.config.vocab_size, lengths=((9, 7), (6, 10), (8, 8)))
    full = dpo(policy.model, policy.view, batch, chunk_size=4)
    # a selector drops the rejected row of pair 1: that pair no longer counts, and the row is not computed
    dropped = dict(batch, loss_weights=batch["loss_weights"].clone())
    dropped["loss_weights"][4] = 0
    dropped = drop_empty_rows(dropped)
    assert dropped["input_ids"].shape[0] == 5 and float(dpo.weight_total(dropped)) == 2
    chosen, rejected = pair_rows(dropped)
    assert dropped["pair_index"][chosen].tolist() == dropped["pair_index"][rejected].tolist() == [0, 2]
    part = dpo(policy.model, policy.view, dropped, chunk_size=4)
    singles = [dpo(policy.model, policy.view, _one_pair(batch, i), chunk_size=4) for i in range(3)]
    torch.testing.assert_close(part.loss_sum, singles[0].loss_sum + singles[2].loss_sum)
    torch.testing.assert_close(full.loss_sum, sum(s.loss_sum for s in singles))
    assert sum(float(s.weight_sum) for s in singles) == float(full.weight_sum) == 3


def _one_pair(batch, i):
    n = batch["input_ids"].shape[0] // 2
    keep = torch.tensor([i, n + i])
    out = {k: v[keep] for k, v in batch.items()}
    out["pair_index"] = torch.zeros(2, dtype=torch.long)
    return out


def test_no_complete_pair_gives_zero_loss_with_a_graph():
    policy, adapter = lora_policy()
    batch = pref_batch(policy.model.config.vocab_size)
    batch["loss_weights"] = torch.zeros_like(batch["loss_weights"])  # the trainer's filler batch
    dpo = bound(DPO(DPOConfig()), adapter)
    out = dpo(policy.model, policy.view, batch, chunk_size=4)
    assert float(out.loss_sum.detach()) == 0 and out.loss_sum.requires_grad and float(dpo.weight_total(batch)) == 0
    out.loss_sum.backward()


def test_unbound_and_non_preference_batches_are_errors():
    policy, adapter = lora_policy()
    batch = pref_batch(policy.model.config.vocab_size)
    with pytest.raises(TokentuneError, match="no reference model"):
        DPO(DPOConfig())(policy.model, policy.view, batch)
    plain = {k: v for k, v in batch.items() if k not in ("is_chosen", "pair_index")}
    with pytest.raises(TokentuneError, match="preference data"):
        bound(DPO(DPOConfig()), adapter)(policy.model, policy.view, plain)


# --- bind: the reference of a run ---------------------------------------------------------------------------


def _session(adapter, loaded, reference="adapter", selectors=()):
    cfg = SimpleNamespace(model=ModelConfig(name=TINY, attn_implementation="sdpa"))
    return SimpleNamespace(cfg=cfg, adapter=adapter, view=loaded.view, selectors=list(selectors), splits=None,
                           device=torch.device("cpu"), env=SimpleNamespace(is_main=True))


def test_full_fine_tuning_needs_a_reference_copy():
    loaded = load_model(ModelConfig(name=TINY, attn_implementation="sdpa"))
    adapter = FullAdapter()
    adapter.attach(loaded.model, loaded.view)
    with pytest.raises(TokentuneError, match="reference: copy"):
        DPO(DPOConfig()).bind(_session(adapter, loaded))
    dpo = DPO(DPOConfig(reference="copy"))
    dpo.bind(_session(adapter, loaded))
    ref_model = dpo.reference.model
    assert ref_model is not loaded.model and not any(p.requires_grad for p in ref_model.parameters())
    with torch.no_grad():  # the policy moves away from its start; the copy stays the base
        for p in loaded.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = pref_batch(loaded.model.config.vocab_size)
    base = load_model(ModelConfig(name=TINY, attn_implementation="sdpa")).model
    out = dpo(loaded.model, loaded.view, batch, chunk_size=4)
    out.loss_sum.backward()
    assert all(p.grad is None for p in ref_model.parameters())
    ours = grads(loaded.model)
    loaded.model.zero_grad()
    ref = dense_dpo(loaded.model, base, batch, 0.1)
    ref.backward()
    torch.testing.assert_close(out.loss_sum, ref, atol=1e-5, rtol=1e-5)
    assert_same_grads(ours, grads(loaded.model))


def test_dpo_refuses_the_critical_tokens_selector():
    policy, adapter = lora_policy()
    with pytest.raises(TokentuneError, match="cdpo"):
        DPO(DPOConfig()).bind(_session(adapter, policy, selectors=[SimpleNamespace(name="critical_tokens")]))


# --- end to end -----------------------------------------------------------------------------------------------


def write_preferences(path, n, seed=0):
    import random

    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            fh.write(json.dumps({"prompt": f"What is {a} plus {b}?", "chosen": f" {a + b}",
                                 "rejected": f" {a + b + rng.randint(1, 3)}"}) + "\n")
    return path


def dpo_config(tmp, **train):
    data = {"train": str(write_preferences(tmp / "train.jsonl", 16)),
            "eval": str(write_preferences(tmp / "eval.jsonl", 4, seed=1)), "max_length": 32}
    return write_config(tmp, data=data, objective={"name": "dpo", "beta": 0.5},
                        train={"max_steps": 3, "lr": 2e-2, **train},
                        eval={"at_start": True, "generate": True}, log={"report": False, "tensorboard": False})


def test_training_run_logs_rewards_and_accumulation_equals_a_bigger_batch(tmp_path):
    big = dpo_config(tmp_path / "big", batch_size=4, grad_accum=1)
    small = dpo_config(tmp_path / "small", batch_size=2, grad_accum=2)
    assert main(["train", str(big)]) == 0 and main(["train", str(small)]) == 0
    a, b = losses(tmp_path / "big" / "run"), losses(tmp_path / "small" / "run")
    assert a[0] == pytest.approx(math.log(2), abs=1e-6)  # LoRA starts as its base: policy = reference
    assert a == pytest.approx(b, abs=1e-5)
    lines = [json.loads(line) for line in (tmp_path / "big" / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r.get("loss") is not None]
    assert steps[0]["loss_tokens"] == 4 and 0 <= steps[-1]["dpo/reward_accuracy"] <= 1
    assert {"dpo/reward_margin", "dpo/reward_chosen", "dpo/reward_rejected"} <= set(steps[-1])
    summary = json.loads((tmp_path / "big" / "run" / "summary.json").read_text())
    assert summary["before"]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["before"]["eval/reward_accuracy"] == 0 and "eval/ppl" not in summary["after"]
    assert summary["after"]["eval/reward_margin"] != 0
    assert 0 <= summary["after"]["eval/exact_match"] <= 1  # greedy reply vs the chosen reply


def test_the_example_config_is_valid():
    from pathlib import Path

    from tokentune.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "examples" / "dpo_math.yaml")
    assert cfg.objective.name == "dpo" and cfg.adapter.name == "lora"


def test_preference_data_with_another_objective_is_an_error(tmp_path):
    cfg = dpo_config(tmp_path)
    assert main(["train", str(cfg), "objective={name: cross_entropy}"]) == 2
    assert main(["train", str(cfg), "adapter={name: full}"]) == 2  # no switch-off: reference: copy needed
    assert main(["train", str(cfg), "data.packing=true"]) == 2
