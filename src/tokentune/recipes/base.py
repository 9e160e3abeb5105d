"""What every recipe shares: its config file (a run config plus a `recipe:` section) and running one stage.

A recipe file is an ordinary run config with one more top-level section, `recipe:`, validated by the config
class the recipe registered. Overrides on the command line reach either part (`recipe.rounds=3`,
`train.lr=1e-4`). Stages train into sub-directories of train.output_dir, each a complete run directory.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Protocol

import yaml
from pydantic import ValidationError

from .. import registry
from ..config import RunConfig, _friendly, _set_dotted, config_from_dict, parse_overrides
from ..errors import TokentuneError


class Recipe(Protocol):
    name: str

    def run(self, cfg: RunConfig, env) -> dict:
        """Run every stage; return a JSON-ready summary (also written to train.output_dir/recipe_summary.json)."""


def load_recipe(name: str, path: str | Path, overrides: list[str] = ()):
    """(recipe object, base RunConfig) from a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise TokentuneError(f"recipe config {str(path)!r} not found", fix="pass the path of a YAML config")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise TokentuneError("config must be a mapping of sections", where=str(path))
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    section = tree.pop("recipe", None) or {}
    if not isinstance(section, dict):
        raise TokentuneError("the recipe section must be a mapping", where=f"{path}: recipe")
    if section.get("name", name) != name:
        raise TokentuneError(f"{path} is a config for recipe {section['name']!r}, not {name!r}", where=f"{path}: recipe.name",
                             fix=f"run `tokentune recipe {section['name']} {path}` or change recipe.name")
    entry = registry.get("recipe", name, where="recipe NAME")
    if getattr(entry.factory, "makes_train_data", False):  # e.g. LeTI: each round's data comes from the model
        data = tree.setdefault("data", {})
        if not isinstance(data, dict) or "train" in data:
            raise TokentuneError(f"the {name} recipe makes its own training data; data.train would be ignored",
                                 where=f"{path}: data.train", fix="remove data.train (keep max_length and the like)")
        data["train"] = f"<made by the {name} recipe>"
    options = {**section, "name": name}
    try:
        recipe_cfg = entry.config_cls.model_validate(options) if entry.config_cls else options
    except ValidationError as exc:
        raise _friendly(exc, entry.config_cls, prefix="recipe", source=str(path)) from None
    base = config_from_dict(tree, source=str(path))
    return entry.factory(recipe_cfg), base


def stage_config(base: RunConfig, stage: str, **changes) -> RunConfig:
    """The base config for one stage: output in <output_dir>/<stage>, sections updated by `changes`
    (e.g. adapter={...}, train={"max_steps": 100})."""
    tree = copy.deepcopy(base.to_dict())
    for section, values in changes.items():
        if isinstance(values, dict) and isinstance(tree.get(section), dict) and section not in ("adapter", "objective"):
            tree[section].update(values)
        else:
            tree[section] = values
    tree["train"]["output_dir"] = str(Path(base.train.output_dir) / stage)
    return config_from_dict(tree, source=f"recipe stage {stage}")


def run_stage(cfg: RunConfig, env, *, trained_from: Path | None = None, resume: bool = False) -> dict:
    """Train one stage with the ordinary trainer; returns the trainer's summary."""
    from ..engine.session import build_session
    from ..engine.trainer import Trainer

    session = build_session(cfg, env, trained_from=trained_from)
    return Trainer(session, resume=resume).train()


def write_summary(base: RunConfig, summary: dict) -> Path:
    from ..engine.atomic import atomic_write_text

    out = Path(base.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "recipe_summary.json"
    atomic_write_text(path, json.dumps(summary, indent=1, default=str))
    return path


def nested_adapter(value: dict, config_cls, name: str, defaults: dict, where: str, why: str):
    """A recipe section holding one adapter's options (e.g. ProMoT's `prompt`, PANDA's `prefix`): the name may be
    left out but must be `name`; the rest is validated by the adapter's own config class, on top of the recipe's
    defaults, with errors pointing at `where`. Returns the validated config."""
    if value.get("name", name) != name:
        raise TokentuneError(f"{why}, got {value['name']!r}", where=f"{where}.name", fix=f"drop {where}.name")
    try:
        return config_cls.model_validate({**defaults, **value, "name": name})
    except ValidationError as exc:
        raise _friendly(exc, config_cls, prefix=where) from None
