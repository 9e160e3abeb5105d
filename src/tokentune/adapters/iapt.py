"""IAPT, instruction-aware prompt tuning (Zhu et al., 2024): every layer gets l_sp = 4 soft tokens generated from
the instruction by a small per-layer generator (down projection, self-attention pooling, learned rational
activation, up projection), offered to that layer's attention as extra key/value positions (P-tuning-v2 style).
The model stays frozen.

  iapt_generator.py   the generators and the parameter-count formula
  iapt_rational.py    the rational activation, initialised at GELU
  iapt_runtime.py     instruction masks, per-layer hooks, keys/values through the layer's own projections, the
                      generation cache
  iapt_bilevel.py     the activation coefficients learn on a held-out dev split (bilevel: true)
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import TokentuneError
from ..registry import register
from .base import ParamGroup
from .iapt_bilevel import DevSteps, split_dev
from .iapt_generator import IaptGenerators
from .iapt_runtime import IaptRuntime, require_supported
from .soft_prompt import freeze_base, own_module, refuse_merge, task_head_params
from .state_io import copy_state, read_tensors, require_attached, tensor_state, write_tensors

WEIGHTS, META = "iapt.safetensors", "tokentune_adapter.json"
_STRUCTURE = ("soft_tokens", "bottleneck", "share_across_layers", "soft_token_positions")


class IaptConfig(BaseModel):
    """soft_tokens           l_sp, soft tokens generated per layer (spec: 4)
    bottleneck            m, the generator's width (spec: 320 for d = 4096)
    share_across_layers   one set of down/up projections and pooler queries for all layers; the rational
                          activations stay per layer (spec: off)
    soft_token_positions  prefix: the soft tokens sit at positions 0..l_sp-1 (RoPE at those positions on
                          rotary models) and every record's tokens move to l_sp..; none: keys without position
                          encoding, inputs keep their positions
    bilevel               true: the activation coefficients learn only on a held-out dev split (first-order
                          DARTS); false: they train with the rest on the training batches, at activation_lr
    dev_fraction          bilevel: share of the training split held out as the dev split (seeded)
    activation_lr         learning rate of the rational coefficients Θ (spec: 1e-6)
    lr                    the generators' own learning rate; None = train.lr
    train_head            None: a fresh task head (encoder classifier) trains, the LM head stays frozen"""

    model_config = ConfigDict(extra="forbid")
    name: Literal["iapt"] = "iapt"
    soft_tokens: int = Field(4, gt=0)
    bottleneck: int = Field(320, gt=0)
    share_across_layers: bool = False
    soft_token_positions: Literal["prefix", "none"] = "prefix"
    bilevel: bool = True
    dev_fraction: float = Field(0.1, gt=0, lt=1)
    activation_lr: float = Field(1e-6, gt=0)
    lr: float | None = Field(None, gt=0)
    train_head: bool | None = None


@register("adapter", "iapt", config=IaptConfig,
          description="IAPT: per-layer soft tokens generated from the instruction (pooling + learned rational "
                      "activation), frozen model")
class IaptAdapter:
    name = "iapt"

    def __init__(self, config: IaptConfig | None = None):
        self.config = config or IaptConfig()
        self._attached = False
        self._dev: DevSteps | None = None
        self._dev_examples: list | None = None

    # --- data time ------------------------------------------------------------------------------
    def prepare_data(self, splits, data_cfg, tokenizer, *, is_main: bool = True):
        if not self.config.bilevel:
            return splits
        splits, self._dev_examples = split_dev(splits, self.config.dev_fraction)
        return splits

    # --- structure ------------------------------------------------------------------------------
    def attach(self, model: nn.Module, view) -> None:
        if self._attached:
            raise TokentuneError("the iapt adapter is already attached", fix="create a new adapter for another model")
        require_supported(view)
        cfg = self.config
        freeze_base(model)
        table = view.embed_tokens.weight
        generators = IaptGenerators(table.shape[1], view.num_layers, cfg.bottleneck, cfg.soft_tokens,
                                    cfg.share_across_layers)
        self.generators = own_module(model, "iapt", generators.to(device=table.device))
        self.runtime = IaptRuntime(view, self.generators, cfg.soft_tokens, positions=cfg.soft_token_positions)
        self._head_params = task_head_params(view, cfg.train_head)
        self.model, self.view = model, view
        self._attached = True

    def _own(self) -> list[tuple[str, nn.Parameter]]:
        return self.generators.projection_parameters() + self.generators.activation_parameters()

    def param_groups(self) -> list[ParamGroup]:
        require_attached(self)
        groups = [ParamGroup("generator", self.generators.projection_parameters(), lr=self.config.lr),
                  ParamGroup("activation", self.generators.activation_parameters(), lr=self.config.activation_lr)]
        if self._head_params:
            groups.append(ParamGroup("head", list(self._head_params)))
        return groups

    # --- the batch and the trainer's hooks ----------------------------------------------------------
    def before_batch(self, batch: dict) -> None:
        if self._attached:
            self.runtime.batch = batch

    def after_batch(self) -> None:
        if self._attached:
            self.runtime.batch = None

    def on_train_start(self, trainer) -> None:
        if not self.config.bilevel:
            return
        if not self._dev_examples:
            raise TokentuneError("iapt's bi-level training needs the dev split that prepare_data holds out of the "
                                 "training data, and it was not called", where="adapter.bilevel",
                                 fix="train through a tokentune session (it calls prepare_data), or set "
                                     "adapter.bilevel: false")
        self._dev = DevSteps(self._dev_examples, [p for _, p in self.generators.activation_parameters()])
        self._dev.start(trainer)

    def after_backward(self, trainer, step: int, stats: dict) -> None:
        if self._dev is not None:
            self._dev.drop_train_gradients(trainer)

    def after_optimizer_step(self, trainer, step: int) -> None:
        if self._dev is not None:
            self._dev.step(trainer, self, step)

    # --- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        require_attached(self)
        return tensor_state(self._own() + self._head_params)

    def load_state_dict(self, state) -> None:
        require_attached(self)
        copy_state(self._own() + self._head_params, state, source="iapt adapter state")

    def save(self, out_dir: Path, base_ref: str) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_tensors(out_dir / WEIGHTS, self.state_dict())
        (out_dir / META).write_text(json.dumps({"adapter": self.config.model_dump(), "base_model": base_ref}, indent=1))

    def load(self, in_dir: Path) -> None:
        require_attached(self)
        meta_path = Path(in_dir) / META
        if meta_path.is_file():
            saved = json.loads(meta_path.read_text()).get("adapter", {})
            differ = {k: v for k, v in saved.items() if k in _STRUCTURE and v != getattr(self.config, k)}
            if differ:
                raise TokentuneError(f"the iapt generators were trained with {differ}", where=str(meta_path),
                                     fix="set " + " ".join(f"adapter.{k}={v}" for k, v in differ.items()))
        copy_state(self._own() + self._head_params, read_tensors(Path(in_dir) / WEIGHTS), source=str(in_dir))

    @contextlib.contextmanager
    def disabled(self):
        """The base model's computation while inside (a reference model without a second copy)."""
        require_attached(self)
        self.runtime.enabled = False
        try:
            yield
        finally:
            self.runtime.enabled = True

    def merge(self) -> None:
        refuse_merge("iapt", "its soft tokens depend on each input's instruction: extra attention positions, "
                             "not a weight change")
