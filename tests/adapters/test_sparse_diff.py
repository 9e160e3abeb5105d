"""The sparse-difference artefact (LT-SFT spec check 3): built from two states, saved and loaded, applied and
reverted bit-exactly, composed as theta0 + phi1 + phi2 with disjoint and overlapping supports."""

import pytest
import torch

from tests.conftest import tiny_llama_model
from tokentune.adapters.sparse_diff import SparseDiff, compose
from tokentune.errors import TokentuneError

Q = "model.layers.0.self_attn.q_proj.weight"  # [32, 32]
EMB = "model.embed_tokens.weight"  # [128, 32], tied with the LM head


def _diff(entries: dict[str, tuple[list[int], list[float]]], shapes=None, absolute=None, **meta) -> SparseDiff:
    model_shapes = {Q: (32, 32), EMB: (128, 32), "model.norm.weight": (32,)}
    deltas = {n: (torch.tensor(i), torch.tensor(v, dtype=torch.float32)) for n, (i, v) in entries.items()}
    shapes = shapes or {n: model_shapes[n] for n in list(entries) + list(absolute or {})}
    return SparseDiff(deltas, shapes, dict(absolute or {}), meta)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_bit_equal(model, snap):
    for n, p in model.named_parameters():
        assert torch.equal(p, snap[n]), n


def test_between_keeps_masked_changes_above_the_threshold():
    base = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    tuned = {"w": torch.tensor([[1.0, 2.5], [3.0 + 5e-8, 3.0]])}
    d = SparseDiff.between(base, tuned, drop_below=1e-7)
    assert d.deltas["w"][0].tolist() == [1, 3]  # the 5e-8 change is dropped (reference eps 1e-7)
    assert d.deltas["w"][1].tolist() == [0.5, -1.0]
    masked = SparseDiff.between(base, tuned, mask={"w": torch.tensor([[True, False], [True, True]])})
    assert masked.deltas["w"][0].tolist() == [3] and masked.nnz == 1
    assert SparseDiff.between(base, base).deltas == {}


def test_apply_adds_and_revert_restores_bit_exactly():
    model = tiny_llama_model()
    snap = _snapshot(model)
    head = torch.full((32,), 0.25)
    d = _diff({Q: ([0, 5, 1023], [0.1, -0.2, 1e-3]), EMB: ([7], [2.0])}, absolute={"model.norm.weight": head})
    applied = d.apply(model)
    q = model.get_parameter(Q).detach().view(-1)
    assert q[5] == snap[Q].view(-1)[5] + torch.tensor(-0.2)
    assert q[1023] == snap[Q].view(-1)[1023] + torch.tensor(1e-3)
    assert torch.equal(q[6:1023], snap[Q].view(-1)[6:1023])
    assert model.lm_head.weight.view(-1)[7] == snap[EMB].view(-1)[7] + 2.0  # tied: the head moved with it
    assert torch.equal(model.get_parameter("model.norm.weight"), head)
    applied.revert()
    _assert_bit_equal(model, snap)
    with pytest.raises(TokentuneError, match="already reverted"):
        applied.revert()


def test_apply_in_bf16_rounds_once_and_reverts_exactly():
    model = tiny_llama_model().to(torch.bfloat16)
    snap = _snapshot(model)
    applied = _diff({Q: ([3], [1e-3])}).apply(model)
    expected = (snap[Q].view(-1)[3].float() + 1e-3).to(torch.bfloat16)
    assert model.get_parameter(Q).view(-1)[3] == expected
    applied.revert()
    _assert_bit_equal(model, snap)


def test_revert_out_of_order_is_refused_when_supports_overlap():
    model = tiny_llama_model()
    snap = _snapshot(model)
    a = _diff({Q: ([0, 1], [0.5, 0.5])}).apply(model)
    b = _diff({Q: ([1, 2], [0.25, 0.25])}).apply(model)
    with pytest.raises(TokentuneError, match="reverse order"):
        a.revert()
    b.revert()
    a.revert()
    _assert_bit_equal(model, snap)


def test_compose_disjoint_supports_equals_applying_both():
    a = _diff({Q: ([0, 2], [0.5, -0.5])}, source="a")
    b = _diff({Q: ([1], [0.25]), EMB: ([9], [1.0])}, source="b")
    both = compose([a, b])
    assert both.deltas[Q][0].tolist() == [0, 1, 2] and both.deltas[Q][1].tolist() == [0.5, 0.25, -0.5]
    assert both.nnz == 4 and both.meta["composed_from"] == ["a", "b"]
    one, two = tiny_llama_model(), tiny_llama_model()
    a.apply(one)
    b.apply(one)
    both.apply(two)
    _assert_bit_equal(two, _snapshot(one))


def test_compose_overlapping_supports_adds_and_is_order_free():
    base = tiny_llama_model()
    theta0 = base.get_parameter(Q).detach().clone().view(-1)
    a = _diff({Q: ([0, 1], [0.1, 0.3])})
    b = _diff({Q: ([1, 2], [0.7, -0.2])})
    ab, ba = compose([a, b]), compose([b, a])
    assert torch.equal(ab.deltas[Q][0], ba.deltas[Q][0]) and torch.equal(ab.deltas[Q][1], ba.deltas[Q][1])
    # Hand value on the overlap: the two float32 changes summed in float64, rounded once.
    assert ab.deltas[Q][1][1] == torch.tensor(float(torch.tensor(0.3)) + float(torch.tensor(0.7)), dtype=torch.float32)
    m1, m2 = tiny_llama_model(), tiny_llama_model()
    ab.apply(m1)
    ba.apply(m2)
    _assert_bit_equal(m2, _snapshot(m1))
    got = m1.get_parameter(Q).detach().view(-1)
    want = theta0.double() + torch.tensor([0.1, 1.0, -0.2] + [0.0] * (theta0.numel() - 3), dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)


def test_compose_absolute_values_come_from_one_diff():
    h1, h2 = torch.ones(32), torch.zeros(32)
    a = _diff({Q: ([0], [0.1])}, absolute={"model.norm.weight": h1}, task="classification", id2label={"0": "x"})
    b = _diff({Q: ([1], [0.1])}, absolute={"model.norm.weight": h2}, task="classification", id2label={"0": "y"})
    with pytest.raises(TokentuneError, match="each carry a trained head"):
        compose([a, b])
    chosen = compose([a, b], absolute_from=1)
    assert torch.equal(chosen.absolute["model.norm.weight"], h2) and chosen.meta["id2label"] == {"0": "y"}
    with pytest.raises(TokentuneError, match="carries no absolute"):
        compose([a, _diff({Q: ([2], [0.1])})], absolute_from=1)
    clash = _diff({"model.norm.weight": ([0], [0.1])})
    with pytest.raises(TokentuneError, match="absolute value in another"):
        compose([a, clash])
    with pytest.raises(TokentuneError, match="without its trained head"):
        compose([_diff({Q: ([3], [0.1])}, task="classification")])


def test_save_load_round_trip(tmp_path):
    from safetensors.torch import load_file

    d = _diff({Q: ([4, 1000], [0.5, -1.5])}, absolute={"model.norm.weight": torch.arange(32.0)}, k=2)
    d.save(tmp_path)
    assert load_file(str(tmp_path / "sparse_diff.safetensors"))["indices/" + Q].dtype == torch.int32
    back = SparseDiff.load(tmp_path)
    assert back.deltas[Q][0].tolist() == [4, 1000] and back.deltas[Q][1].tolist() == [0.5, -1.5]
    assert torch.equal(back.absolute["model.norm.weight"], torch.arange(32.0))
    assert back.shapes == d.shapes and back.meta["k"] == 2 and back.meta["source"] == str(tmp_path)
    with pytest.raises(TokentuneError, match="holds no sparse diff"):
        SparseDiff.load(tmp_path / "missing")


def test_wrong_base_is_refused_before_anything_is_written():
    model = tiny_llama_model()
    snap = _snapshot(model)
    bad_shape = _diff({Q: ([0], [1.0]), EMB: ([0], [1.0])}, shapes={Q: (32, 32), EMB: (64, 32)})
    with pytest.raises(TokentuneError, match="shape"):
        bad_shape.apply(model)
    with pytest.raises(TokentuneError, match="no parameter"):
        SparseDiff({"x.weight": (torch.tensor([0]), torch.tensor([1.0]))}, {"x.weight": (1,)}).apply(model)
    _assert_bit_equal(model, snap)


def test_compose_cli_builds_a_classifier_from_a_diff_with_its_head(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from tokentune.cli import main

    up = "model.layers.0.mlp.up_proj.weight"  # builtin:tiny-llama: [128, 64]
    score = torch.arange(128.0).view(2, 64) / 100
    labels = {"task": "classification", "id2label": {"0": "negative", "1": "positive"}}
    SparseDiff({up: (torch.tensor([5]), torch.tensor([1.5]))}, {up: (128, 64), "score.weight": (2, 64)},
               {"score.weight": score}, labels).save(tmp_path / "task")
    assert main(["compose", "builtin:tiny-llama", str(tmp_path / "task"), "-o", str(tmp_path / "out")]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert torch.equal(model.score.weight, score) and model.config.id2label == {0: "negative", 1: "positive"}
    SparseDiff({up: (torch.tensor([5]), torch.tensor([1.5]))}, {up: (128, 64)}, {}, labels).save(tmp_path / "headless")
    assert main(["compose", "builtin:tiny-llama", str(tmp_path / "headless"), "-o", str(tmp_path / "out2")]) == 2
    assert not (tmp_path / "out2").exists()
