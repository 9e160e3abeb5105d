"""Config: YAML + key=value overrides, slot configs chosen by name, helpful errors."""

import pytest

from tokentune.config import config_from_dict, load_config
from tokentune.errors import TokentuneError

MINIMAL = {
    "model": {"name": "builtin:tiny-llama"},
    "data": {"train": "data/train.jsonl", "max_length": 64},
    "adapter": {"name": "lora", "r": 4, "alpha": 8},
    "objective": {"name": "cross_entropy"},
    "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-3, "output_dir": "runs/x"},
}


def test_overrides_are_typed_and_reach_slot_configs():
    cfg = config_from_dict(MINIMAL, ["train.lr=1e-4", "adapter.r=8", "train.schedule=linear", "eval.at_start=true"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.adapter.r == 8 and cfg.adapter.name == "lora"
    assert cfg.train.schedule == "linear" and cfg.eval.at_start is True


def test_unknown_key_suggests_nearest():
    with pytest.raises(TokentuneError) as err:
        config_from_dict(MINIMAL, ["train.lrr=1e-4"])
    assert "train.lrr" in str(err.value) and "train.lr" in str(err.value)
    with pytest.raises(TokentuneError) as err:
        config_from_dict(MINIMAL, ["adapter.rr=4"])
    assert "adapter.rr" in str(err.value) and "did you mean" in str(err.value)


def test_unknown_method_lists_registered():
    with pytest.raises(TokentuneError) as err:
        config_from_dict(MINIMAL, ["adapter.name=lorra"])
    assert "lora" in str(err.value)


def test_bad_values_and_conflicts():
    with pytest.raises(TokentuneError, match="train.lr"):
        config_from_dict(MINIMAL, ["train.lr=-1"])
    with pytest.raises(TokentuneError, match="max_steps or train.epochs"):
        config_from_dict(MINIMAL, ["train.epochs=1"])
    with pytest.raises(TokentuneError, match="key=value"):
        config_from_dict(MINIMAL, ["train.lr"])


def test_yaml_file(tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert load_config(path, ["train.seed=3"]).train.seed == 3
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(TokentuneError, match="YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(TokentuneError, match="not found"):
        load_config(tmp_path / "missing.yaml")
