"""KD against a dense reference: full logits of student and teacher, KL written out by hand."""

import pytest
import torch
import torch.nn.functional as F

from tokentune.config import ModelConfig
from tokentune.models.loading import load_model
from tokentune.objectives.cross_entropy import CrossEntropy, CrossEntropyConfig
from tokentune.objectives.kd import KDConfig, KnowledgeDistillation


def _student(perturb: float = 0.05):
    loaded = load_model(ModelConfig(name="builtin:tiny-llama", attn_implementation="sdpa"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * perturb)
    return loaded


def _batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 9), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    weights = torch.ones(2, 9)
    weights[1, 5] = 0.5
    return {"input_ids": ids, "labels": labels, "loss_weights": weights,
            "position_ids": torch.arange(9).expand(2, -1), "attention_mask": torch.ones_like(ids)}


def _reference(student, teacher, batch, mode, T, alpha):
    s = student(input_ids=batch["input_ids"]).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"]).logits[:, :-1]
    y, w = batch["labels"][:, 1:], batch["loss_weights"][:, 1:]
    mask = y != -100
    ps, pt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    fwd = (pt.exp() * (pt - ps)).sum(-1)
    rev = (ps.exp() * (ps - pt)).sum(-1)
    d = {"forward": fwd, "reverse": rev, "symmetric": (fwd + rev) / 2}[mode]
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.clamp_min(0).reshape(-1), reduction="none").view_as(d)
    per = alpha * T * T * d + (1 - alpha) * ce
    return (per * w * mask).sum()


@pytest.mark.parametrize("mode", ["forward", "reverse", "symmetric"])
def test_chunked_loss_and_gradient_equal_the_dense_reference(mode):
    student = _student()
    kd = KnowledgeDistillation(KDConfig(teacher="builtin:tiny-llama", mode=mode, temperature=2.0, alpha=0.7))
    kd.attach(student.model, student.view)
    batch = _batch(student.model.config.vocab_size)
    out = kd(student.model, student.view, batch, chunk_size=5)
    out.loss_sum.backward()
    ours = {n: p.grad.clone() for n, p in student.model.named_parameters()}
    student.model.zero_grad()
    ref = _reference(student.model, kd.teacher, batch, mode, 2.0, 0.7)
    ref.backward()
    torch.testing.assert_close(out.loss_sum, ref, atol=1e-4, rtol=1e-4)
    for n, p in student.model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-5, rtol=1e-3)
    assert all(p.grad is None for p in kd.teacher.parameters())


def test_student_equal_to_teacher_has_zero_divergence():
    student = _student(perturb=0.0)
    kd = KnowledgeDistillation(KDConfig(teacher="builtin:tiny-llama", mode="symmetric", alpha=1.0))
    kd.attach(student.model, student.view)
    out = kd(student.model, student.view, _batch(student.model.config.vocab_size))
    assert abs(float(out.loss_sum)) < 1e-5


def test_alpha_zero_is_plain_cross_entropy():
    student = _student()
    kd = KnowledgeDistillation(KDConfig(teacher="builtin:tiny-llama", alpha=0.0))
    kd.attach(student.model, student.view)
    batch = _batch(student.model.config.vocab_size)
    ce = CrossEntropy(CrossEntropyConfig())(student.model, student.view, batch)
    torch.testing.assert_close(kd(student.model, student.view, batch).loss_sum, ce.loss_sum, atol=1e-5, rtol=1e-5)
    assert float(kd.weight_total(batch)) == float(ce.weight_sum)


def test_teacher_with_another_vocabulary_is_refused():
    from tokentune.errors import TokentuneError

    student = load_model(ModelConfig(name="builtin:tiny-gpt2", attn_implementation="sdpa"))
    teacher_vocab = load_model(ModelConfig(name="builtin:tiny-llama")).model.config.vocab_size
    if teacher_vocab == student.model.config.vocab_size:
        pytest.skip("the two builtin tiny models share a vocabulary size")
    kd = KnowledgeDistillation(KDConfig(teacher="builtin:tiny-llama"))
    with pytest.raises(TokentuneError, match="vocabulary"):
        kd.attach(student.model, student.view)
