"""CAFT against independent references: dense logits for every head, hand-computed schedules, an analytic copy
model for the shifts, per-record runs for packing, and resume / recipe runs through the CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from tests.conftest import tiny_llama_model
from tokentune.adapters.lora import LoraAdapter, LoraConfig
from tokentune.errors import TokentuneError
from tokentune.models.anatomy import ModelView
from tokentune.objectives.base import shifted_targets
from tokentune.objectives.caft import Caft, CaftConfig, offset_targets, schedule_factor
from tokentune.objectives.cross_entropy import CrossEntropy, CrossEntropyConfig

V = 128


def _model(lora: bool = True):
    model = tiny_llama_model()
    view = ModelView(model)
    if lora:
        LoraAdapter(LoraConfig(r=4, alpha=8)).attach(model, view)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # B != 0, so the adapter changes the model and both A and B get gradients
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.train(), view


def _caft(model, view, **options):
    obj = Caft(CaftConfig(**options))
    obj.attach(model, view)
    return obj


def _batch(prompt: int = 5, T: int = 12, B: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    weights = (labels != -100).float()
    weights[1, 8] = 0.5
    return {"input_ids": ids, "labels": labels, "loss_weights": weights,
            "position_ids": torch.arange(T).expand(B, -1), "attention_mask": torch.ones_like(ids)}


def _ce(logits, labels, lw, shift, mean=False):
    lg, y, w = logits[:, :-shift], labels[:, shift:], lw[:, shift:]
    ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), y.clamp_min(0).reshape(-1), reduction="none")
    ce = ce.view_as(w) * (y != -100)
    return ce.sum() / (y != -100).sum() if mean else (ce * w).sum()


def _dense(model, obj, batch, *, mean=False, main=True):
    """All logits [B, T, V] of every head; transformer heads run the official way (no mask: causal SDPA)."""
    cfg = obj.config
    out = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], output_hidden_states=True)
    h = out.last_hidden_state
    x0 = h if cfg.head_input == "final" else out.hidden_states[-2]
    pe = model.model.rotary_emb(h, position_ids=batch["position_ids"])
    labels, lw = batch["labels"], batch["loss_weights"]
    total = _ce(model.lm_head(h), labels, lw, 1, mean) if main else 0.0
    for k, (head, w) in enumerate(zip(obj.heads.heads, obj.head_weights()), start=1):
        x = x0
        for block in head.layers:
            x = block(x) if cfg.head_arch == "linear" else block(x, position_embeddings=pe)
        if cfg.head_norm:
            x = model.model.norm(x)
        total = total + w * _ce((head.unembed or model.lm_head)(x), labels, lw, 1 + k, mean)
    return total


# --- construction ---------------------------------------------------------------------------------
def test_transformer_heads_copy_the_second_to_last_layer_through_lora():
    model, view = _model()
    obj = _caft(model, view)
    assert model.tokentune_caft_heads is obj.heads and len(obj.heads.heads) == 4
    source = {n.replace(".base_layer.", "."): p for n, p in view.layers[-2].named_parameters() if "lora_" not in n}
    for head in obj.heads.heads:
        assert len(head.layers) == 1 and type(head.layers[0]) is type(view.layers[-2]) and head.unembed is None
        own = dict(head.layers[0].named_parameters())
        assert own.keys() == source.keys()
        for n, p in own.items():
            assert torch.equal(p, source[n]) and p.data_ptr() != source[n].data_ptr() and p.requires_grad
    block_params = sum(p.numel() for n, p in source.items())
    assert sum(p.numel() for p in obj.heads.parameters()) == 4 * block_params
    assert [g.name for g in obj.param_groups()] == ["caft_heads"]


def test_linear_heads_shapes_and_separate_unembedding():
    model, view = _model(lora=False)
    obj = _caft(model, view, head_arch="linear", num_heads=3, num_layers=2, separate_unembedding=True)
    assert len(obj.heads.heads) == 3
    for head in obj.heads.heads:
        assert [tuple(b.linear.weight.shape) for b in head.layers] == [(32, 32), (32, 32)]
        assert torch.equal(head.unembed.weight, view.lm_head.weight)
        assert head.unembed.weight.data_ptr() != view.lm_head.weight.data_ptr()


def test_linear_heads_are_the_identity_at_init():
    """Spec check 3: with zero-initialised W the head's logits are the main head's logits."""
    model, view = _model()
    obj = _caft(model, view, head_arch="linear")
    h = torch.randn(2, 7, 32)
    for head in obj.heads.heads:
        torch.testing.assert_close(view.lm_head(head(h)), view.lm_head(h), rtol=0, atol=0)


# --- schedule and weights -------------------------------------------------------------------------
def test_schedules_at_given_steps():
    assert schedule_factor("rsine", 0, 100) == 1.0 and schedule_factor("rsine", 100, 100) == pytest.approx(0, abs=1e-12)
    assert schedule_factor("rsine", 50, 100) == pytest.approx(math.sqrt(0.5))
    assert schedule_factor("sine", 0, 100) == 0.0 and schedule_factor("sine", 100, 100) == pytest.approx(1.0)
    assert schedule_factor("linear", 25, 100) == 0.25 and schedule_factor("constant", 7, 100) == 1.0
    assert schedule_factor("sine_0.5", 25, 100) == pytest.approx(math.sqrt(0.5))
    assert schedule_factor("sine_0.5", 60, 100) == 1.0
    assert schedule_factor("sine", 0, 0) == 1.0  # the code's max_steps == 0 case
    with pytest.raises(TokentuneError, match="schedule"):
        CaftConfig(schedule="cosine")
    with pytest.raises(TokentuneError, match="schedule"):
        CaftConfig(schedule="sine_1.5")


def test_head_weights_decay_and_follow_the_trainer_step():
    """Spec check 4: total auxiliary weight at step 0 is 0.01 (0.8 + 0.64 + 0.512 + 0.4096)."""
    obj = Caft(CaftConfig())

    class Trainer:
        total_steps = 10

    obj.on_step_start(Trainer(), 0)
    assert obj.head_weights() == pytest.approx([0.008, 0.0064, 0.00512, 0.004096])
    assert sum(obj.head_weights()) == pytest.approx(0.01 * (0.8 + 0.64 + 0.512 + 0.4096))
    obj.on_step_start(Trainer(), 4)
    s = math.sin(math.pi / 2 * 6 / 10)
    assert obj.head_weights() == pytest.approx([0.01 * 0.8 ** k * s for k in range(1, 5)])
    stage1 = CaftConfig(heads_only=True)
    assert (stage1.coefficient, stage1.schedule, stage1.heads_trainable) == (1.0, "constant", True)
    assert CaftConfig(heads="x").heads_trainable is False and CaftConfig().heads_trainable is True


# --- the loss -------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"head_arch": "linear", "head_input": "penultimate"},
                                     {"head_input": "penultimate", "separate_unembedding": True, "head_norm": True}])
def test_loss_and_gradients_equal_the_dense_reference(options):
    model, view = _model()
    obj = _caft(model, view, coefficient=0.3, **options)  # large c: the heads' share is far above tolerance
    if obj.config.head_arch == "linear":
        with torch.no_grad():
            for p in obj.heads.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    obj.step, obj.total_steps = 3, 10
    batch = _batch()
    out = obj(model, view, batch, chunk_size=5)
    out.loss_sum.backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ours = {n: p.grad.clone() for n, p in trained}
    model.zero_grad()
    ref = _dense(model, obj, batch)
    ref.backward()
    torch.testing.assert_close(out.loss_sum, ref, atol=1e-4, rtol=1e-5)
    assert any("caft_heads" in n for n in ours) and any("lora_A" in n for n in ours)
    for n, p in trained:
        torch.testing.assert_close(ours[n], p.grad, atol=1e-5, rtol=1e-3, msg=n)
    assert float(out.weight_sum) == float(obj.weight_total(batch))


def test_per_head_sum_over_main_weight_is_the_codes_per_head_mean():
    """With a prompt of >= K tokens every head has as many targets as the main head, so the engine's normaliser
    turns the per-token sums into the paper code's L_0 + sum c d^k s L_k (each L_k a mean)."""
    model, view = _model()
    obj = _caft(model, view, coefficient=0.5)
    batch = _batch(prompt=5)
    batch["loss_weights"] = (batch["labels"] != -100).float()
    out = obj(model, view, batch)
    with torch.no_grad():
        ref = _dense(model, obj, batch, mean=True)
    torch.testing.assert_close(out.loss_sum / obj.weight_total(batch), ref, atol=1e-5, rtol=1e-5)
    counts = {k: float(v) for k, v in out.metrics.items() if k.endswith("_weight")}
    assert set(counts.values()) == {float(obj.weight_total(batch))}


def test_zero_coefficient_is_plain_sft():
    """Spec check 1: c = 0 gives the loss and the gradients of next-token cross-entropy."""
    model, view = _model()
    obj = _caft(model, view, coefficient=0.0)
    batch = _batch()
    out = obj(model, view, batch)
    out.loss_sum.backward()
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    ours = [p.grad.clone() for _, p in lora]
    model.zero_grad()
    ce = CrossEntropy(CrossEntropyConfig())(model, view, batch)
    ce.loss_sum.backward()
    assert torch.equal(out.loss_sum, ce.loss_sum) and torch.equal(out.token_losses, ce.token_losses)
    for g, (_, p) in zip(ours, lora):
        assert torch.equal(g, p.grad)


class _CopyModel(nn.Module):
    """hidden(t) = alpha · onehot(x_t) and an identity LM head: every head's logits are alpha · onehot(x_t)."""

    def __init__(self, vocab: int, alpha: float):
        super().__init__()
        self.alpha = alpha
        self.lm_head = nn.Linear(vocab, vocab, bias=False)
        nn.init.eye_(self.lm_head.weight)

    def forward(self, input_ids, position_ids=None, use_cache=None):
        return (F.one_hot(input_ids, self.lm_head.weight.shape[0]).float() * self.alpha,)


class _CopyView:
    is_causal = True

    def __init__(self, model):
        self.model, self.backbone, self.lm_head = model, model, model.lm_head


@pytest.mark.parametrize("period", [2, 3, 4, 5])
def test_head_k_is_scored_on_token_t_plus_1_plus_k(period):
    """Spec check 2: on a sequence of period p, x_t = x_{t+1+k} exactly when p divides 1 + k; those heads' loss is
    log(e^a + V - 1) - a at every position, every other head's (and the main head's) is log(e^a + V - 1)."""
    vocab, alpha, T = 8, 3.0, 20
    model = _CopyModel(vocab, alpha).train()
    obj = _caft(model, _CopyView(model), head_arch="linear", coefficient=1.0, schedule="constant")
    ids = torch.tensor([[1 + t % period for t in range(T)]])
    batch = {"input_ids": ids, "labels": ids.clone(), "loss_weights": torch.ones(1, T),
             "position_ids": torch.arange(T)[None], "attention_mask": torch.ones_like(ids)}
    out = obj(model, _CopyView(model), batch)
    base = math.log(math.exp(alpha) + vocab - 1)
    assert out.token_losses.tolist() == pytest.approx([base] * (T - 1))
    for k in range(1, 5):
        n = T - 1 - k
        assert float(out.metrics[f"caft_head{k}_weight"]) == n
        expected = base - alpha if (1 + k) % period == 0 else base
        assert float(out.metrics[f"caft_head{k}_loss"]) == pytest.approx(n * expected, rel=1e-6)


# --- packing --------------------------------------------------------------------------------------
def _records(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, V, (n,), generator=g)
        labels = ids.clone()
        labels[0] = -100  # the main head never predicts across a record either
        out.append((ids, labels))
    return out


def _packed(rows):
    """rows: lists of records -> one right-padded packed batch (positions restart per record and in padding)."""
    width = max(sum(len(i) for i, _ in row) for row in rows)
    batch = {k: [] for k in ("input_ids", "labels", "position_ids", "sample_index")}
    index = 0
    for row in rows:
        ids, labels, pos, sample = [], [], [], []
        for rid, rlab in row:
            ids += rid.tolist(); labels += rlab.tolist(); pos += list(range(len(rid))); sample += [index] * len(rid)
            index += 1
        pad = width - len(ids)
        batch["input_ids"].append(ids + [0] * pad); batch["labels"].append(labels + [-100] * pad)
        batch["position_ids"].append(pos + list(range(pad))); batch["sample_index"].append(sample + [-1] * pad)
    batch = {k: torch.tensor(v) for k, v in batch.items()}
    batch["loss_weights"] = (batch["labels"] != -100).float()
    batch["attention_mask"] = (batch["sample_index"] >= 0).long()
    return batch


def test_offsets_never_cross_packed_records():
    batch = _packed([_records([3, 6, 2]), _records([5], seed=1)])
    for offset in range(1, 7):
        pos, targets, _ = offset_targets(batch, offset)
        rows, cols = pos[:, 0], pos[:, 1]
        assert torch.equal(batch["sample_index"][rows, cols], batch["sample_index"][rows, cols + offset])
        assert torch.equal(targets, batch["labels"][rows, cols + offset])
        # brute force: every (t, t + offset) inside one record whose target carries loss
        expected = [(b, t) for b in range(2) for t in range(batch["labels"].shape[1] - offset)
                    if batch["sample_index"][b, t] == batch["sample_index"][b, t + offset] >= 0
                    and batch["labels"][b, t + offset] != -100]
        assert [tuple(p) for p in pos.tolist()] == expected
    assert torch.equal(offset_targets(_batch(), 1)[0], shifted_targets(_batch())[0])


def test_packed_loss_is_the_sum_of_per_record_losses():
    """Transformer heads on a packed row see only their own record (the trunk's block-diagonal mask)."""
    model, view = _model()
    obj = _caft(model, view, coefficient=0.5)
    rows = [_records([7, 9]), _records([10], seed=1)]
    packed = obj(model, view, _packed(rows))
    alone = [obj(model, view, _packed([[record]])) for row in rows for record in row]
    torch.testing.assert_close(packed.loss_sum, sum(o.loss_sum for o in alone), atol=1e-4, rtol=1e-5)
    for k in range(1, 5):
        key = f"caft_head{k}_loss"
        torch.testing.assert_close(packed.metrics[key], sum(o.metrics[key] for o in alone), atol=1e-4, rtol=1e-5)


# --- stages, state, files -------------------------------------------------------------------------
def test_heads_only_trains_the_heads_alone_and_eval_reports_the_next_token_loss():
    model, view = _model()
    obj = _caft(model, view, heads_only=True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {"tokentune_caft_heads." + n for n, _ in obj.heads.named_parameters()}
    batch = _batch()
    out = obj(model, view, batch)
    with torch.no_grad():
        torch.testing.assert_close(out.loss_sum, _dense(model, obj, batch, main=False), atol=1e-4, rtol=1e-5)
    assert out.token_losses is None
    model.eval()
    ev = obj(model, view, batch)
    ce = CrossEntropy(CrossEntropyConfig())(model, view, batch)
    torch.testing.assert_close(ev.loss_sum, ce.loss_sum)
    assert set(obj.eval_metrics(ev.metrics)) == {f"eval/caft_head{k}_loss" for k in range(1, 5)}
    with pytest.raises(TokentuneError, match="heads_only"):
        CaftConfig(heads_only=True, train_heads=False)


def test_saved_heads_load_frozen_and_must_match(tmp_path):
    model, view = _model()
    obj = _caft(model, view)
    with torch.no_grad():
        for p in obj.heads.parameters():
            p.add_(0.01)
    obj.save(tmp_path / "final" / "objective")
    m2, v2 = _model()
    loaded = _caft(m2, v2, heads=str(tmp_path))  # a run directory: final/objective is found
    for a, b in zip(obj.heads.state_dict().values(), loaded.heads.state_dict().values()):
        assert torch.equal(a, b)
    assert loaded.param_groups() == [] and loaded.state_dict() == {}
    assert not any(p.requires_grad for p in loaded.heads.parameters())
    with pytest.raises(TokentuneError, match="num_heads"):
        _caft(*_model(), num_heads=3, heads=str(tmp_path))
    with pytest.raises(TokentuneError, match="caft_heads.safetensors"):
        _caft(*_model(), heads=str(tmp_path / "nothing"))
    state = obj.state_dict()
    assert len(state) == len(list(obj.heads.parameters()))
    with pytest.raises(TokentuneError, match="missing"):
        obj.load_state_dict({})


# --- through the CLI: resume and the two-stage recipe ---------------------------------------------
def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_resume_reproduces_losses_and_schedule(tmp_path):
    import shutil

    from tests.e2e.helpers import write_config
    from tokentune.cli import main

    cfg = write_config(tmp_path, objective={"name": "caft", "coefficient": 0.5},
                       train={"max_steps": 6, "save_every": 3, "keep_checkpoints": 5})
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "run"
    full = _metrics(run)
    assert [m["caft/schedule"] for m in full] == pytest.approx([math.sin(math.pi / 2 * (6 - s) / 6) for s in range(6)])
    shutil.rmtree(run / "final")
    for name in ["summary.json", "report.html"]:
        (run / name).unlink(missing_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in full[:3]))
    assert main(["train", str(cfg), "--resume"]) == 0
    again = _metrics(run)
    keys = ["loss", "caft/schedule", "caft/head1_loss", "caft/head4_loss"]
    assert [[m[k] for k in keys] for m in again] == [[m[k] for k in keys] for m in full]
    assert (run / "final" / "objective" / "caft_heads.safetensors").is_file()


def test_caft_heads_recipe_trains_heads_then_fine_tunes_with_them_frozen(tmp_path):
    from safetensors.torch import load_file

    from tests.e2e.helpers import write_config
    from tokentune.cli import main

    cfg = write_config(tmp_path, objective={"name": "caft", "head_arch": "linear"}, train={"max_steps": 3})
    tree = yaml.safe_load(cfg.read_text())
    tree["recipe"] = {"heads_train": {"max_steps": 3, "lr": 1e-2}}
    cfg.write_text(yaml.safe_dump(tree))
    assert main(["recipe", "caft_heads", str(cfg)]) == 0
    run = tmp_path / "run"
    heads1 = load_file(run / "heads" / "final" / "objective" / "caft_heads.safetensors")
    heads2 = load_file(run / "caft" / "final" / "objective" / "caft_heads.safetensors")
    assert any(v.abs().sum() > 0 for k, v in heads1.items() if k.endswith("linear.weight"))  # trained from zero
    assert heads1.keys() == heads2.keys() and all(torch.equal(heads1[k], heads2[k]) for k in heads1)  # frozen
    stage1 = _metrics(run / "heads")
    assert all(m["caft/schedule"] == 1.0 for m in stage1)
    lora1 = load_file(run / "heads" / "final" / "adapter_model.safetensors")
    assert all(float(v.abs().sum()) == 0 for k, v in lora1.items() if "lora_B" in k)  # the model did not change
    summary = json.loads((run / "recipe_summary.json").read_text())
    assert set(summary["stages"]) == {"heads", "caft"}
    stage2 = yaml.safe_load((run / "caft" / "config.yaml").read_text())["objective"]
    assert stage2["heads"] == str(run / "heads") and stage2["train_heads"] is None
