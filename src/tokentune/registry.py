"""Every method registers itself by name in its slot; the CLI, config and docs read from here."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

from .errors import TokentuneError, did_you_mean

SLOTS = ("adapter", "selector", "objective", "probe", "recipe")
_PACKAGES = {"adapter": "adapters", "selector": "selection", "objective": "objectives",
             "probe": "probes", "recipe": "recipes"}


@dataclass(frozen=True)
class Entry:
    slot: str
    name: str
    config_cls: type | None  # pydantic model with extra="forbid"; None if the method takes no options
    factory: Callable[..., Any]  # factory(config) -> the method object
    description: str


_REGISTRY: dict[str, dict[str, Entry]] = {slot: {} for slot in SLOTS}


def register(slot: str, name: str, *, config: type | None, description: str):
    """Class/function decorator: `@register("adapter", "lora", config=LoraConfig, description=...)`."""
    if slot not in SLOTS:
        raise ValueError(f"unknown slot {slot!r}")

    def deco(factory):
        existing = _REGISTRY[slot].get(name)
        if existing is not None and existing.factory is not factory:
            raise ValueError(f"{slot} {name!r} registered twice")
        _REGISTRY[slot][name] = Entry(slot, name, config, factory, description)
        return factory

    return deco


def load_all() -> None:
    """Import every method module so that its registration runs (idempotent)."""
    for slot, package in _PACKAGES.items():
        try:
            pkg = importlib.import_module(f"tokentune.{package}")
        except ModuleNotFoundError:
            continue
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"tokentune.{package}.{info.name}")


def entries(slot: str) -> list[Entry]:
    load_all()
    return sorted(_REGISTRY[slot].values(), key=lambda e: e.name)


def get(slot: str, name: str, *, where: str | None = None) -> Entry:
    load_all()
    try:
        return _REGISTRY[slot][name]
    except KeyError:
        raise TokentuneError(
            f"unknown {slot} {name!r}",
            where=where,
            fix=did_you_mean(name, _REGISTRY[slot]) + " (see `tokentune methods`)",
        ) from None
