"""LiST (shared/methods/list.md) against its verification checks and independent references:

1. the list_adapter's trainable names and count: 2·r·d per adapted dense projection plus the MLM head's transform and
   bias (13,684,825 ≈ 13.7M on RoBERTa-large, r = 128, built on the meta device); the map h + h W1 W2 placed after the
   dense output projection and before dropout + residual + LayerNorm;
2. meta weights: non-negative, summing to 1 (all 0 when every gradient opposes the labelled one); against the closed
   form lr·<grad L_meta, grad l_i> with gradients written out by hand for a toy softmax-regression model (an unlabelled
   copy of the labelled example with its correct pseudo-label gets positive weight, a wrong one none), and computed
   from full-vocabulary logits on builtin:tiny-llama;
3. weights fixed to 1/B: the unlabelled loss is the mean KL from full logits (0 when teacher = student);
4. the teacher is bit-identical between refreshes and refreshed from the student exactly every update_teacher_steps
   unlabelled steps (recorded at every step of a `tokentune recipe list` run, which also writes the summary).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from tokentune.adapters.list_adapter import ListAdapter, ListAdapterConfig
from tokentune.cli import main
from tokentune.config import ModelConfig
from tokentune.engine.distributed import setup
from tokentune.engine.session import build_session, run_config
from tokentune.errors import TokentuneError
from tokentune.models.anatomy import ModelView
from tokentune.models.loading import load_model
from tokentune.recipes.list_data import Batches, split_few_shot
from tokentune.recipes.list_meta import meta_weights, pseudo_labels, student_losses
from tokentune.recipes.list_recipe import ListConfig
from tokentune.recipes.list_selftrain import SelfTraining
from tokentune.recipes.base import load_recipe

from .helpers import digest, recipe_file, run_recipe, write_labelled

THE, A = 272, 263  # " the", " a": single tokens of builtin:tiny-llama, the label words of even / odd
VERBALIZER = {"template": "{text}\nAnswer:{mask}", "label_words": {"even": ["the"], "odd": ["a"]},
              "include_label_name": False}
RECIPE = {"adapter": {"r": 4}, "verbalizer": VERBALIZER, "teacher_train": {"max_steps": 3}, "sessions": 3,
          "update_teacher_steps": 2, "unlabelled_batch_size": 4, "meta_batch_size": 2, "finetune_epochs": 1}


def _files(tmp: Path) -> dict:
    train = write_labelled(tmp / "list_data" / "labelled.jsonl", 8, 0, "parity")
    ev = write_labelled(tmp / "list_data" / "eval.jsonl", 6, 1, "parity")
    pool = write_labelled(tmp / "list_data" / "pool.jsonl", 12, 2, "parity").read_text().splitlines()
    unl = tmp / "list_data" / "unlabelled.jsonl"
    unl.write_text("".join(json.dumps({"text": json.loads(line)["text"]}) + "\n" for line in pool))
    return {"train": str(train), "eval": str(ev), "unlabelled": str(unl)}


class _Fixed:
    """A batch source that always gives the same indices."""

    def __init__(self, idx):
        self.idx = list(idx)

    def next(self):
        return list(self.idx)


# --- one recipe run through the CLI, every unlabelled step recorded ------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("list")
    files = _files(tmp)
    path = recipe_file(tmp, {**RECIPE, "unlabelled": files["unlabelled"]},
                       data={"train": files["train"], "eval": files["eval"]}, train={"batch_size": 4, "lr": 1e-2})
    seen = {"steps": [], "sessions": []}
    targets, re_init = SelfTraining.teacher_targets, SelfTraining._re_init

    def student(self):
        return digest((n, p) for n, p in self.trainable)

    def recorded_targets(self, batch):
        seen["steps"].append({"teacher": digest(self.teacher.items()), "student": student(self)})
        return targets(self, batch)

    def recorded_re_init(self, session):  # after the refresh, before the student is drawn anew
        seen["sessions"].append({"session": session, "teacher": digest(self.teacher.items()), "student": student(self),
                                 "teacher_is_copy": all(t.data_ptr() != p.data_ptr() for (_, p), t in
                                                        zip(self.trainable, self.teacher.values()))})
        return re_init(self, session)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SelfTraining, "teacher_targets", recorded_targets)
        mp.setattr(SelfTraining, "_re_init", recorded_re_init)
        assert main(["recipe", "list", str(path)]) == 0
    summary = json.loads((tmp / "run" / "recipe_summary.json").read_text())
    return {"tmp": tmp, "path": path, "files": files, "summary": summary, "seen": seen}


def test_cli_run_writes_the_summary_and_a_reloadable_student(run):
    s, run_dir = run["summary"], run["tmp"] / "run"
    assert s["recipe"] == "list" and set(s["stages"]) == {"teacher", "self_training"}
    st = s["stages"]["self_training"]
    assert (st["unlabelled"], st["labelled"], st["student_steps"]) == (12, 8, 3 * (2 + 2))
    assert {"eval/loss", "eval/accuracy"} <= set(s["eval"]["teacher"]) and len(s["eval"]["per_session"]) == 3
    phases = [json.loads(line)["phase"] for line in (run_dir / "self_training" / "metrics.jsonl").read_text().splitlines()]
    assert phases == ["unlabelled", "unlabelled", "labelled", "labelled"] * 3
    cfg = run_config(run_dir / "self_training")
    session = build_session(cfg, setup("cpu"), trained_from=run_dir / "self_training")
    from tokentune.probes.evaluation import Evaluation

    again = Evaluation(cfg.eval).run(session, session.splits.eval)
    assert again["eval/accuracy"] == s["eval"]["list"]["eval/accuracy"]
    assert again["eval/loss"] == pytest.approx(s["eval"]["list"]["eval/loss"], rel=1e-5)


def test_check4_teacher_frozen_between_refreshes_and_refreshed_every_n_unlabelled_steps(run):
    s, seen = run["summary"], run["seen"]
    assert s["checks"]["teacher_frozen_within_sessions"]
    assert s["checks"]["teacher_refreshed_after_unlabelled_steps"] == [2, 4]
    assert [r["after_student_steps"] for r in s["stages"]["self_training"]["refreshes"]] == [4, 8]
    steps = [seen["steps"][i:i + 2] for i in range(0, 6, 2)]  # the unlabelled steps of each session
    teachers = [{x["teacher"] for x in group} for group in steps]
    assert all(len(t) == 1 for t in teachers), "the teacher changed inside a session"
    assert len({next(iter(t)) for t in teachers}) == 3, "the teacher was not refreshed at each session"
    assert all(g[0]["student"] != g[1]["student"] for g in steps), "the student did not train"
    # session 1's teacher is the teacher stage's final adapter, bit for bit
    saved = load_file(str(run["tmp"] / "run" / "teacher" / "final" / "trainable.safetensors"))
    assert next(iter(teachers[0])) == digest(saved.items())
    for rec in seen["sessions"][1:]:  # refreshed: a separate copy, equal to the student that just finished
        assert rec["teacher"] == rec["student"] and rec["teacher_is_copy"]
        assert {rec["teacher"]} == teachers[rec["session"]]


# --- a SelfTraining stage built from the run, for unit checks ------------------------------------------------------
def _stage(run, tmp: Path, **changes) -> SelfTraining:
    recipe, _ = load_recipe("list", run["path"])
    rc = recipe.config.model_copy(update=changes)
    cfg = run_config(run["tmp"] / "run" / "self_training", [f"train.output_dir={tmp}"])
    st = SelfTraining(rc, cfg, setup("cpu"), run["tmp"] / "run" / "teacher",
                      [json.loads(line)["text"] for line in Path(run["files"]["unlabelled"]).read_text().split("\n")
                       if line], rc.meta_lr or 1e-2)
    st._build()
    return st


@torch.no_grad()
def _perturb(st, std=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _, p in st.trainable:
        p.add_(torch.randn(p.shape, generator=g) * std)


def _label_logits(st, index: int, unlabelled=True) -> torch.Tensor:
    """[2] logits of " the" / " a" after the templated record, from the model's full-vocabulary output."""
    ex = (st.unlabelled if unlabelled else st.labelled)[index]
    return st.session.model(input_ids=torch.tensor([ex.input_ids])).logits[0, -1, [THE, A]]


def _with_state(st, state):
    """Context: the model's trainable tensors temporarily set to `state`."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        saved = st._snapshot()
        with torch.no_grad():
            for n, p in st.trainable:
                p.copy_(state[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in st.trainable:
                    p.copy_(saved[n])
    return ctx()


def test_check3_fixed_weights_give_the_mean_kl(run, tmp_path):
    st = _stage(run, tmp_path, weighting="uniform", re_init=False, semi_finetune="none")
    st.u_batches = _Fixed([0, 1, 2, 3])
    out = st.unlabelled_step(0)  # teacher = student
    assert out["weights/max"] == pytest.approx(0.25)
    assert abs(out["unlabelled_loss"]) < 1e-6 and float(out["loss"].detach()) == out["unlabelled_loss"]
    _perturb(st)  # the student moves away from the teacher
    out = st.unlabelled_step(0)
    with torch.no_grad():
        with _with_state(st, st.teacher):
            teacher = torch.stack([_label_logits(st, i).softmax(-1) for i in range(4)])
        student = torch.stack([_label_logits(st, i).log_softmax(-1) for i in range(4)])
    mean_kl = (teacher * (teacher.log() - student)).sum(-1).mean()
    assert mean_kl > 1e-3
    assert out["unlabelled_loss"] == pytest.approx(float(mean_kl), rel=1e-4, abs=1e-7)
    joint = _stage(run, tmp_path / "j", weighting="uniform", re_init=False, semi_finetune="joint")
    joint.u_batches, joint.l_batches = _Fixed([0, 1, 2, 3]), _Fixed([0, 1])
    out = joint.unlabelled_step(0)
    with torch.no_grad():
        ce = torch.stack([F.cross_entropy(_label_logits(joint, i, unlabelled=False)[None],
                                          torch.tensor([joint.labelled[i].class_label])) for i in (0, 1)]).mean()
    assert out["labelled_loss"] == pytest.approx(float(ce), rel=1e-4)
    assert float(out["loss"].detach()) == pytest.approx(out["unlabelled_loss"] + out["labelled_loss"], rel=1e-5)


def test_check2_meta_weights_equal_the_gradient_alignment_on_tiny_llama(run, tmp_path):
    st = _stage(run, tmp_path, meta_lr=0.5)
    _perturb(st)
    batch = st.session.to_batch([st.unlabelled[i] for i in range(4)])
    targets = st.teacher_targets(batch)
    st.m_batches = _Fixed([0, 1])
    w = st.weights(batch, targets, step_in_session=0)
    params = [p for _, p in st.trainable]
    labels = torch.tensor([st.labelled[i].class_label for i in (0, 1)])
    meta = torch.stack([_label_logits(st, i, unlabelled=False) for i in (0, 1)])
    g_meta = torch.autograd.grad(F.cross_entropy(meta, labels), params)
    raw = []
    for i in range(4):
        kl = F.kl_div(_label_logits(st, i).log_softmax(-1), targets[i], reduction="sum")
        g = torch.autograd.grad(kl, params)
        raw.append(0.5 * sum((a * b).sum() for a, b in zip(g_meta, g)))
    raw = torch.stack(raw).clamp_min(0)
    assert raw.sum() > 1e-3, "the check needs a non-trivial alignment"
    torch.testing.assert_close(w, raw / (raw.sum() + 1e-6), rtol=1e-3, atol=1e-6)
    assert (w >= 0).all() and float(w.sum()) == pytest.approx(1.0, abs=1e-4)
    st.rc = st.rc.model_copy(update={"meta_warmup": 0.5})  # warm-up: the first half of a session uses confidence
    conf = st.weights(batch, targets, step_in_session=0)
    mask = (targets.max(-1).values > st.rc.confidence_threshold).float()
    torch.testing.assert_close(conf, mask / (mask.sum() + 1e-5))


def _toy(pseudo: torch.Tensor, lr: float = 0.5):
    """Softmax regression W [2, d] on 4 unlabelled inputs; x_1 is a copy of the labelled example x_0 (label 1)."""
    torch.manual_seed(0)
    x = torch.randn(4, 5)
    x[1] = x[0]
    w0 = (0.1 * torch.randn(2, 5)).requires_grad_()
    weights = meta_weights(lambda p: student_losses(pseudo, x @ p["W"].t()),
                           [lambda p: F.cross_entropy(x[:1] @ p["W"].t(), torch.tensor([1]))], {"W": w0}, lr)
    # by hand: d CE / dW = (p - e_y) x^T;  d KL(y_hat || p) / dW = (p - y_hat) x^T
    with torch.no_grad():
        p = torch.softmax(x @ w0.t(), -1)
        g_meta = torch.outer(p[0] - torch.tensor([0.0, 1.0]), x[0])
        raw = torch.stack([lr * (g_meta * torch.outer(p[i] - pseudo[i], x[i])).sum() for i in range(4)]).clamp_min(0)
    return weights, raw / (raw.sum() + 1e-6)


def test_check2_meta_weights_on_a_toy_logistic_model():
    pseudo = torch.tensor([[0.1, 0.9], [0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])  # x_0 right, its copy x_1 wrong
    w, expected = _toy(pseudo)
    torch.testing.assert_close(w, expected, rtol=1e-4, atol=1e-7)
    assert w[0] > 0 and w[1] == 0
    assert (w >= 0).all() and float(w.sum()) == pytest.approx(1.0, abs=1e-5)
    w, expected = _toy_all_wrong()
    assert (w == 0).all() and (expected == 0).all()


def test_pseudo_label_options_and_summed_meta_samples():
    scores = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.3, 0.2]])
    torch.testing.assert_close(pseudo_labels(scores, 0.5), torch.softmax(scores * 2, -1))
    targets = pseudo_labels(scores)
    student = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(student_losses(targets, student, soft=False),
                               F.cross_entropy(student, torch.tensor([0, 1]), reduction="none"))
    kl = (targets * (targets.log() - student.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(student_losses(targets, student), kl)
    # two labelled meta batches: their weight gradients add before the clamp (the code's sampling_steps)
    torch.manual_seed(1)
    x, w0 = torch.randn(3, 4), (0.1 * torch.randn(2, 4)).requires_grad_()
    y_hat = torch.tensor([[0.2, 0.8], [0.7, 0.3], [0.5, 0.5]])
    metas = [(x[:1], torch.tensor([1])), (x[1:2], torch.tensor([0]))]
    w = meta_weights(lambda p: student_losses(y_hat, x @ p["W"].t()),
                     [lambda p, m=m: F.cross_entropy(m[0] @ p["W"].t(), m[1]) for m in metas], {"W": w0}, 1.0)
    with torch.no_grad():
        p = torch.softmax(x @ w0.t(), -1)
        g_meta = sum(torch.outer(torch.softmax(m[0] @ w0.t(), -1)[0] - F.one_hot(m[1], 2)[0].float(), m[0][0])
                     for m in metas)
        raw = torch.stack([(g_meta * torch.outer(p[i] - y_hat[i], x[i])).sum() for i in range(3)]).clamp_min(0)
    torch.testing.assert_close(w, raw / (raw.sum() + 1e-6), rtol=1e-4, atol=1e-7)


def _toy_all_wrong():
    """Every pseudo-label says class 0 with certainty where the labelled copy says class 1, on inputs aligned with
    x_0: every example's gradient opposes the labelled one."""
    torch.manual_seed(0)
    x0 = torch.randn(5)
    x = torch.stack([x0, x0, 2 * x0, 0.5 * x0])
    w0 = torch.zeros(2, 5, requires_grad=True)
    pseudo = torch.tensor([[1.0, 0.0]] * 4)
    weights = meta_weights(lambda p: student_losses(pseudo, x @ p["W"].t()),
                           [lambda p: F.cross_entropy(x[:1] @ p["W"].t(), torch.tensor([1]))], {"W": w0}, 0.5)
    return weights, torch.zeros(4)


# --- the adapter ---------------------------------------------------------------------------------------------------
def test_check1_roberta_large_trainables_are_adapters_and_mlm_head_137m():
    from transformers import RobertaConfig, RobertaForMaskedLM

    with torch.device("meta"):
        model = RobertaForMaskedLM(RobertaConfig(vocab_size=50265, hidden_size=1024, num_hidden_layers=24,
                                                 num_attention_heads=16, intermediate_size=4096,
                                                 max_position_embeddings=514, type_vocab_size=1))
    adapter = ListAdapter(ListAdapterConfig())
    adapter.attach(model, ModelView(model))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {"lm_head.bias", "lm_head.dense.weight", "lm_head.dense.bias", "lm_head.layer_norm.weight",
            "lm_head.layer_norm.bias"}
    adapters = {f"roberta.encoder.layer.{i}.{m}.list_adapter.{w}.weight" for i in range(24)
                for m in ("attention.output.dense", "output.dense") for w in ("down", "up")}
    assert names == head | adapters
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == 24 * 2 * 2 * 1024 * 128 + (1024 * 1024 + 1024) + 2 * 1024 + 50265 == 13_684_825
    assert {n for g in adapter.param_groups() for n, _ in g.params} == names


def test_adapter_sits_after_the_dense_projection_with_n002_init():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64)).eval()
    ListAdapter(ListAdapterConfig(r=8)).attach(model, ModelView(model))
    out = model.bert.encoder.layer[0].attention.output  # BertSelfOutput: LN(dropout(dense(h)) + input)
    h, residual = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    ad = out.dense.list_adapter
    with torch.no_grad():
        dense = F.linear(h, out.dense.weight, out.dense.bias)
        expected = out.LayerNorm(dense + dense @ ad.down.weight.t() @ ad.up.weight.t() + residual)
        torch.testing.assert_close(out(h, residual), expected)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trained if not n.startswith("bert.")} == {
        "cls.predictions.bias", "cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias"}
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad  # the tied decoder stays frozen
    big = ListAdapter(ListAdapterConfig(r=256))
    llama = load_model(ModelConfig(name="builtin:tiny-llama"))
    big.attach(llama.model, llama.view)
    w = torch.cat([p.detach().reshape(-1) for g in big.param_groups() for _, p in g.params])
    assert sum(p.numel() for p in llama.model.parameters() if p.requires_grad) == 2 * 2 * 2 * 256 * 64
    assert w.std().item() == pytest.approx(0.02, rel=0.02) and abs(w.mean().item()) < 1e-3
    before = w.clone()
    big.reset_parameters(torch.Generator().manual_seed(3))
    again = torch.cat([p.detach().reshape(-1) for g in big.param_groups() for _, p in g.params])
    assert not torch.equal(before, again) and again.std().item() == pytest.approx(0.02, rel=0.02)


# --- data and configuration -----------------------------------------------------------------------------------------
def test_few_shot_draw_and_configuration_errors(tmp_path):
    from tokentune.data.config import DataConfig

    pool = write_labelled(tmp_path / "pool.jsonl", 40, 0, "parity")
    path, rest = split_few_shot(DataConfig(train=str(pool)), 3, 0, tmp_path / "out")
    labelled = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["label"] for r in labelled) == ["even"] * 3 + ["odd"] * 3 and len(rest) == 34
    again, _ = split_few_shot(DataConfig(train=str(pool)), 3, 0, tmp_path / "out2")
    assert again.read_text() == path.read_text()
    with pytest.raises(TokentuneError, match="fewer than 30"):
        split_few_shot(DataConfig(train=str(pool)), 30, 0, tmp_path / "out3")
    b = Batches(5, 2, 0)
    first = [b.next() for _ in range(3)]
    assert sorted(i for x in first for i in x) == list(range(5)) and [len(x) for x in first] == [2, 2, 1]
    with pytest.raises(TokentuneError, match="unlabelled text"):
        ListConfig()
    with pytest.raises(TokentuneError, match="label words are fixed"):
        ListConfig(unlabelled="u.jsonl", verbalizer={"train_weights": True})
    with pytest.raises(TokentuneError, match="does not read"):
        ListConfig(unlabelled="u.jsonl", student_train={"max_steps": 3})
    with pytest.raises(TokentuneError, match="meta_warmup"):
        ListConfig(unlabelled="u.jsonl", weighting="uniform", meta_warmup=0.1)
    bad = recipe_file(tmp_path, {"unlabelled": "u.jsonl"}, adapter={"name": "full"})
    with pytest.raises(TokentuneError, match="chooses every stage's adapter"):
        run_recipe("list", bad)


# --- a masked LM end to end: the MLM head's transform trains, embeddings and tied decoder do not --------------------
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "is", "plus", "?", "answer", ":", "even", "odd"] + \
    [str(i) for i in range(10)]


def test_masked_lm_run_trains_adapters_and_mlm_transform_only(tmp_path):
    from transformers import BertConfig, BertTokenizerFast

    torch.manual_seed(0)
    mlm = tmp_path / "mlm"
    from transformers import BertForMaskedLM

    base = BertForMaskedLM(BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=64))
    base.save_pretrained(mlm)
    BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(mlm)
    files = _files(tmp_path)
    path = recipe_file(tmp_path, {**RECIPE, "unlabelled": files["unlabelled"], "sessions": 1,
                                  "verbalizer": {"template": "{text} answer: {mask}"}, "semi_finetune": "none"},
                       model={"name": str(mlm), "task": "masked"},
                       data={"train": files["train"], "eval": files["eval"]}, train={"batch_size": 4, "lr": 1e-2})
    s = run_recipe("list", path)
    assert s["checks"]["teacher_frozen_within_sessions"]
    saved = load_file(str(tmp_path / "run" / "self_training" / "final" / "trainable.safetensors"))
    ref = dict(base.named_parameters())
    head = [k for k in saved if k.startswith("cls.")]
    assert sorted(head) == sorted(["cls.predictions.bias", "cls.predictions.transform.dense.weight",
                                   "cls.predictions.transform.dense.bias", "cls.predictions.transform.LayerNorm.weight",
                                   "cls.predictions.transform.LayerNorm.bias"])
    assert not torch.equal(saved["cls.predictions.transform.dense.weight"], ref["cls.predictions.transform.dense.weight"])
    assert all(".list_adapter." in k for k in saved if not k.startswith("cls."))
    assert s["checks"]["trainable_params"] == 2 * 2 * 2 * 4 * 32 + (32 * 32 + 32) + 2 * 32 + len(VOCAB)
    tree = yaml.safe_load((tmp_path / "run" / "self_training" / "config.yaml").read_text())
    assert tree["objective"]["calibration"] == "none" and tree["adapter"]["name"] == "list_adapter"
