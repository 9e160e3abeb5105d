"""LT-SFT against its spec: the phase plan, exact top-K selection, the hooks on a stand-in trainer (iterations,
weight decay, L1, checkpoint state), and real runs through the CLI: phase 1 equals full fine-tuning, the mask is
the top K of the phase-1 change, unselected entries stay pretrained, resume equals uninterrupted, and
`tokentune compose` writes base + diffs as a plain Hugging Face model."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from tests.adapters.helpers import tiny_bert_classifier
from tests.conftest import tiny_llama_model
from tests.e2e.helpers import losses, write_config
from tokentune.adapters.lt_sft import LtSftAdapter, LtSftConfig, phase_plan, top_k_masks
from tokentune.adapters.sparse_diff import SparseDiff
from tokentune.cli import main
from tokentune.config import TrainConfig
from tokentune.engine.optim import build_optimizer, build_scheduler
from tokentune.errors import TokentuneError
from tokentune.models.anatomy import ModelView


def _attach(model, **cfg) -> LtSftAdapter:
    adapter = LtSftAdapter(LtSftConfig(**cfg))
    adapter.attach(model, ModelView(model))
    return adapter


def _trainer(adapter, total: int, weight_decay: float = 0.0):
    """What the hooks read from the Trainer: its config, AdamW over the adapter's groups, the scheduler."""
    t = TrainConfig(max_steps=total, lr=0.05, weight_decay=weight_decay, schedule="constant")
    optimizer = build_optimizer(adapter.param_groups(), t, torch.device("cpu"))
    trainer = SimpleNamespace(cfg=SimpleNamespace(train=t), optimizer=optimizer, total_steps=total,
                              scheduler=build_scheduler(optimizer, t, total))
    adapter.on_train_start(trainer)
    return trainer


def _steps(adapter, trainer, steps, seed: int = 0, after_step=None):
    """The trainer's step order with random gradients standing in for the loss."""
    g = torch.Generator().manual_seed(seed)
    params = [p for grp in adapter.param_groups() for _, p in grp.params]
    for step in steps:
        adapter.on_step_start(trainer, step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        adapter.after_backward(trainer, step, {})
        trainer.optimizer.step()
        trainer.scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        adapter.after_optimizer_step(trainer, step)
        if after_step:
            after_step(step)


def _unselected_equal_theta0(adapter, theta0) -> None:
    for n, p in adapter._maskable:
        keep = ~adapter.mask[n]
        assert torch.equal(p.detach()[keep], theta0[n][keep]), n


# --- pure pieces --------------------------------------------------------------------------------------

def test_phase_plan_splits_each_iteration_in_two():
    assert [(p.iteration, p.phase, p.start, p.steps) for p in phase_plan(8, 1, 0.5)] == [(0, 1, 0, 4), (0, 2, 4, 4)]
    # 7 steps, 2 iterations: 4 + 3 steps; round(1.5) = 2 full steps in the second.
    assert [(p.start, p.steps) for p in phase_plan(7, 2, 0.5)] == [(0, 2), (2, 2), (4, 2), (6, 1)]
    assert [(p.start, p.steps) for p in phase_plan(4, 1, 0.9)] == [(0, 3), (3, 1)]  # each phase >= 1 step
    with pytest.raises(TokentuneError, match="at least 2 steps per iteration"):
        phase_plan(3, 2, 0.5)


def test_top_k_is_exact_with_ties_broken_by_position():
    scores = {"a": torch.tensor([0.5, 0.1, 0.3]), "b": torch.tensor([[0.3, 0.9]])}
    masks = top_k_masks(scores, 3)
    assert masks["a"].tolist() == [True, False, True] and masks["b"].tolist() == [[False, True]]
    excluded = top_k_masks({"a": torch.tensor([-1.0, 0.2, 0.0]), "b": torch.tensor([[-1.0, 0.0]])}, 2)
    assert excluded["a"].tolist() == [False, True, True] and excluded["b"].tolist() == [[False, False]]
    with pytest.raises(TokentuneError, match="only 3 are not selected"):
        top_k_masks({"a": torch.tensor([-1.0, 0.2, 0.0, 0.0])}, 4)


# --- hooks on a stand-in trainer ----------------------------------------------------------------------

def test_iterations_add_k_over_n_each_and_reset_to_the_iteration_start():
    model = tiny_llama_model()
    adapter = _attach(model, ft_params_num=101, n_ft_iterations=2)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(adapter, total=8)  # iteration 0: steps 0-3, iteration 1: steps 4-7
    seen = {}

    def record(step):
        if step == 3:
            seen["end0"] = {n: p.detach().clone() for n, p in adapter._maskable}
            seen["mask0"] = {n: m.clone() for n, m in adapter.mask.items()}

    _steps(adapter, trainer, range(6), after_step=record)
    assert sum(int(m.sum()) for m in seen["mask0"].values()) == 51  # 101 // 2 + the remainder
    assert trainer.optimizer.state  # AdamW moments of iteration 1's phase 1
    adapter.on_step_start(trainer, 6)  # the second selection, then reset to the end of iteration 0
    assert not trainer.optimizer.state  # a fresh optimiser for the phase
    for n, p in adapter._maskable:
        assert torch.equal(p.detach(), seen["end0"][n]), n
        assert bool((adapter.mask[n] >= seen["mask0"][n]).all())  # the mask only grows
    assert sum(int(m.sum()) for m in adapter.mask.values()) == 101
    _steps(adapter, trainer, [7])
    _unselected_equal_theta0(adapter, theta0)


def test_whole_run_schedule_is_left_to_the_trainer():
    adapter = _attach(tiny_llama_model(), ft_params_num=10, lr_schedule="whole_run")
    t = TrainConfig(max_steps=8, lr=0.05)
    optimizer = build_optimizer(adapter.param_groups(), t, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, t, 8)
    own = list(scheduler.lr_lambdas)
    adapter.on_train_start(SimpleNamespace(cfg=SimpleNamespace(train=t), optimizer=optimizer, scheduler=scheduler,
                                           total_steps=8))
    assert scheduler.lr_lambdas == own


def test_weight_decay_does_not_move_unselected_entries():
    model = tiny_llama_model()
    adapter = _attach(model, ft_params_proportion=0.01)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(adapter, total=4, weight_decay=0.5)
    _steps(adapter, trainer, range(4))
    assert adapter.mask is not None and sum(int(m.sum()) for m in adapter.mask.values()) == adapter.k
    assert adapter.k == int(0.01 * sum(p.numel() for p in model.parameters()))
    _unselected_equal_theta0(adapter, theta0)
    assert any(not torch.equal(p.detach()[adapter.mask[n]], theta0[n][adapter.mask[n]]) for n, p in adapter._maskable)


def test_l1_pull_is_lambda_over_n_times_the_sign():
    model = tiny_bert_classifier()
    adapter = _attach(model, ft_params_num=50, full_l1_reg=0.3, apply_reg_to_sparse_only=True)
    n_all = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in adapter._maskable + adapter._head:
            p.add_(torch.randn(p.shape, generator=g))
            p.grad = torch.zeros_like(p)
    adapter.after_backward(SimpleNamespace(), 0, {})
    for n, p in adapter._maskable:
        assert torch.equal(p.grad, torch.sign(p.detach() - adapter._theta0[n]) * (0.3 / n_all)), n
    assert all(not p.grad.any() for _, p in adapter._head)  # the head is left out (apply_reg_to_sparse_only)


def test_classifier_head_trains_in_full_and_is_saved_as_absolute_values(tmp_path):
    model = tiny_bert_classifier()
    adapter = _attach(model, ft_params_num=40)
    assert {n for n, _ in adapter._head} == {"classifier.weight", "classifier.bias"}
    trainer = _trainer(adapter, total=2)
    _steps(adapter, trainer, range(2))
    adapter.finalize(trainer)  # the model is now exactly theta0 + the diff it saves
    adapter.save(tmp_path, "base")
    diff = SparseDiff.load(tmp_path)
    assert set(diff.absolute) == {"classifier.weight", "classifier.bias"} and 0 < diff.nnz <= 40
    assert diff.meta["task"] == "classification" and diff.meta["id2label"] == {"0": "LABEL_0", "1": "LABEL_1",
                                                                                 "2": "LABEL_2"}
    fresh = tiny_bert_classifier()
    _attach(fresh, ft_params_num=40).load(tmp_path)
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n


def test_checkpoint_state_keeps_phase_mask_and_iteration_start():
    model = tiny_llama_model()
    adapter = _attach(model, ft_params_num=60, n_ft_iterations=2)
    _steps(adapter, _trainer(adapter, total=8), range(5))  # iteration 1, phase 1
    state = {k: v.clone() for k, v in adapter.state_dict().items()}
    other = _attach(tiny_llama_model(), ft_params_num=60, n_ft_iterations=2)
    other.load_state_dict(state)
    assert (other.iteration, other.phase) == (1, 1)
    for n, m in adapter.mask.items():
        assert torch.equal(other.mask[n], m) and torch.equal(other._start[n], adapter._start[n])
    trainer = _trainer(other, total=8)
    with pytest.raises(TokentuneError, match="step 2 belongs to iteration 0 phase 2"):
        other.on_step_start(trainer, 2)


def test_base_diffs_are_applied_before_theta0(tmp_path):
    q = "model.layers.1.mlp.up_proj.weight"
    SparseDiff({q: (torch.tensor([3]), torch.tensor([0.5]))}, {q: (64, 32)}).save(tmp_path)
    model = tiny_llama_model()
    before = model.get_parameter(q).detach().view(-1)[3].clone()
    adapter = _attach(model, ft_params_num=10, base_diffs=[str(tmp_path)])
    assert adapter._theta0[q].view(-1)[3] == before + 0.5
    assert model.get_parameter(q).view(-1)[3] == before + 0.5


def test_configuration_errors():
    with pytest.raises(TokentuneError, match="maskable entries"):
        _attach(tiny_llama_model(), ft_params_num=10 ** 9)
    with pytest.raises(TokentuneError, match="no task head"):
        _attach(tiny_llama_model(), train_head=True)
    with pytest.raises(TokentuneError, match="still in phase 1"):
        _attach(tiny_llama_model(), ft_params_num=5).save(Path("unused"), "base")


# --- real runs through the CLI ----------------------------------------------------------------------

K = 400


def _config(tmp: Path, adapter: dict, **train) -> Path:
    path = write_config(tmp, train={"max_steps": 8, **train}, eval={"at_end": False}, log={"report": False})
    tree = yaml.safe_load(path.read_text())
    tree["adapter"] = adapter
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lt_sft")
    full = _config(tmp / "full", {"name": "full"}, max_steps=4)
    assert main(["train", str(full)]) == 0
    sparse = _config(tmp / "sparse", {"name": "lt_sft", "ft_params_num": K}, save_every=3, keep_checkpoints=5)
    assert main(["train", str(sparse)]) == 0
    return SimpleNamespace(tmp=tmp, full=tmp / "full" / "run", sparse=tmp / "sparse" / "run", config=sparse)


def _theta0() -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from tokentune.models.loading import resolve_ref

    model = AutoModelForCausalLM.from_pretrained(resolve_ref("builtin:tiny-llama"))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _checkpoint(run: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"step-{step}" / "adapter_state.safetensors"))


def test_phase1_equals_full_fine_tuning_and_lr_restarts(runs):
    assert losses(runs.sparse)[:4] == losses(runs.full)
    lrs = [json.loads(line)["lr"] for line in (runs.sparse / "metrics.jsonl").read_text().splitlines()]
    assert lrs[3] == 5e-3 and lrs[4:7] == lrs[0:3]  # lr of step 5 is the first again: a fresh schedule


def test_mask_is_exactly_the_top_k_of_the_phase1_change(runs):
    from safetensors.torch import load_file

    theta0 = _theta0()
    theta1 = load_file(str(runs.full / "final" / "model.safetensors"))
    names = list(theta1)
    change = torch.cat([(theta1[n] - theta0[n]).abs().reshape(-1) for n in names])
    expected = torch.zeros_like(change, dtype=torch.bool)
    expected[change.topk(K).indices] = True
    state = _checkpoint(runs.sparse, 6)
    assert {k[5:] for k in state if k.startswith("mask/")} == set(names) == set(theta0)  # tied head once
    mask = torch.cat([state[f"mask/{n}"].reshape(-1) for n in names])
    assert int(mask.sum()) == K and mask.numel() == sum(t.numel() for t in theta0.values())  # density K/#maskable
    assert torch.equal(mask, expected)


def test_unselected_entries_stay_pretrained_and_the_diff_has_at_most_k(runs):
    theta0, state = _theta0(), _checkpoint(runs.sparse, 6)  # two steps into phase 2
    moved = 0
    for n, mask in ((k[5:], v) for k, v in state.items() if k.startswith("mask/")):
        value = state[f"param/{n}"]
        assert torch.equal(value[~mask], theta0[n][~mask]), n
        moved += int((value[mask] != theta0[n][mask]).sum())
    assert moved > 0
    diff = SparseDiff.load(runs.sparse / "final")
    assert 0 < diff.nnz <= K
    for n, (idx, _) in diff.deltas.items():
        assert bool(state[f"mask/{n}"].reshape(-1)[idx].all()), n  # the support lies inside the mask


@pytest.mark.parametrize("step", [6, 3])  # mid phase 2; phase 1, crossing the phase boundary on resume
def test_resume_equals_uninterrupted(runs, step):
    from safetensors.torch import load_file

    copy = runs.tmp / f"resume-{step}"
    shutil.copytree(runs.sparse, copy)
    shutil.rmtree(copy / "final")
    for later in (copy / "checkpoints").iterdir():
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)
    (copy / "summary.json").unlink()
    assert main(["train", str(runs.config), f"train.output_dir={copy}", "--resume"]) == 0
    assert losses(copy) == losses(runs.sparse)
    ours, theirs = (load_file(str(r / "final" / "sparse_diff.safetensors")) for r in (copy, runs.sparse))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_compose_cli_writes_base_plus_diffs(runs):
    from transformers import AutoModelForCausalLM

    from tokentune.engine.distributed import DistEnv
    from tokentune.engine.session import build_session, run_config

    out = runs.tmp / "composed"
    assert main(["compose", "builtin:tiny-llama", str(runs.sparse / "final"), "-o", str(out)]) == 0
    composed = AutoModelForCausalLM.from_pretrained(out)
    session = build_session(run_config(runs.sparse), DistEnv(), with_data=False, trained_from=runs.sparse)
    trained = dict(session.model.named_parameters())
    for n, p in composed.named_parameters():
        assert torch.equal(p, trained[n]), n  # the loaded run is exactly base + its diff
    assert main(["compose", "builtin:tiny-llama", str(runs.sparse / "final"), "-o", str(out)]) == 2  # not empty

    # A second diff overlapping the run's support in one entry and disjoint elsewhere.
    run_diff = SparseDiff.load(runs.sparse / "final")
    name, (idx, val) = next(iter(run_diff.deltas.items()))
    other = runs.tmp / "other"
    shape = run_diff.shapes[name]
    free = next(i for i in range(10 ** 6) if i not in set(idx.tolist()))
    SparseDiff({name: (torch.tensor([int(idx[0]), free]), torch.tensor([0.25, -0.5]))}, {name: shape},
               meta={"task": "causal"}).save(other)
    out2 = runs.tmp / "composed2"
    assert main(["compose", "builtin:tiny-llama", str(runs.sparse / "final"), str(other), "-o", str(out2)]) == 0
    got = dict(AutoModelForCausalLM.from_pretrained(out2).named_parameters())[name].detach().reshape(-1)
    base = _theta0()[name].reshape(-1)
    overlap = (val[0].double() + 0.25).float()
    assert got[int(idx[0])] == base[int(idx[0])] + overlap
    assert got[free] == base[free] + torch.tensor(-0.5)
    assert torch.equal(got[idx[1:]], trained[name].detach().reshape(-1)[idx[1:]])
