"""One pydantic model for a run: loaded from YAML, overridable from the command line (`train.lr=1e-4`).

Each slot's entry (adapter, selectors, objective) is validated by the config class its method registered
next to its code, chosen by `name`. Unknown keys are errors that suggest the nearest valid key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from . import registry
from .data.config import DataConfig
from .errors import TokentuneError, nearest


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    name: str = Field(description="builtin:NAME, a local directory, or a hub id (when online)")
    # masked: a masked LM with its MLM head (BertForMaskedLM), for label-word objectives (verbalizer)
    task: Literal["causal", "classification", "masked"] = "causal"
    revision: str | None = None
    trust_remote_code: bool = False
    # auto: fp32 weights; on CUDA the step runs under bf16 autocast, on CPU in fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # "tokentune" wraps SDPA with per-layer hooks (prefix/prompt methods, token scores); "sdpa"/"eager" bypass it.
    attn_implementation: Literal["tokentune", "sdpa", "eager"] = "tokentune"
    gradient_checkpointing: bool = False


class TrainConfig(_Section):
    max_steps: int | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0, description="rows per device per micro-batch")
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    save_every: int = Field(0, ge=0, description="0 = only the final artefact")
    keep_checkpoints: int = Field(2, ge=1)
    eval_every: int = Field(0, ge=0, description="0 = never during training")
    log_every: int = Field(1, gt=0)
    output_dir: str = "runs/run"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    loss_chunk_size: int = Field(1024, gt=0, description="tokens per LM-head chunk in the loss")

    @model_validator(mode="after")
    def _one_length(self):
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("set train.max_steps or train.epochs, not both")
        return self


class EvalConfig(_Section):
    at_start: bool = False
    at_end: bool = True
    # Exact-match of greedy generations against references (causal); None = when references exist.
    generate: bool | None = None
    max_new_tokens: int = Field(32, gt=0)
    batch_size: int | None = Field(None, gt=0)
    max_examples: int | None = Field(None, gt=0)


class LogConfig(_Section):
    tensorboard: bool | None = None  # None = when the tensorboard package is installed
    report: bool = True
    progress: bool = True


class RunConfig(_Section):
    model: ModelConfig
    data: DataConfig
    adapter: Any = Field(default_factory=lambda: {"name": "lora"})
    selectors: list[Any] = Field(default_factory=list)
    objective: Any = Field(default_factory=lambda: {"name": "cross_entropy"})
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @model_validator(mode="after")
    def _slots(self):
        self.adapter = _slot_config("adapter", self.adapter, "adapter")
        self.objective = _slot_config("objective", self.objective, "objective")
        self.selectors = [_slot_config("selector", s, f"selectors[{i}]") for i, s in enumerate(self.selectors)]
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def _slot_config(slot: str, value: Any, where: str):
    if isinstance(value, BaseModel):
        return value
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise TokentuneError(f"{where} must be a mapping with a 'name'", where=where,
                             fix=f"e.g. {where}: {{name: ...}}; see `tokentune methods`")
    entry = registry.get(slot, value["name"], where=f"{where}.name")
    if entry.config_cls is None:
        extra = set(value) - {"name"}
        if extra:
            raise TokentuneError(f"{slot} {value['name']!r} takes no options, got {sorted(extra)}", where=where)
        return value
    try:
        return entry.config_cls.model_validate(value)
    except ValidationError as exc:
        raise _friendly(exc, entry.config_cls, prefix=where) from None


# --- loading ------------------------------------------------------------------------------------


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        if isinstance(node, list):
            node = node[int(key)]
            continue
        node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise TokentuneError(f"cannot set {dotted!r}: {key!r} is not a section", where=dotted)
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise TokentuneError(f"override {item!r} is not key=value", fix="e.g. train.lr=1e-4 adapter.r=8")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw != "" else None))
    return out


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise TokentuneError(f"config file {str(path)!r} not found", fix="pass the path of a YAML config")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TokentuneError(f"config is not valid YAML: {exc}", where=str(path)) from None
    if not isinstance(tree, dict):
        raise TokentuneError("config must be a mapping of sections", where=str(path))
    return config_from_dict(tree, overrides, source=str(path))


def config_from_dict(tree: dict, overrides: list[str] = (), source: str = "<config>") -> RunConfig:
    import copy

    tree = copy.deepcopy(tree)
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise _friendly(exc, RunConfig, prefix="", source=source) from None


def _fields_at(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at `loc` (the parent of the bad key), walking nested pydantic models."""
    cls = model_cls
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        cls = ann
    return list(cls.model_fields)


def _friendly(exc: ValidationError, model_cls: type[BaseModel], prefix: str, source: str | None = None) -> TokentuneError:
    lines, fixes = [], []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in ((prefix,) if prefix else ()) + loc)
        if err["type"] == "extra_forbidden":
            guess = nearest(loc[-1], _fields_at(model_cls, loc[:-1]))
            lines.append(f"unknown key {key!r}")
            if guess:
                fixes.append(f"did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{guess}?")
        elif err["type"] == "missing":
            lines.append(f"missing key {key!r}")
        else:
            lines.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    return TokentuneError("invalid config: " + "; ".join(lines), where=source,
                          fix=" ".join(fixes) or "see README 'The config keys'")


def save_config(cfg: RunConfig, path: Path) -> None:
    from .engine.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
