"""panda_kd against a hand-written reference with a second, separately loaded teacher model: L = CE + 0.1·β·MSE/B;
β = 0 is cross-entropy exactly; the teacher never changes and never gets gradients; student == teacher gives no KD."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.adapters.conformance import make_model
from tokentune.adapters.prefix_tuning import PrefixTuning, PrefixTuningConfig
from tokentune.errors import TokentuneError
from tokentune.models.anatomy import ModelView
from tokentune.objectives.cross_entropy import CrossEntropy, CrossEntropyConfig
from tokentune.objectives.panda_kd import PandaKD, PandaKDConfig

P = 4


def _prefixed(family: str, seed: int, tokens: int = P):
    model = make_model(family)
    adapter = PrefixTuning(PrefixTuningConfig(num_virtual_tokens=tokens, reparameterize=False, init="random"))
    torch.manual_seed(seed)
    adapter.attach(model, ModelView(model))
    with torch.no_grad():
        for g in adapter.param_groups():
            for _, p in g.params:
                p.add_(torch.randn_like(p) * 0.3)
    return model, adapter


@pytest.fixture(params=["bert", "llama"])
def setup(request, tmp_path):
    family = request.param
    teacher_model, teacher = _prefixed(family, seed=1)
    teacher.save(tmp_path / "teacher" / "final", "base")
    student_model, student = _prefixed(family, seed=2)
    return family, teacher_model, student_model, student, tmp_path / "teacher"


def _batch(family: str):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (3, 9), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(9).expand(3, -1)}
    if family == "bert":
        batch["class_labels"] = torch.tensor([0, 2, 1])
    else:
        labels = ids.clone()
        labels[:, :4] = -100
        batch["labels"], batch["loss_weights"] = labels, torch.ones(3, 9)
    return batch


def _objective(model, teacher_dir, beta, **kw):
    obj = PandaKD(PandaKDConfig(teacher=str(teacher_dir), beta=beta, **kw))
    obj.attach(model, ModelView(model))
    return obj


def _logits(model, family, batch):
    """Classifier logits, or the LM logits at the loss positions (labels[t] is predicted at t-1)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if family == "bert":
        return out
    mask = batch["labels"][:, 1:] != -100
    return out[:, :-1][mask], batch["labels"][:, 1:][mask]


def test_loss_equals_the_reference_formula(setup):
    family, teacher_model, model, _, teacher_dir = setup
    batch, beta = _batch(family), 0.7
    with torch.no_grad():
        out = _objective(model, teacher_dir, beta)(model, ModelView(model), batch)
        if family == "bert":
            zs, y = _logits(model, family, batch), batch["class_labels"]
            zt = _logits(teacher_model, family, batch)
        else:
            (zs, y), (zt, _) = _logits(model, family, batch), _logits(teacher_model, family, batch)
        B = batch["input_ids"].shape[0]
        reference = F.cross_entropy(zs, y) + 0.1 * beta * F.mse_loss(zs, zt) / B
    torch.testing.assert_close(out.loss_sum / out.weight_sum, reference, atol=1e-5, rtol=1e-5)
    assert F.mse_loss(zs, zt) > 1e-3  # the teacher really differs, so the KD term was tested


def test_beta_zero_is_cross_entropy_exactly(setup):
    family, _, model, _, teacher_dir = setup
    batch, view = _batch(family), ModelView(model)
    model.train()  # dropout on: the same seed must give the same masks when no teacher forward runs
    torch.manual_seed(5)
    ours = _objective(model, teacher_dir, 0.0)(model, view, batch)
    torch.manual_seed(5)
    ce = CrossEntropy(CrossEntropyConfig())(model, view, batch)
    assert torch.equal(ours.loss_sum, ce.loss_sum) and torch.equal(ours.weight_sum, ce.weight_sum)


def test_teacher_is_untouched_and_only_student_prompt_and_head_get_gradients(setup):
    family, _, model, student, teacher_dir = setup
    obj = _objective(model, teacher_dir, 2.0)
    saved = load_file(teacher_dir / "final" / "prefix.safetensors")
    before = {k: v.clone() for k, v in obj.teacher.items()}
    trained = {id(p) for g in student.param_groups() for _, p in g.params}
    opt = torch.optim.AdamW([p for g in student.param_groups() for _, p in g.params], lr=0.1)
    model.train()
    out = obj(model, ModelView(model), _batch(family))
    (out.loss_sum / out.weight_sum).backward()
    with_grad = {id(p) for p in model.parameters() if p.grad is not None}
    assert with_grad == trained
    opt.step()
    for k, v in obj.teacher.items():
        assert torch.equal(v, before[k]) and not v.requires_grad and v.grad is None
        assert torch.equal(v, saved[k.removeprefix("tokentune_prefix.")])


def test_kd_term_vanishes_when_the_student_is_the_teacher(setup):
    family, _, model, student, teacher_dir = setup
    student.load(teacher_dir / "final")
    model.eval()  # dropout off: the two forwards are the same computation
    batch = _batch(family)
    with torch.no_grad():
        strong = _objective(model, teacher_dir, 5.0)(model, ModelView(model), batch)
        weak = _objective(model, teacher_dir, 1.0)(model, ModelView(model), batch)
        ce = _objective(model, teacher_dir, 0.0)(model, ModelView(model), batch)
    assert torch.equal(strong.loss_sum, weak.loss_sum)  # the loss does not depend on β: the KD term is exactly 0
    torch.testing.assert_close(strong.loss_sum, ce.loss_sum, atol=1e-5, rtol=1e-6)


def test_trainable_count_is_the_deep_prompt_plus_the_head():
    model, adapter = _prefixed("bert", seed=0)
    c = model.config
    deep = c.num_hidden_layers * 2 * P * c.hidden_size
    head = c.hidden_size * c.num_labels + c.num_labels
    assert sum(p.numel() for g in adapter.param_groups() for _, p in g.params) == deep + head
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == deep + head


def test_attach_errors(tmp_path):
    teacher_model, teacher = _prefixed("llama", seed=1)
    teacher.save(tmp_path / "final", "base")
    with pytest.raises(TokentuneError, match="prefix_tuning adapter"):
        _objective(make_model("llama"), tmp_path, 1.0)
    longer, _ = _prefixed("llama", seed=2, tokens=P + 1)
    with pytest.raises(TokentuneError, match="shape"):
        _objective(longer, tmp_path, 1.0)
    with pytest.raises(TokentuneError, match="no prefix.safetensors"):
        _objective(longer, tmp_path / "nothing", 1.0)


@pytest.mark.parametrize("teacher_dropout", [True, False])
def test_teacher_dropout_follows_the_option(tmp_path, teacher_dropout):
    _, teacher = _prefixed("bert", seed=1)
    teacher.save(tmp_path / "final", "base")
    model, _ = _prefixed("bert", seed=2)
    obj = _objective(model, tmp_path, 1.0, teacher_dropout=teacher_dropout)
    batch = _batch("bert")

    def classify(m, b):
        return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    model.train()
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        runs.append(obj._teacher_run(model, classify, batch))
    assert model.training  # the student's mode is restored
    assert torch.equal(runs[0], runs[1]) is (not teacher_dropout)  # BERT's hidden dropout is 0.1
