"""Recipe files on tiny models: a run config from tests/e2e/helpers.write_config plus a `recipe:` section."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch
import yaml

from tests.e2e.helpers import write_config


def recipe_file(tmp: Path, recipe: dict, *, adapter: dict | None = None, objective: dict | None = None,
                **sections) -> Path:
    """Recipes choose each stage's adapter (and PANDA its objectives): those sections stay out unless given."""
    path = write_config(tmp, **sections)
    tree = yaml.safe_load(path.read_text())
    del tree["adapter"], tree["objective"]
    tree.update({k: v for k, v in (("adapter", adapter), ("objective", objective)) if v is not None})
    tree["recipe"] = recipe
    tree["log"]["report"] = False
    path.write_text(yaml.safe_dump(tree))
    return path


def run_recipe(name: str, path: Path, overrides=()) -> dict:
    from tokentune.engine.distributed import setup
    from tokentune.recipes.base import load_recipe

    recipe, base = load_recipe(name, path, list(overrides))
    return recipe.run(base, setup("cpu"))


def digest(named) -> str:
    """sha256 of (name, bytes) in name order, written here independently of the recipe's own digest."""
    h = hashlib.sha256()
    for name, t in sorted(named):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_labelled(path: Path, n: int, seed: int, task: str) -> Path:
    """text + label records for classification: `parity` (even/odd sum, 2 labels) or `size` (small/medium/large
    sum, 3 labels), on the same kind of inputs."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            if task == "parity":
                label = "even" if (a + b) % 2 == 0 else "odd"
            else:
                label = "small" if a + b < 6 else "medium" if a + b < 12 else "large"
            fh.write(json.dumps({"text": f"What is {a} plus {b}?", "label": label}) + "\n")
    return path
