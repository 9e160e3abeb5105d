"""LocFT-BF (Yang et al. 2025, "Fine-tuning Done Right in Model Editing"): plain fine-tuning of one
well-chosen location (an MLP down projection of a later block, or one whole block), everything else frozen,
trained breadth-first (epochs over shuffled mini-batches, which is what the trainer's loop already does)
with the paper's two loss thresholds: a step whose mini-batch loss is below `skip_below` makes no update,
and training stops after an epoch whose average loss is below `stop_below`.

The depth-first baseline (each edit trained to convergence before the next) is not offered: the trainer's
data order is a shuffled, pure function of (seed, epoch), and no adapter hook chooses the rows of a step.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from ..data.example import IGNORE
from ..errors import TokentuneError
from ..models.anatomy import ROLES
from ..registry import register
from .base import ParamGroup
from .state_io import copy_state, read_tensors, require_attached, tensor_state, write_tensors

WEIGHTS, META = "trainable.safetensors", "tokentune_adapter.json"
DEFAULT_DEPTH = 0.7
_HOOK_STATE = ("locft.epoch_loss_sum", "locft.epoch_examples", "locft.stopped")

# The released configs (ICT-STAR/LocFT hparams/*.yaml), keyed by (model_type, blocks, hidden size, vocab).
RELEASED = {
    ("llama", 32, 4096, 128256): "layers.22.mlp.down_proj.weight",  # Llama-3-8B-Instruct, lr 5e-4
    ("qwen2", 28, 3584, 152064): "layers.6.mlp.down_proj.weight",  # Qwen2.5-7B-Instruct, lr 5e-4
    ("mistral", 32, 4096, 32000): "layers.23",  # Mistral-7B-v0.1: the whole block, lr 5e-5
}


class LocFTConfig(BaseModel):
    """LocFT-BF options.

    location      what trains: a name or a list of names, each one of
                    "layers.<i>"                   a whole block (i may count from the end: layers.-1)
                    "layers.<i>.<role>[.weight]"   a projection by role (q k v o gate up down), family-neutral:
                                                   layers.22.down is mlp.down_proj on Llama, mlp.c_proj on GPT-2
                    "layers.<i>.<path>"            a module or parameter path inside the block (mlp.down_proj)
                    a full module or parameter name of the model (model.layers.22.mlp.down_proj.weight)
                  A module trains all its parameters (weight and bias); name ".weight" for the weight alone.
                  None: the released location when the model is one of the paper's three (and depth is unset),
                  otherwise "layers.<round(depth x (blocks - 1))>.down.weight".
    depth         relative depth of that default block (0 = first, 1 = last). None means 0.7: block 22 of 32,
                  the Llama-3-8B choice, following the paper's finding that later layers edit best. Setting it
                  together with location is an error.
    train_head    None: task heads that transformers initialised fresh (a classifier) train too (a causal LM
                  has none, so nothing but the location trains); true: they must exist; false: never.
    skip_below    a step whose loss is below this makes no update (None: never skip). Paper: 1e-2.
    stop_below    stop after an epoch whose example-weighted average step loss is below this (None: never).
                  Paper: 1e-2.
    loss_average  "example": the step loss is the mean over examples of each example's mean token loss (the
                  paper's loss; set as per-token weights 1 / n_target at data time). "token": the trainer's
                  usual mean over all target tokens.
    weight_decay  for the location's optimiser group; the paper uses Adam without decay (0). None: the run's
                  train.weight_decay.
    """

    model_config = ConfigDict(extra="forbid")
    name: Literal["locft"] = "locft"
    location: str | list[str] | None = None
    depth: float | None = Field(None, ge=0, le=1)
    train_head: bool | None = None
    skip_below: float | None = Field(1e-2, ge=0)
    stop_below: float | None = Field(1e-2, ge=0)
    loss_average: Literal["example", "token"] = "example"
    weight_decay: float | None = Field(0.0, ge=0)

    @field_validator("location")
    @classmethod
    def _non_empty(cls, location):
        names = [location] if isinstance(location, str) else location
        if names is not None and (not names or any(not n.strip() for n in names)):
            raise TokentuneError("location is empty", where="adapter.location",
                                 fix="name a block or projection, e.g. 'layers.-2.down', or omit location")
        return location

    @model_validator(mode="after")
    def _depth_only_by_default(self):
        if self.location is not None and self.depth is not None:
            raise TokentuneError("depth picks the default block, but location is set as well",
                                 where="adapter.depth", fix="remove depth, or remove location")
        return self


def default_location(view, depth: float | None = None) -> str:
    cfg = view.model.config
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    released = RELEASED.get((view.model_type, view.num_layers, hidden, getattr(cfg, "vocab_size", None)))
    if depth is None and released is not None:
        return released
    depth = DEFAULT_DEPTH if depth is None else depth
    return f"layers.{int(depth * (view.num_layers - 1) + 0.5)}.down.weight"  # round half up


def resolve_location(text: str, model: nn.Module, view) -> list[nn.Parameter]:
    """The parameters one location names (see LocFTConfig.location)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules(remove_duplicate=False))
    if text in params:
        return [params[text]]
    if text in modules and text:
        return list(modules[text].parameters())
    m = re.fullmatch(r"layers\.(-?\d+)(?:\.(.+))?", text)
    if m is None:
        raise _unknown(text, view)
    index, rest = int(m.group(1)), m.group(2)
    if not -view.num_layers <= index < view.num_layers:
        raise TokentuneError(f"location {text!r}: block {index} does not exist; the model has {view.num_layers}",
                             where="adapter.location",
                             fix=f"use 0..{view.num_layers - 1}, or -{view.num_layers}..-1 from the end")
    block = view.layers[index]
    if rest is None:
        return list(block.parameters())
    role, _, tail = rest.partition(".")
    if role in ROLES:
        paths = view.family.roles.get(role)
        if not paths:
            raise TokentuneError(f"location {text!r}: {view.model_type} has no {role!r} projection",
                                 where="adapter.location", fix=f"roles of this family: {', '.join(view.roles)}")
        rest = paths[0] + (f".{tail}" if tail else "")
    inner_params = dict(block.named_parameters())
    inner_modules = dict(block.named_modules())
    if rest in inner_params:
        return [inner_params[rest]]
    if rest in inner_modules:
        return list(inner_modules[rest].parameters())
    raise _unknown(text, view)


def _unknown(text: str, view) -> TokentuneError:
    inner = [n for n, _ in view.layers[-1].named_parameters()]
    return TokentuneError(
        f"location {text!r} names no block, module or parameter of this {view.model_type} model",
        where="adapter.location",
        fix="write 'layers.<i>' (a block), 'layers.<i>.down' (a projection by role), 'layers.<i>.<path>' with a "
            f"path inside the block such as {', '.join(inner[:3])}, or a full name such as "
            f"{view.layer_prefix(0)}{inner[0]}")


@register("adapter", "locft", config=LocFTConfig,
          description="LocFT-BF model editing: fine-tune one location (a later MLP down projection), breadth-first, "
                      "skip tiny-loss steps, stop at a loss threshold")
class LocFTAdapter:
    name = "locft"

    def __init__(self, config: LocFTConfig | None = None):
        self.config = config or LocFTConfig()
        self._attached = False
        self._epoch_loss_sum, self._epoch_examples, self._stopped = 0.0, 0.0, False
        self.skipped_steps = 0

    # --- data time ------------------------------------------------------------------------------
    def prepare_data(self, splits, data_cfg, tokenizer, *, is_main: bool = True):
        """loss_average "example": each training example's label tokens get weights summing to 1, so the
        trainer's global normaliser (the weight sum) counts examples and the step loss is the paper's mean
        of per-example means. Evaluation examples keep token weighting."""
        unspaced = sum(1 for ex in splits.train if ex.reference and not ex.reference[:1].isspace())
        if splits.format == "prompt_completion" and unspaced and is_main:
            from ..engine.logging import console

            console.print(f"[yellow]locft: {unspaced} of {len(splits.train)} completions do not start with a "
                          "space; the paper edits ' target' (write the space into the data if the prompt does "
                          "not end with one)")
        if self.config.loss_average == "token":
            return splits
        return dataclasses.replace(splits, train=[_per_example_weights(ex) for ex in splits.train])

    # --- structure ------------------------------------------------------------------------------
    def attach(self, model: nn.Module, view) -> None:
        if self._attached:
            raise TokentuneError("the locft adapter is already attached", fix="create a new adapter for another model")
        cfg = self.config
        locations = cfg.location if cfg.location is not None else default_location(view, cfg.depth)
        self.locations = [locations] if isinstance(locations, str) else list(locations)
        chosen = {id(p): p for text in self.locations for p in resolve_location(text, model, view)}
        names = {id(p): n for n, p in model.named_parameters()}  # a tied weight under its first (canonical) name
        self._params = [(names[i], p) for i, p in chosen.items()]
        self._head_params = [(names[id(p)], p) for m in self._heads(view).values() for p in m.parameters()
                             if id(p) not in chosen]
        for p in model.parameters():
            p.requires_grad_(False)
        for _, p in self._params + self._head_params:
            p.requires_grad_(True)
        self._attached = True

    def _heads(self, view) -> dict[str, nn.Module]:
        if self.config.train_head is False:
            return {}
        heads = view.task_heads
        if self.config.train_head and not heads:
            raise TokentuneError(f"train_head is true but {type(view.model).__name__} has no task head",
                                 where="adapter.train_head", fix="remove train_head (a causal LM head stays frozen)")
        return heads

    def param_groups(self) -> list[ParamGroup]:
        require_attached(self)
        groups = [ParamGroup("locft", list(self._params), weight_decay=self.config.weight_decay)]
        if self._head_params:
            groups.append(ParamGroup("head", list(self._head_params)))
        return groups

    # --- training hooks -------------------------------------------------------------------------
    def on_train_start(self, trainer) -> None:
        if self.config.loss_average == "example":
            bad = next((ex.source for ex in trainer.s.splits.train if not _sums_to_one(ex)), None)
            if bad is not None:  # a selector's prepare_data rebuilt the examples after ours
                raise TokentuneError(f"the per-example loss weights of locft were replaced (first at {bad})",
                                     where="adapter.loss_average",
                                     fix="set loss_average: token when a selector sets its own token weights")
        if trainer.env.is_main:
            from ..engine.logging import console

            names = [n for n, _ in self._params]
            count = sum(p.numel() for _, p in self._params)
            console.print(f"locft: training {', '.join(names)} ({count:,} parameters)")

    def after_backward(self, trainer, step: int, stats: dict) -> None:
        spe = trainer.schedule.steps_per_epoch
        if self._stopped:  # resumed from a checkpoint written after the stopping step: no more updates
            self._drop_grads()
            return
        if step % spe == 0:
            self._epoch_loss_sum, self._epoch_examples = 0.0, 0.0
        loss, n = stats["loss"], _examples_in_step(trainer, step)
        self._epoch_loss_sum += loss * n
        self._epoch_examples += n
        if self.config.skip_below is not None and loss < self.config.skip_below:
            self._drop_grads()  # AdamW skips a parameter whose grad is None: no moment update, no decay
            self.skipped_steps += 1
        if (step + 1) % spe == 0 and self.config.stop_below is not None and self._epoch_examples:
            self._stopped = self._epoch_loss_sum / self._epoch_examples < self.config.stop_below

    def should_stop(self, trainer, step: int) -> bool:
        return self._stopped

    def _drop_grads(self) -> None:
        for _, p in self._params + self._head_params:
            p.grad = None

    # --- state ----------------------------------------------------------------------------------
    def state_dict(self):
        require_attached(self)
        hook = torch.tensor([self._epoch_loss_sum, self._epoch_examples, float(self._stopped)], dtype=torch.float64)
        return {**tensor_state(self._params + self._head_params),
                **{key: hook[i:i + 1].clone() for i, key in enumerate(_HOOK_STATE)}}

    def load_state_dict(self, state) -> None:
        require_attached(self)
        state = dict(state)
        hook = [state.pop(key, None) for key in _HOOK_STATE]
        copy_state(self._params + self._head_params, state, source="locft adapter state")
        if all(h is not None for h in hook):
            self._epoch_loss_sum, self._epoch_examples = float(hook[0]), float(hook[1])
            self._stopped = bool(float(hook[2]))

    def save(self, out_dir: Path, base_ref: str) -> None:
        """The trained tensors (trainable.safetensors) and which base, config and location they belong to."""
        require_attached(self)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_tensors(out_dir / WEIGHTS, tensor_state(self._params + self._head_params))
        meta = {"adapter": self.name, "base_model_name_or_path": base_ref,
                "config": self.config.model_dump(mode="json"), "locations": self.locations,
                "parameters": [n for n, _ in self._params + self._head_params]}
        (out_dir / META).write_text(json.dumps(meta, indent=2) + "\n")

    def load(self, in_dir: Path) -> None:
        require_attached(self)
        in_dir = Path(in_dir)
        meta_path = in_dir / META
        if meta_path.is_file() and json.loads(meta_path.read_text()).get("adapter") != self.name:
            raise TokentuneError(f"{in_dir} was not written by the locft adapter", where=str(meta_path),
                                 fix="attach the adapter named in tokentune_adapter.json")
        copy_state(self._params + self._head_params, read_tensors(in_dir / WEIGHTS), source=str(in_dir / WEIGHTS))

    def merge(self) -> None:
        """Nothing to fold: the edited tensors are the model's own."""
        require_attached(self)


def _per_example_weights(ex):
    """Weights on the label tokens that sum to 1 (keeping any relative weights the example had)."""
    if ex.class_label is not None:
        return ex  # classification: one loss per example already
    base = ex.weights or [1.0] * len(ex.labels)
    total = sum(w for w, label in zip(base, ex.labels) if label != IGNORE)
    if total <= 0:
        return ex
    return dataclasses.replace(ex, weights=[w / total if label != IGNORE else 0.0 for w, label in zip(base, ex.labels)])


def _sums_to_one(ex) -> bool:
    if ex.class_label is not None or all(label == IGNORE for label in ex.labels):
        return True
    if ex.weights is None:
        return False
    return abs(sum(w for w, label in zip(ex.weights, ex.labels) if label != IGNORE) - 1.0) < 1e-4


def _examples_in_step(trainer, step: int) -> int:
    """Records in this optimiser step over all ranks (a packed row holds several), as the paper's epoch
    average weights each mini-batch by its size."""
    sched = trainer.schedule
    epoch, in_epoch = divmod(step, sched.steps_per_epoch)
    seed = trainer.cfg.train.seed
    count = 0
    for rank in range(sched.world_size):
        for rows in sched.micro_batches(seed, epoch, in_epoch, rank):
            count += sum(len(trainer.rows[i].seq_lens) if hasattr(trainer.rows[i], "seq_lens") else 1 for i in rows)
    return count
