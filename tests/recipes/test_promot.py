"""ProMoT on builtin:tiny-llama: the spec's checks (stage 1 changes no model weight, stage 2 changes no prompt value,
with- and without-prompt evaluations from one run), the format probe, and LoRA as stage 2."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tokentune.config import ModelConfig
from tokentune.errors import TokentuneError
from tokentune.models.loading import load_model

from .helpers import digest, recipe_file, run_recipe

P = 4


def _probe_file(tmp_path):
    path = tmp_path / "probe.jsonl"
    rows = [{"prompt": f"Spell the word number {i}:", "completion": f" w{i}"} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def promot_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("promot")
    recipe = {"prompt": {"num_virtual_tokens": P, "lr": 0.05}, "prompt_train": {"max_steps": 3},
              "model_train": {"max_steps": 3, "lr": 1e-3}, "baseline": True,
              "probe": {"data": str(_probe_file(tmp)), "max_new_tokens": 3}}
    path = recipe_file(tmp, recipe, eval={"max_examples": 4})
    return run_recipe("promot", path), tmp / "run"


def test_stage1_leaves_every_model_weight_bit_identical(promot_run):
    summary, _ = promot_run
    assert summary["checks"]["stage1_frozen_weights_unchanged"] is True
    # Independently: the weights the prompt stage froze are exactly the pretrained ones.
    base = load_model(ModelConfig(name="builtin:tiny-llama")).model
    assert digest(base.named_parameters()) == summary["checks"]["stage1_frozen_digest"]
    d = base.config.hidden_size
    assert summary["stages"]["prompt"]["trainable_params"] == P * d


def test_stage2_leaves_the_prompt_bit_identical_and_tunes_the_model(promot_run):
    summary, run = promot_run
    assert summary["checks"]["stage2_prompt_unchanged"] is True
    stage1 = load_file(run / "prompt" / "final" / "adapter_model.safetensors")["prompt_embeddings"]
    stage2 = load_file(run / "model" / "final" / "0-prompt_tuning" / "adapter_model.safetensors")["prompt_embeddings"]
    assert torch.equal(stage1, stage2)
    base = load_model(ModelConfig(name="builtin:tiny-llama")).model
    tuned = load_file(run / "model" / "final" / "1-full" / "model.safetensors")
    assert not any(k.startswith("tokentune_") for k in tuned)
    assert not torch.equal(tuned["model.embed_tokens.weight"], base.model.embed_tokens.weight)
    assert summary["stages"]["model"]["trainable_params"] == sum(p.numel() for p in base.parameters())


def test_both_evaluations_come_from_the_one_stage2_run(promot_run):
    summary, _ = promot_run
    with_p, without = summary["eval_with_prompt"], summary["eval_without_prompt"]
    assert set(with_p) == set(without) and "eval/loss" in with_p
    assert with_p["eval/loss"] != without["eval/loss"]
    # The trainer's own end-of-run evaluation (with the prompt attached) is the same number.
    assert summary["stages"]["model"]["after"]["eval/loss"] == pytest.approx(with_p["eval/loss"], rel=1e-6)


def test_format_probe_reports_every_model(promot_run):
    summary, _ = promot_run
    probe = summary["format_probe"]
    assert probe["n"] == 6
    assert set(probe["models"]) == {"promot_with_prompt", "promot_without_prompt", "pretrained", "fine_tuned"}
    # Label words default to the train split's answers: the sums 0..18.
    assert set(probe["label_words"]) <= {str(i) for i in range(19)} and len(probe["label_words"]) > 5
    for row in probe["models"].values():
        assert 0 <= row["label_word_rate"] <= row["first_word_label_rate"] <= 1
    assert "baseline" in summary["stages"]


def test_lora_as_stage2(tmp_path):
    recipe = {"prompt": {"num_virtual_tokens": P}, "prompt_train": {"max_steps": 2},
              "model_adapter": {"name": "lora", "r": 2, "alpha": 4, "targets": ["q", "v"]},
              "model_train": {"max_steps": 2}}
    summary = run_recipe("promot", recipe_file(tmp_path, recipe, eval={"max_examples": 2, "generate": False}))
    assert summary["checks"]["stage2_prompt_unchanged"] and summary["checks"]["stage1_frozen_weights_unchanged"]
    base = load_model(ModelConfig(name="builtin:tiny-llama")).model
    lora = sum(2 * (m.in_features + m.out_features) for n, m in base.named_modules()
               if n.endswith(("q_proj", "v_proj")))
    assert summary["stages"]["model"]["trainable_params"] == lora
    assert summary["eval_with_prompt"]["eval/loss"] != summary["eval_without_prompt"]["eval/loss"]


def test_defaults_are_the_papers():
    from tokentune.recipes.promot import ProMoTConfig

    cfg = ProMoTConfig()
    assert cfg.prompt["num_virtual_tokens"] == 100 and cfg.prompt["lr"] == 0.2 and cfg.prompt["name"] == "prompt_tuning"
    assert cfg.model_adapter["name"] == "full"


@pytest.mark.parametrize("recipe,match", [
    ({"model_adapter": {"name": "stack", "adapters": []}}, "cannot go under it"),
    ({"prompt_train": {"output_dir": "x"}}, "chosen by the recipe"),
    ({"model_train": {"max_step": 3}}, "max_steps"),
    ({"prompt": {"num_virtual_token": 3}}, "num_virtual_tokens"),
])
def test_config_errors(tmp_path, recipe, match):
    from tokentune.recipes.base import load_recipe

    with pytest.raises(TokentuneError, match=match):
        load_recipe("promot", recipe_file(tmp_path, recipe))


def test_refuses_a_base_adapter_it_would_ignore(tmp_path):
    with pytest.raises(TokentuneError, match="adapter section would be ignored"):
        run_recipe("promot", recipe_file(tmp_path, {}, adapter={"name": "full"}))


def test_needs_an_eval_split(tmp_path):
    path = recipe_file(tmp_path, {}, data={"eval": None})
    with pytest.raises(TokentuneError, match="eval split"):
        run_recipe("promot", path)


def test_the_example_file_is_a_valid_recipe():
    from pathlib import Path

    from tokentune.recipes.base import load_recipe

    recipe, base = load_recipe("promot", Path(__file__).resolve().parents[2] / "examples" / "promot_tweets.yaml")
    assert recipe.config.prompt["num_virtual_tokens"] == 100 and base.model.name == "builtin:smollm2-135m-instruct"
