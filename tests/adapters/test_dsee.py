"""DSEE against the spec's verification checks and independent references: the layer's function probed with
one-hot inputs (never its own formulas), the parameter-count formula on BERT-base's real shapes, a by-hand
global magnitude ranking, planted sparse outliers for GreBsmo, the official code's GreBsmo loop, and heads
removed by hand for structured pruning."""

import copy
import shutil
from types import SimpleNamespace

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from tokentune.adapters.dsee import DseeAdapter, DseeConfig
from tokentune.adapters.dsee_support import grebsmo_scores, select_support
from tokentune.errors import TokentuneError

from .helpers import attach, ids, logits, randomize

FAKE_TRAINER = SimpleNamespace(total_steps=10, env=SimpleNamespace(is_main=False))


@pytest.fixture(params=["llama", "gpt2"])
def model(request, tiny_llama, tiny_gpt2):
    return tiny_llama if request.param == "llama" else tiny_gpt2


def dsee(model, **cfg):
    torch.manual_seed(0)
    return attach(DseeAdapter(DseeConfig(**{"r": 4, "num_sparse": 8, **cfg})), model)


@torch.no_grad()
def effective_weight(layer) -> torch.Tensor:
    """[out, in] of whatever linear map `layer` computes, probed with one-hot inputs."""
    n_in = layer.in_features
    eye = torch.eye(n_in)
    return (layer(eye) - layer(torch.zeros(1, n_in))).T


def pretrained(wrapper) -> torch.Tensor:
    w = wrapper.base_layer.weight.detach()
    return w.T if isinstance(wrapper.base_layer, Conv1D) else w


def train_steps(model, adapter, steps=3):
    opt = torch.optim.AdamW([p for g in adapter.param_groups() for _, p in g.params], lr=1e-2, weight_decay=0.1)
    x = ids(seed=5)
    model.train()
    for _ in range(steps):
        model(input_ids=x, labels=x).loss.backward()
        adapter.after_backward(FAKE_TRAINER, 0, {})
        opt.step()
        opt.zero_grad()
    model.eval()


# --- check 1: |Ω| = N, S₂ exactly zero off Ω, first forward = frozen model -------------------------------

def test_support_has_n_entries_and_sparse_update_stays_on_it(model):
    base = logits(model)
    adapter = dsee(model, pruning="none")
    assert torch.equal(logits(model), base)  # U = 0, S₂ = 0
    train_steps(model, adapter)
    assert not torch.allclose(logits(model), base, atol=1e-4)
    for wrapper in adapter.wrappers.values():
        omega = wrapper.sparse_index
        assert omega.numel() == 8 and omega.unique().numel() == 8
        uv = wrapper.lora_B.weight @ wrapper.lora_A.weight
        s2 = (effective_weight(wrapper) - pretrained(wrapper) - wrapper.scale * uv) / wrapper.scale
        off = torch.ones(s2.numel(), dtype=torch.bool)
        off[omega] = False
        assert s2.flatten()[off].abs().max() < 1e-5
        assert s2.flatten()[omega].abs().min() > 1e-4  # the entries on Ω did train


# --- check 2: trainable count = Σ [(m + n)·r + N] (+ head) ------------------------------------------------

def test_trainable_count_on_bert_base_shapes():
    from transformers import BertConfig, BertForSequenceClassification

    with torch.device("meta"):  # BERT-base's real shapes without allocating it
        bert = BertForSequenceClassification(BertConfig(num_labels=2))
    attach(DseeAdapter(DseeConfig(r=8, num_sparse=128, sparse_init="random")), bert)
    trainable = sum(p.numel() for p in bert.parameters() if p.requires_grad)
    assert trainable == 294_912 + 3_072 + (768 * 2 + 2)  # the spec's "298.0K", plus the fresh classifier


# --- check 3: global sparsity of the pretrained weights, S₁ never on UV or S₂ -------------------------------

def test_unstructured_pruning_is_global_and_spares_the_update(model):
    adapter = dsee(model, sparsity=0.3)
    randomize(adapter, std=0.05)
    eff = {n: effective_weight(w) for n, w in adapter.wrappers.items()}
    updates = {n: eff[n] - pretrained(w) for n, w in adapter.wrappers.items()}
    # By hand: the round(0.3 · total) smallest |merged| entries over all targeted matrices together.
    flat = torch.cat([e.abs().flatten() for e in eff.values()])
    k = round(0.3 * flat.numel())
    expected = torch.zeros_like(flat, dtype=torch.bool)
    expected[flat.argsort()[:k]] = True

    adapter.prune()
    pruned = torch.cat([(pretrained(w) == 0).flatten() for w in adapter.wrappers.values()])
    assert int(pruned.sum()) == k
    assert torch.equal(pruned, expected)
    per_matrix = [float((pretrained(w) == 0).float().mean()) for w in adapter.wrappers.values()]
    assert max(per_matrix) - min(per_matrix) > 0.01  # global: matrices end up with different sparsity
    for n, w in adapter.wrappers.items():
        # The function is W ⊙ S₁ + c(UV + S₂): on pruned entries only the (unmasked) update is left.
        mask = pretrained(w) != 0
        torch.testing.assert_close(effective_weight(w), eff[n] * mask + updates[n] * ~mask, atol=1e-6, rtol=0)


def test_prune_score_update_and_other_sparsity(tiny_llama):
    adapter = dsee(tiny_llama, prune_score="update", sparsity=0.5, other_sparsity=0.25)
    randomize(adapter, std=0.05)
    updates = torch.cat([(effective_weight(w) - pretrained(w)).abs().flatten() for w in adapter.wrappers.values()])
    others = {n: m.weight.detach().clone() for n, m in adapter.others.items()}
    assert sorted({n.rsplit(".", 1)[-1] for n in others}) == ["down_proj", "gate_proj", "k_proj", "o_proj", "up_proj"]
    adapter.prune()
    pruned = torch.cat([(pretrained(w) == 0).flatten() for w in adapter.wrappers.values()])
    assert torch.equal(pruned.nonzero().flatten().sort().values,
                       updates.argsort()[: round(0.5 * updates.numel())].sort().values)
    flat = torch.cat([w.abs().flatten() for w in others.values()])
    cut = flat.sort().values[round(0.25 * flat.numel()) - 1]
    after = torch.cat([m.weight.flatten() for m in adapter.others.values()])
    assert int((after == 0).sum()) == round(0.25 * flat.numel())
    assert torch.equal(after == 0, flat <= cut)


# --- check 4: merged weights reproduce the factored forward --------------------------------------------------

def test_merge_is_the_hand_formula_and_exact(model):
    adapter = dsee(model)
    train_steps(model, adapter)
    adapter.prune()
    train_steps(model, adapter, steps=2)  # Phase III
    unmerged = logits(model)
    expected = {}
    for n, w in adapter.wrappers.items():
        s2 = torch.zeros(w.out_features * w.in_features)
        s2[w.sparse_index] = w.sparse_values.detach()
        upd = pretrained(w) + w.scale * (w.lora_B.weight @ w.lora_A.weight + s2.view(w.out_features, -1)).detach()
        expected[n] = upd.T if isinstance(w.base_layer, Conv1D) else upd
    adapter.merge()
    for n, weight in expected.items():
        module = model.get_submodule(n)
        assert type(module).__name__ in ("Linear", "Conv1D")
        torch.testing.assert_close(module.weight.detach(), weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)
    with pytest.raises(TokentuneError, match="merged"):
        adapter.state_dict()


# --- GreBsmo ---------------------------------------------------------------------------------------------

def _reference_grebsmo(w, iters):
    """The official code's loop (run_glue.py), one matrix, full QR of the residual for the new rows."""
    v = torch.randn(1, w.shape[1])
    for _ in range(iters):
        s = torch.zeros_like(w)
        for _ in range(2):
            u = torch.linalg.qr((w - s) @ v.T)[0]
            v = u.T @ (w - s)
            s = w - u @ v
            s[s.abs() < 0.01] = 0
        e = w - u @ v - s
        v = torch.cat([v, torch.linalg.qr(e)[1][:5]], 0)
    return s


def test_grebsmo_matches_the_official_loop():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(60, 50, generator=g) * 0.05
    torch.manual_seed(7)
    reference = _reference_grebsmo(w, iters=5)  # rank grows to 26 < the 2/3 cap (33)
    torch.manual_seed(7)
    ours = grebsmo_scores(w[None], iters=5, rank_step=5, inner=2, threshold=0.01, max_rank_fraction=2 / 3)[0]
    assert int((reference != 0).sum()) > 64
    assert torch.equal(reference.abs().flatten().topk(64).indices.sort().values,
                       ours.flatten().topk(64).indices.sort().values)


def test_grebsmo_rank_cap_keeps_a_residual_where_the_official_schedule_degenerates():
    w = torch.randn(32, 32, generator=torch.Generator().manual_seed(4)) * 0.05
    torch.manual_seed(0)
    assert torch.count_nonzero(_reference_grebsmo(w, iters=100)) == 0  # full rank: S = 0, every entry ties
    torch.manual_seed(0)
    grebsmo = dict(iters=100, rank_step=5, inner=2, threshold=0.01, max_rank_fraction=2 / 3)
    ours = grebsmo_scores(w[None], **grebsmo)[0]
    assert ours.flatten().topk(16).values.min() > 1e-3
    support = select_support([w], 16, "grebsmo", grebsmo)[0]
    assert support.unique().numel() == 16
    assert not torch.equal(support, select_support([w], 16, "magnitude", grebsmo)[0])


# --- structured pruning --------------------------------------------------------------------------------

def test_structured_l1_head_and_ffn_pruning_equal_removing_them_by_hand(tiny_llama):
    reference = copy.deepcopy(tiny_llama)
    adapter = dsee(tiny_llama, pruning="structured", head_sparsity=0.5, ffn_sparsity=0.25, l1_penalty=0.5)
    names = [n for n, _ in adapter._coef_params]
    assert names == [f"model.layers.{i}.dsee_coef.{k}" for i in range(2) for k in ("heads", "ffn")]
    coefs = dict(adapter._coef_params)
    with torch.no_grad():
        for p in coefs.values():
            p.copy_(torch.linspace(-1, 1, p.numel())[torch.randperm(p.numel())])
    for p in coefs.values():
        p.grad = torch.zeros_like(p)
    adapter.after_backward(FAKE_TRAINER, 0, {})
    for p in coefs.values():  # d/dξ of λ‖ξ‖₁
        torch.testing.assert_close(p.grad, 0.5 * torch.sign(p.detach()))

    values = {n: p.detach().clone() for n, p in coefs.items()}
    adapter.prune()
    # By hand: in every block drop the 2 of 4 heads and 16 of 64 neurons with the smallest |ξ|: zero the
    # matching input columns of o_proj / down_proj in the untouched copy (U = 0, S₂ = 0: DSEE adds nothing).
    with torch.no_grad():
        for i, layer in enumerate(reference.model.layers):
            heads = values[f"model.layers.{i}.dsee_coef.heads"].abs().argsort()[:2]
            for h in heads.tolist():
                layer.self_attn.o_proj.weight[:, h * 8:(h + 1) * 8] = 0
            layer.mlp.down_proj.weight[:, values[f"model.layers.{i}.dsee_coef.ffn"].abs().argsort()[:16]] = 0
    torch.testing.assert_close(logits(tiny_llama), logits(reference), atol=1e-5, rtol=0)
    # ξ no longer trains after the pruning
    for p in coefs.values():
        p.grad = torch.ones_like(p)
    adapter.after_backward(FAKE_TRAINER, 0, {})
    assert all(p.grad is None for p in coefs.values())
    randomize(adapter, std=0.05)
    with torch.no_grad():
        for n, p in coefs.items():
            p.copy_(p.abs() > 0.1)
    before = logits(tiny_llama)
    adapter.merge()
    assert not any("dsee_coef" in n for n, _ in tiny_llama.named_parameters())
    torch.testing.assert_close(logits(tiny_llama), before, atol=1e-5, rtol=0)


# --- phases inside a run, state, artefact ---------------------------------------------------------------

def test_prunes_once_at_prune_at_and_state_carries_the_pruning(tiny_gpt2):
    from tests.conftest import tiny_gpt2_model

    adapter = dsee(tiny_gpt2, prune_at=0.3)
    adapter.on_train_start(FAKE_TRAINER)
    for step in range(10):
        adapter.on_step_start(FAKE_TRAINER, step)
        assert adapter.pruned == (step >= 3)
    adapter.finalize(FAKE_TRAINER)  # already pruned: no second pruning
    randomize(adapter, std=0.05)
    state = adapter.state_dict()
    assert {k for k in state if k.endswith(".prune_mask")} == {f"transformer.h.{i}.attn.c_attn.prune_mask"
                                                               for i in range(2)}
    fresh = dsee(tiny_gpt2_model())  # the same unpruned base
    fresh.load_state_dict(state)
    assert fresh.pruned
    torch.testing.assert_close(logits(fresh.model), logits(tiny_gpt2), atol=1e-6, rtol=0)
    with pytest.raises(TokentuneError, match="already pruned"):
        fresh.load_state_dict({**state, "dsee.pruned": torch.tensor(0)})


def test_finalize_prunes_when_no_step_is_left(tiny_llama):
    adapter = dsee(tiny_llama, prune_at=1.0)
    adapter.on_train_start(FAKE_TRAINER)
    for step in range(10):
        adapter.on_step_start(FAKE_TRAINER, step)
    assert not adapter.pruned
    adapter.finalize(FAKE_TRAINER)
    assert adapter.pruned


def test_save_load_reproduces_the_pruned_model(tiny_llama, tmp_path):
    from tests.conftest import tiny_llama_model

    adapter = dsee(tiny_llama, other_sparsity=0.2)
    randomize(adapter, std=0.05)
    adapter.prune()
    adapter.save(tmp_path / "a", "base")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["tokentune_adapter.json", "trainable.safetensors"]
    fresh = dsee(tiny_llama_model(), other_sparsity=0.2, sparse_init="random")  # Ω comes from the file
    fresh.load(tmp_path / "a")
    torch.testing.assert_close(logits(fresh.model), logits(tiny_llama), atol=1e-6, rtol=0)
    with pytest.raises(TokentuneError, match="num_sparse"):
        dsee(tiny_llama_model(), other_sparsity=0.2, num_sparse=4).load(tmp_path / "a")


@pytest.mark.parametrize("cfg,match", [
    ({"targets": []}, "empty"), ({"targets": ["qq"]}, "unknown projection role"),
    ({"head_sparsity": 0.5}, "head_sparsity"), ({"pruning": "structured", "sparsity": 0.3}, "sparsity"),
    ({"pruning": "none", "prune_at": 0.2}, "prune_at"),
    ({"pruning": "structured", "head_sparsity": 0, "ffn_sparsity": 0}, "prunes nothing"),
])
def test_config_errors(cfg, match):
    with pytest.raises(TokentuneError, match=match):
        DseeConfig(**cfg)


def test_attach_errors(tiny_gpt2, tiny_llama):
    with pytest.raises(TokentuneError, match="no 'gate'"):
        dsee(tiny_gpt2, targets=["gate"])
    with pytest.raises(TokentuneError, match="num_sparse"):
        dsee(tiny_llama, num_sparse=10_000)
    with pytest.raises(TokentuneError, match="nothing to prune"):
        dsee(tiny_llama, pruning="none").prune()


def test_resume_across_the_pruning_equals_uninterrupted(tmp_path):
    from tests.e2e.helpers import losses, write_config
    from tokentune.cli import main

    cfg = write_config(tmp_path, adapter={"name": "dsee", "r": 4, "num_sparse": 8},
                       train={"max_steps": 4, "save_every": 1, "keep_checkpoints": 5, "lr": 1e-2},
                       eval={"at_end": False}, log={"report": False})
    run = tmp_path / "run"
    assert main(["train", str(cfg)]) == 0
    full = losses(run)
    for keep in ("step-3", "step-2"):  # after the pruning (masks in the state), then before it (prunes again)
        shutil.rmtree(run / "final")
        (run / "summary.json").unlink()
        for ckpt in (run / "checkpoints").iterdir():
            if ckpt.name > keep:
                shutil.rmtree(ckpt)
        assert main(["train", str(cfg), "--resume"]) == 0
        assert losses(run) == full
