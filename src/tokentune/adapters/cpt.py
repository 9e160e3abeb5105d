"""CPT, context-aware prompt tuning (Blau et al., 2024; PEFT's CPT): the few-shot context itself is the prompt.

The context (k labelled examples rendered with templates, cpt_context.py) enters as embeddings E0 + δ: E0 a frozen
fp32 copy of the word embeddings of its tokens, δ a zero-initialised trainable delta. After every optimiser step (and
at attach/load, and before a forward that finds δ outside the ball) each δ_i is projected onto its ball of radius
ε_type·sqrt(d/2048); a gradient mask lets only template and input-text rows change, so label and separator rows stay
exactly E0. The context is a causal prefix: it runs alone through the model once per forward (VirtualTokens.run_alone)
and its keys/values are offered to every record of the batch (packing-safe). CPT also trains on the context's own
label tokens: their loss comes from the same run's hidden states and enters the trainer through `aux_loss`.

Loss, as PEFT's `CPTEmbedding.calculate_loss` (a mean over all label tokens of weight x CE, the weights only in the
numerator): for Q records in a micro-batch,
    numerator    = sum over the records' label tokens of loss_weight x CE  +  Q x sum_j w_j CE_j (context labels)
    denominator  = sum of the records' label-token weights                 +  Q x (number of context label tokens)
where w_j = 1 ("none") or gamma^r for the r-th context example counted backwards from the last one (the appended
record is r = 0, weight 1). Per record this is exactly PEFT's row loss; the trainer sums both parts over
micro-batches and ranks before dividing, as for every objective.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ..errors import TokentuneError
from ..objectives.base import ObjectiveOutput
from ..objectives.chunked import chunked_cross_entropy
from ..registry import register
from .base import ParamGroup
from .cpt_context import (Context, Templates, build_context, epsilons, label_weights, render_query, split_example,
                          trainable_rows)
from .soft_prompt import freeze_base, own_module, refuse_merge
from .state_io import read_tensors, require_attached, write_tensors
from .virtual_tokens import VirtualTokens

WEIGHTS, META = "cpt.safetensors", "tokentune_adapter.json"
_TOL = 1e-5  # relative slack before a row counts as outside its ball (a projected row sits on the boundary)


class ContextExample(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str
    output: str


class CptConfig(BaseModel):
    """num_context_examples  k: the first k records of the training split form the context
    context_in_train      false: those k records leave the training split (PEFT's example keeps context and
                          training queries disjoint); true: they are also training queries
    input_template        "input: {}" (PEFT's example); the text around {} is the input template (types 4i+1)
    output_template       "output: {}"; the text around {} is the output template (types 4i+3)
    intra_separator       between an example's input and output part (type 0); PEFT's example: " "
    inter_separator       after each example (type 0); "" as PEFT's example code (its template names "\\n" but
                          never appends it)
    end_with_eos          end every example with EOS (type 0), as PEFT's example
    render_queries        render training and eval records with the same templates (only their label tokens carry
                          loss, as in PEFT); false: records stay as the data pipeline made them
    context_examples      explicit context as [{input, output}] texts instead of the training split
    token_ids, type_mask  explicit context tokens and their types (PEFT's cpt_token_ids / cpt_tokens_type_mask)
    epsilon               ε for input-text tokens (PEFT opt_projection_epsilon)
    format_epsilon        ε for template tokens (PEFT opt_projection_format_epsilon)
    weighting             none | decay (PEFT opt_weighted_loss_type)
    decay                 γ (PEFT opt_loss_decay_factor)
    lr                    δ's own learning rate; None = train.lr"""

    model_config = ConfigDict(extra="forbid")
    name: Literal["cpt"] = "cpt"
    num_context_examples: int = Field(10, gt=0)
    context_in_train: bool = False
    input_template: str = "input: {}"
    output_template: str = "output: {}"
    intra_separator: str = " "
    inter_separator: str = ""
    end_with_eos: bool = True
    render_queries: bool = True
    context_examples: list[ContextExample] | None = None
    token_ids: list[int] | None = None
    type_mask: list[int] | None = None
    epsilon: float = Field(0.1, ge=0)
    format_epsilon: float = Field(0.1, ge=0)
    weighting: Literal["none", "decay"] = "none"
    decay: float = Field(1.0, gt=0)
    lr: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> "CptConfig":
        for key in ("input_template", "output_template"):
            if getattr(self, key).count("{}") != 1:
                raise ValueError(f"adapter.{key} must contain exactly one '{{}}' (got {getattr(self, key)!r})")
        if (self.token_ids is None) != (self.type_mask is None):
            raise ValueError("adapter.token_ids and adapter.type_mask go together (one type per token)")
        if self.token_ids is not None and self.context_examples is not None:
            raise ValueError("give the context as token_ids/type_mask or as context_examples, not both")
        if self.context_examples is not None and not self.context_examples:
            raise ValueError("adapter.context_examples is empty")
        return self


@register("adapter", "cpt", config=CptConfig,
          description="CPT: context-aware prompt tuning (refined few-shot context in an eps ball, context label loss)")
class CptAdapter:
    name = "cpt"

    def __init__(self, config: CptConfig | None = None):
        self.config = config or CptConfig()
        self.context: Context | None = None
        self._attached = self._handed_out = self._capturing = False
        self._hidden = self._kv_cache = self.virtual = self._guard = None

    # --- the context ---------------------------------------------------------------------------------
    def prepare_data(self, splits, data_cfg, tokenizer, *, is_main: bool = True):
        """Builds the context (from the config, else the first k training records) and renders the records."""
        cfg = self.config
        if splits.format != "prompt_completion":
            raise TokentuneError(f"CPT needs input/output pairs on a causal LM; the data is {splits.format}",
                                 where="data.format", fix="use prompt_completion records (prompt = input text, "
                                                          "completion = label text) and a causal model")
        tpl = Templates.build(cfg, tokenizer)
        special, eos = set(tokenizer.all_special_ids or []), tokenizer.eos_token_id
        train = list(splits.train)
        context = self._configured_context(tokenizer)
        if context is None:
            k = cfg.num_context_examples
            need = k if cfg.context_in_train else k + 1
            if len(train) < need:
                raise TokentuneError(f"{len(train)} training records; CPT's context takes {k}"
                                     + ("" if cfg.context_in_train else " and at least one must remain a query"),
                                     where="adapter.num_context_examples",
                                     fix="lower num_context_examples, add records, or set context_in_train: true")
            context = build_context(tpl, [split_example(e, special, eos) for e in train[:k]])
            if not cfg.context_in_train:
                train = train[k:]
        self._set_context(context)

        def redo(examples):
            if not cfg.render_queries:
                return [dataclasses.replace(e, index=i) for i, e in enumerate(examples)]
            return [render_query(tpl, e, i, *split_example(e, special, eos), max_length=data_cfg.max_length,
                                 side=data_cfg.truncation_side) for i, e in enumerate(examples)]

        return dataclasses.replace(splits, train=redo(train), eval=redo(splits.eval) if splits.eval else splits.eval)

    def _configured_context(self, tokenizer) -> Context | None:
        cfg = self.config
        if cfg.token_ids is not None:
            return Context(tuple(cfg.token_ids), tuple(cfg.type_mask))
        if cfg.context_examples is not None and tokenizer is not None:
            def enc(text):
                return tokenizer(text, add_special_tokens=False)["input_ids"]

            pairs = [(enc(c.input), enc(c.output)) for c in cfg.context_examples]
            return build_context(Templates.build(cfg, tokenizer), pairs)
        return None

    def _set_context(self, context: Context) -> None:
        if context == self.context:
            return
        if self._handed_out:
            raise TokentuneError("the saved CPT context differs from the one this run trains", where="adapter",
                                 fix="resume with the data and adapter config the checkpoint was written with")
        self.context = context
        if self._attached:
            self._build()

    # --- attach ---------------------------------------------------------------------------------------
    def attach(self, model: nn.Module, view) -> None:
        if self._attached:
            raise TokentuneError("the cpt adapter is already attached", fix="create a new adapter for another model")
        if not view.is_causal:
            raise TokentuneError(f"CPT needs a causal language model; {type(model).__name__} is an encoder",
                                 where="adapter.name", fix="use a causal LM (PEFT's CPT requires CAUSAL_LM), or "
                                                           "prompt_tuning / lora for encoders")
        _ = view.lm_head  # raises a TokentuneError for models without an LM head (the context loss needs it)
        freeze_base(model)
        self.model, self.view = model, view
        self.holder = own_module(model, "cpt", nn.Module())  # -> model.tokentune_cpt
        self._handles = [view.backbone.register_forward_hook(self._capture)]
        self._attached = True
        if self.context is None:
            self.context = self._configured_context(view.tokenizer)
        if self.context is not None:
            self._build()
        else:  # built later by load() / load_state_dict(); until then a forward is an error, not the bare model
            self._guard = view.backbone.register_forward_pre_hook(self._no_context)

    def _no_context(self, module, args):
        raise TokentuneError("the CPT adapter has no context yet", where="adapter",
                             fix="train with data, give adapter.context_examples or token_ids, or load a trained run")

    def _build(self) -> None:
        """E0, δ, the token types and the virtual tokens for the current context (replacing earlier ones)."""
        table = self.view.embed_tokens.weight
        ids = torch.tensor(self.context.ids, dtype=torch.long, device=table.device)
        if int(ids.max()) >= table.shape[0]:
            raise TokentuneError(f"context token id {int(ids.max())} is outside the vocabulary ({table.shape[0]})",
                                 where="adapter.token_ids", fix="use ids of this model's tokenizer")
        types = torch.tensor(self.context.types, dtype=torch.long)
        pos, weights = label_weights(types, self.config.weighting, self.config.decay)
        # Buffers, so that they follow the model across devices; not persistent: state_dict() saves the context.
        buffers = {"e0": table.detach()[ids].float().clone(), "ids": ids, "row_mask": trainable_rows(types),
                   "eps": epsilons(types, self.config.epsilon, self.config.format_epsilon, table.shape[1]),
                   "label_pos": pos, "label_w": weights}
        for name, value in buffers.items():
            self.holder.register_buffer(name, value.to(table.device), persistent=False)
        zeros = torch.zeros(len(ids), table.shape[1], dtype=torch.float32, device=table.device)
        self.holder.delta = nn.Parameter(zeros)
        self.delta = self.holder.delta
        self.delta.register_hook(lambda grad: grad * self.holder.row_mask.to(grad.dtype))  # PEFT's backward hook
        if self.virtual is not None:
            self.virtual.remove()
        self.virtual = VirtualTokens(self.view, len(ids))
        self.virtual.before_forward = self._prefixes
        self.virtual.install()
        if self._guard is not None:
            self._guard.remove()
            self._guard = None
        self._kv_cache = None

    # --- forward ----------------------------------------------------------------------------------------
    def embeddings(self) -> torch.Tensor:
        """E0 + δ [N, d] in the word embedding's dtype."""
        return (self.holder.e0 + self.delta).to(self.view.embed_tokens.weight.dtype)

    def _prefixes(self, kwargs):
        if self._outside_ball():
            self.project()
        # Cached generation: the context's keys/values are computed at the prefill and reused at every decoding
        # step of the same cache (eval mode, no grad, δ unchanged).
        past = kwargs.get("past_key_values")
        past = kwargs.get("cache") if past is None else past  # transformers 5 names it `cache`
        frozen = past is not None and not self.model.training and not torch.is_grad_enabled()
        key = (id(past), id(self.delta), self.delta._version, torch.is_autocast_enabled(self.delta.device.type))
        decoding = frozen and hasattr(past, "get_seq_length") and past.get_seq_length() > 0
        if decoding and self._kv_cache is not None and self._kv_cache[0] == key:
            return self._kv_cache[1]
        self._capturing = self.model.training and torch.is_grad_enabled()
        try:
            kv = self.virtual.run_alone(self.embeddings().unsqueeze(0))
        finally:
            self._capturing = False
        self._kv_cache = (key, kv) if frozen else None
        return kv

    def _capture(self, module, args, output):
        if self._capturing:  # the context's own run: keep its hidden states for the context label loss
            self._hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    # --- projection ----------------------------------------------------------------------------------------
    def _outside_ball(self) -> bool:
        with torch.no_grad():
            return bool((self.delta.norm(dim=1) > self.holder.eps * (1 + _TOL)).any())

    @torch.no_grad()
    def project(self) -> None:
        """Rescale every δ_i with ‖δ_i‖ > ε_i to norm ε_i (rows with ε = 0 become 0): PEFT's get_projection."""
        norms = self.delta.norm(dim=1)
        hit = norms > 0
        scale = torch.ones_like(norms)
        eps = self.holder.eps
        scale[hit] = eps[hit] / norms[hit].clamp(min=eps[hit])
        self.delta.mul_(scale.unsqueeze(1))

    def after_optimizer_step(self, trainer, step: int) -> None:
        self.project()

    # --- the context label loss ------------------------------------------------------------------------------
    def context_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions of the context's label tokens, their loss weights relative to the record's weight 1)."""
        self._require_context()
        return self.holder.label_pos, self.holder.label_w

    def aux_weight_total(self, batch: dict) -> torch.Tensor:
        return torch.as_tensor(float(queries(batch) * len(self.context_weights()[0])), device=batch["labels"].device)

    def aux_loss(self, model, view, batch: dict) -> ObjectiveOutput:
        pos, w = self.context_weights()
        hidden, self._hidden = self._hidden, None
        if hidden is None:
            raise TokentuneError("CPT's context loss found no context run in this forward",
                                 fix="call aux_loss right after a training forward of the model (grad on, train mode)")
        losses = chunked_cross_entropy(hidden[0, pos - 1], view.lm_head, self.holder.ids[pos])
        q = queries(batch)
        return ObjectiveOutput(loss_sum=q * (losses * w).sum(),
                               weight_sum=torch.tensor(float(q * len(pos)), device=losses.device))

    # --- state -----------------------------------------------------------------------------------------
    def _require_context(self) -> None:
        require_attached(self)
        if self.context is None:
            self._no_context(None, None)

    def param_groups(self) -> list[ParamGroup]:
        self._require_context()
        self._handed_out = True  # from now on the optimiser holds δ: the context may no longer be replaced
        return [ParamGroup("cpt_delta", [("delta", self.delta)], lr=self.config.lr, weight_decay=0.0)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._require_context()
        return {"delta": self.delta.detach().contiguous(),
                "token_ids": torch.tensor(self.context.ids, dtype=torch.long),
                "type_mask": torch.tensor(self.context.types, dtype=torch.long)}

    def load_state_dict(self, state, source: str = "cpt adapter state") -> None:
        require_attached(self)
        if set(state) != {"delta", "token_ids", "type_mask"}:
            raise TokentuneError(f"saved CPT state has {sorted(state)}, expected delta, token_ids, type_mask",
                                 where=source, fix="load a state written by the cpt adapter")
        self._set_context(Context(tuple(state["token_ids"].tolist()), tuple(state["type_mask"].tolist())))
        delta = state["delta"]
        if tuple(delta.shape) != tuple(self.delta.shape):
            raise TokentuneError(f"saved delta has shape {tuple(delta.shape)}, the context {tuple(self.delta.shape)}",
                                 where=source, fix="load it on the base model it was trained on")
        with torch.no_grad():
            self.delta.copy_(delta.to(self.delta))
        self.project()

    def save(self, out_dir: Path, base_ref: str) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_tensors(out_dir / WEIGHTS, self.state_dict())
        (out_dir / META).write_text(json.dumps({"adapter": self.config.model_dump(), "base_model": base_ref,
                                                "context_tokens": len(self.context)}, indent=1))

    def load(self, in_dir: Path) -> None:
        """Restores the context (token ids and types) and δ: works on an adapter attached without data."""
        require_attached(self)
        meta = Path(in_dir) / META
        if meta.is_file():
            saved = json.loads(meta.read_text()).get("adapter", {})
            differ = {k: saved[k] for k in ("epsilon", "format_epsilon")
                      if k in saved and saved[k] != getattr(self.config, k)}
            if differ:  # the projection would shrink the trained δ onto other balls
                raise TokentuneError(f"the CPT adapter was trained with {differ}", where=str(meta),
                                     fix="set " + " ".join(f"adapter.{k}={v}" for k, v in differ.items()))
        self.load_state_dict(read_tensors(Path(in_dir) / WEIGHTS), source=str(in_dir))

    @contextlib.contextmanager
    def disabled(self):
        """The base model without the context while inside (a reference model without a second copy)."""
        self._require_context()
        self.virtual.enabled = False
        try:
            yield
        finally:
            self.virtual.enabled = True

    def merge(self) -> None:
        refuse_merge("cpt", "the refined context is extra input tokens, not a weight change")


def queries(batch: dict) -> int:
    """Records in the batch whose own label tokens carry loss (packed rows: segments restart their positions at 0;
    a zero-weight filler batch counts none). Each one sees the context once, so the context loss counts once each."""
    has = (batch["labels"] != -100) & (batch["loss_weights"] != 0)
    segment = (batch["position_ids"] == 0).cumsum(1)
    row = torch.arange(segment.shape[0], device=segment.device).unsqueeze(1)
    key = row * (segment.shape[1] + 1) + segment
    return int(torch.unique(key[has]).numel())
