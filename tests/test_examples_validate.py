"""Every shipped example config validates: run configs against the schema, recipe files against the recipe
their header comment says to run them with (`tokentune recipe NAME examples/FILE.yaml`)."""

import re
from pathlib import Path

import pytest
import yaml

from tokentune.config import load_config
from tokentune.recipes.base import load_recipe

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path):
    tree = yaml.safe_load(path.read_text())
    recipe = tree.get("recipe")
    if recipe is None:
        cfg = load_config(path)
        assert cfg.model.name
    else:
        named = re.search(r"tokentune recipe (\w+) examples/" + re.escape(path.name), path.read_text())
        assert named, f"{path.name}: the header should say how to run it (tokentune recipe NAME {path})"
        runner, base = load_recipe(named.group(1), path)
        assert base.model.name and runner is not None
