"""PANDA on builtin:tiny-llama as a classifier (source: parity of a sum, 2 labels; target: its size, 3 labels): the
stages, the teacher's initialisation from the source prompt, β from the metric, β = 0 = plain prompt tuning bit for
bit, and the student's trainable count."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tokentune.errors import TokentuneError

from .helpers import recipe_file, run_recipe, write_labelled

P = 4
FAST = {"max_steps": 2, "batch_size": 4}


def _config(tmp, recipe):
    data = {"train": str(write_labelled(tmp / "target" / "train.jsonl", 24, 0, "size")),
            "eval": str(write_labelled(tmp / "target" / "eval.jsonl", 8, 1, "size")), "max_length": 32}
    source = {"train": str(write_labelled(tmp / "source" / "train.jsonl", 24, 2, "parity"))}
    base = {"source_data": source, "prefix": {"num_virtual_tokens": P}, "source_train": FAST,
            "teacher_train": FAST, "student_train": FAST, "metric_examples": 8}
    return recipe_file(tmp, {**base, **recipe}, model={"name": "builtin:tiny-llama", "task": "classification"},
                       data=data)


@pytest.fixture(scope="module")
def metric_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("panda")
    # A vanishing teacher lr keeps the teacher's prefix where the transfer put it, so its artefact shows the init.
    recipe = {"target_prompt": "teacher", "beta_scale": 2.0, "teacher_train": {**FAST, "lr": 1e-12}}
    return run_recipe("panda", _config(tmp, recipe)), tmp / "run"


def test_teacher_starts_from_the_source_prompt_but_not_its_head(metric_run):
    summary, run = metric_run
    assert set(summary["stages"]) == {"source", "teacher", "student"}
    assert summary["teacher_init"] == {"prefix": True, "head": False}  # 2 source labels, 3 target labels
    source = load_file(run / "source" / "final" / "prefix.safetensors")
    teacher = load_file(run / "teacher" / "final" / "prefix.safetensors")
    assert torch.equal(source["prefix"], teacher["prefix"])
    assert source["score.weight"].shape[0] == 2 and teacher["score.weight"].shape[0] == 3


def test_beta_comes_from_the_transferability(metric_run):
    summary, run = metric_run
    t = summary["transferability"]
    assert -1 <= t["similarity"] <= 1 and t["examples"] == 8 and t["beta_from"] == "transferability"
    assert t["beta"] == pytest.approx(2.0 * max(0.0, t["similarity"]))
    objective = yaml.safe_load((run / "student" / "config.yaml").read_text())["objective"]
    assert objective["name"] == "panda_kd" and objective["beta"] == pytest.approx(t["beta"])
    assert objective["teacher"] == str(run / "teacher" / "final")
    assert set(summary["target_eval"]) == {"prompt_transfer", "panda"}
    assert "eval/accuracy" in summary["target_eval"]["panda"]


def test_student_trains_the_deep_prompt_and_the_head_only(metric_run):
    summary, _ = metric_run
    from transformers import AutoConfig

    from tokentune.models.builtin import resolve_builtin

    c = AutoConfig.from_pretrained(resolve_builtin("tiny-llama"))
    kv_width = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    deep = c.num_hidden_layers * 2 * P * kv_width
    head = c.hidden_size * 3  # LlamaForSequenceClassification's score: no bias
    assert summary["stages"]["student"]["trainable_params"] == deep + head


def test_beta_zero_student_is_plain_prompt_tuning_bit_for_bit(tmp_path):
    summary = run_recipe("panda", _config(tmp_path, {"beta": 0.0}))
    assert summary["transferability"]["beta"] == 0.0 and summary["transferability"]["beta_from"] == "fixed"
    run = tmp_path / "run"
    student = load_file(run / "student" / "final" / "prefix.safetensors")
    target = load_file(run / "target" / "final" / "prefix.safetensors")
    assert student.keys() == target.keys() and all(torch.equal(student[k], target[k]) for k in student)
    assert set(summary["target_eval"]) == {"prompt_transfer", "prompt_tuning", "panda"}


def test_defaults_are_the_reference_scripts():
    from tokentune.recipes.panda import PandaConfig

    cfg = PandaConfig(source_data={"train": "x.jsonl"})
    assert cfg.prefix["num_virtual_tokens"] == 20 and cfg.prefix["reparameterize"] is False
    assert cfg.beta == "transferability" and cfg.target_prompt == "scratch"


def test_refuses_a_base_objective_it_would_ignore(tmp_path):
    path = _config(tmp_path, {})
    tree = yaml.safe_load(path.read_text())
    tree["objective"] = {"name": "cross_entropy", "label_smoothing": 0.1}
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(TokentuneError, match="objective section would be ignored"):
        run_recipe("panda", path)


@pytest.mark.parametrize("recipe,match", [
    ({"beta": 0.1, "beta_scale": 3.0}, "beta_scale"),
    ({"prefix": {"name": "prompt_tuning"}}, "deep prompts"),
    ({"prefix": {"train_head": False}}, "task head"),
    ({"source_data": {"eval": "x.jsonl"}}, "training data"),
    ({"student_train": {"output_dir": "x"}}, "chosen by the recipe"),
])
def test_config_errors(tmp_path, recipe, match):
    from tokentune.recipes.base import load_recipe

    with pytest.raises(TokentuneError, match=match):
        load_recipe("panda", _config(tmp_path, recipe))


def test_transferability_metric_on_a_causal_model(tmp_path):
    """A prompt compared with itself has similarity 1; pooled states of right-padded rows equal those of each row
    alone (the last real token is read, padding does not leak)."""
    from tokentune.config import load_config
    from tokentune.engine.distributed import setup
    from tokentune.engine.session import build_session
    from tokentune.recipes.panda_transfer import beta_from_similarity, pooled_states, transferability

    from tests.e2e.helpers import write_config

    path = write_config(tmp_path)
    tree = yaml.safe_load(path.read_text())
    tree["adapter"] = {"name": "prefix_tuning", "num_virtual_tokens": P, "reparameterize": False}
    path.write_text(yaml.safe_dump(tree))
    session = build_session(load_config(path), setup("cpu"))
    for name, scale in (("a", 0.5), ("b", -0.5)):
        with torch.no_grad():
            session.adapter.prefix.prefix.mul_(1 + scale)
        session.adapter.save(tmp_path / name, "base")
    same = transferability(session, tmp_path / "a", tmp_path / "a", 6)
    assert same["similarity"] == pytest.approx(1.0, abs=1e-5) and same["examples"] == 6
    other = transferability(session, tmp_path / "a", tmp_path / "b", 6)
    assert other["similarity"] < 1 - 1e-4
    rows = session.splits.train[:2]
    assert len(rows[0]) != len(rows[1])
    together = pooled_states(session, rows, batch_size=2)
    alone = torch.cat([pooled_states(session, [r], batch_size=1) for r in rows])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert beta_from_similarity(0.4, 2.0) == pytest.approx(0.8) and beta_from_similarity(-0.3, 2.0) == 0.0


def test_the_example_file_is_a_valid_recipe():
    from pathlib import Path

    from tokentune.recipes.base import load_recipe

    recipe, base = load_recipe("panda", Path(__file__).resolve().parents[2] / "examples" / "panda_bbc_to_tweets.yaml")
    assert base.model.task == "classification" and recipe.config.beta == "transferability"
