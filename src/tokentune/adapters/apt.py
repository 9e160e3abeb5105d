"""APT, approximated prompt tuning (Wu et al., 2023): the effect of deep prompt tokens on every input token,
computed beside the attention instead of inside it, so the sequence never grows.

Per block, with x the attention output right after its output projection and r the attention's input:

    K   = M + (M W_a) W_b              M: p×C "prompt memory" ~ N(0, 0.02); W_a: C×4 ~ N(0, 1); W_b: 4×C = 0
    A   = dropout(ReLU(r K^T))         N×p scores: no softmax, no 1/√C
    out = (x + stopgrad(max_j A) ⊙ (A M)) · exp(s)      s scalar, 0 at init

Placement (the o projection's parent module of the model view is hooked; see docs/adapters/apt.md):
  Llama-family   self_attn.o_proj output, r = the self_attn input (input_layernorm(h))
  GPT-2          attn.c_proj output (before resid_dropout), r = the attn input (ln_1(h))
  BERT/RoBERTa   attention.output.dense output (before dropout, residual, LayerNorm), r = input_tensor (METER)
A pre-hook on the parent keeps r until the projection's forward hook consumes it. A depends on each token's own
r only, so the branch never mixes positions: causal, packing- and cache-safe by construction.
"""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import TokentuneError
from ..registry import register
from .base import ParamGroup
from .soft_prompt import freeze_base, own_module, refuse_merge, task_head_params
from .state_io import check_meta, copy_state, read_tensors, require_attached, tensor_state, write_meta, write_tensors

WEIGHTS = "trainable.safetensors"
_SHAPING = ("num_memory", "rank")  # keys that change the saved tensors' shapes


class APTConfig(BaseModel):
    """num_memory  p, the memory ("approximated prompt") tokens per block (ViLT code: 50; METER code: 200)
    rank        width of the low-rank key correction K = M + (M W_a) W_b (hard-coded 4 in the paper's code)
    dropout     dropout on the ReLU scores A in training (the official ViLT and METER runs use 0)
    init_std    standard deviation of M's normal init (the paper: 0.02). Must be > 0: with M = 0 the branch is
                the identity but every gradient is zero too (ReLU(0) has slope 0), so it would never learn
    lr          the APT parameters' own learning rate; None = train.lr (the paper: 1e-4, 5e-4 for NLVR2)
    train_head  None: a fresh task head (encoder classifier) trains, the LM head stays frozen; true: task heads
                train (error if there is none); false: nothing but APT trains"""

    model_config = ConfigDict(extra="forbid")
    name: Literal["apt"] = "apt"
    num_memory: int = Field(50, gt=0)
    rank: int = Field(4, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    init_std: float = Field(0.02, gt=0)
    lr: float | None = Field(None, gt=0)
    train_head: bool | None = None


class ApproximatePrompt(nn.Module):
    """One block's APT module (the official code's `approximate_prompt`)."""

    def __init__(self, dim: int, num_memory: int, rank: int, *, dropout: float = 0.0, init_std: float = 0.02,
                 device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.memory = nn.Parameter(torch.empty(num_memory, dim, **kw).normal_(0.0, init_std))
        self.w_a = nn.Parameter(torch.empty(dim, rank, **kw).normal_(0.0, 1.0))
        self.w_b = nn.Parameter(torch.zeros(rank, dim, **kw))
        self.log_scale = nn.Parameter(torch.zeros(1, **kw))  # s; the output is multiplied by exp(s)
        self.dropout = nn.Dropout(dropout)

    def keys(self) -> torch.Tensor:
        """K = M + (M W_a) W_b, [p, C]; equals M while W_b = 0."""
        return self.memory + (self.memory @ self.w_a) @ self.w_b

    def scores(self, r: torch.Tensor) -> torch.Tensor:
        """A = dropout(ReLU(r K^T)), [..., N, p]."""
        return self.dropout(F.relu(r @ self.keys().T))

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        dtype = self.memory.dtype
        a = self.scores(r.to(dtype))
        weight = a.amax(dim=-1, keepdim=True).detach()  # plays λ's role; no gradient, as in the official code
        out = (x.to(dtype) + weight * (a @ self.memory)) * self.log_scale.exp()
        return out.to(x.dtype)


def _sites(view) -> list[tuple[str, nn.Module, nn.Module]]:
    """(parent name, parent module, output projection) per block: the module whose input is r and its o projection."""
    out = []
    for name, proj in view.modules_for_roles(["o"]).items():
        parent = name.rpartition(".")[0]
        out.append((parent, view.model.get_submodule(parent), proj))
    return sorted(out, key=lambda site: view.layer_of(site[0] + ".x"))


@register("adapter", "apt", config=APTConfig,
          description="APT (Wu et al. 2023): per-block prompt memory attended with ReLU scores beside the "
                      "attention, no extra tokens; frozen model; not mergeable")
class APTAdapter:
    name = "apt"

    def __init__(self, config: APTConfig | None = None):
        self.config = config or APTConfig()
        self._attached = False
        self.enabled = True
        self._pending: dict[int, torch.Tensor] = {}  # block -> r, from the parent's pre-hook to the o hook

    # --- attach -------------------------------------------------------------------------------
    def attach(self, model: nn.Module, view) -> None:
        if self._attached:
            raise TokentuneError("the apt adapter is already attached", fix="create a new adapter for another model")
        cfg = self.config
        sites = _sites(view)
        weight = view.embed_tokens.weight
        # Half-precision bases keep fp32 APT tensors (as LoRA does): small updates vanish in bf16.
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        freeze_base(model)
        blocks = nn.ModuleList(ApproximatePrompt(weight.shape[1], cfg.num_memory, cfg.rank, dropout=cfg.dropout,
                                                 init_std=cfg.init_std, device=weight.device, dtype=dtype)
                               for _ in sites)
        self.blocks = own_module(model, "apt", blocks.train(model.training))  # -> model.tokentune_apt
        self._encoder = view.is_encoder
        self._handles = []
        for i, (_, parent, proj) in enumerate(sites):
            self._handles += [parent.register_forward_pre_hook(partial(self._grab, i), with_kwargs=True),
                              proj.register_forward_hook(partial(self._apply, i))]
        self._head_params = task_head_params(view, cfg.train_head)
        self.sites = [name for name, _, _ in sites]
        self.model, self.view = model, view
        self._attached = True

    def _grab(self, index: int, module, args, kwargs):
        if self._encoder:  # BertSelfOutput.forward(hidden_states, input_tensor): r = input_tensor
            r = args[1] if len(args) > 1 else kwargs["input_tensor"]
        else:  # the attention module's input, i.e. the pre-norm output
            r = args[0] if args else kwargs["hidden_states"]
        self._pending[index] = r

    def _apply(self, index: int, module, args, output):
        r = self._pending.pop(index, None)  # consumed at once: no activation outlives its forward
        if r is None:
            raise TokentuneError(f"apt: the output projection of block {index} ran outside its attention module",
                                 where=self.sites[index], fix="call the model, not the projection on its own")
        return self.blocks[index](output, r) if self.enabled else None

    # --- training state -----------------------------------------------------------------------
    def _own(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"tokentune_apt.{n}", p) for n, p in self.blocks.named_parameters()]

    def param_groups(self) -> list[ParamGroup]:
        require_attached(self)
        groups = [ParamGroup("apt", self._own(), lr=self.config.lr)]
        if self._head_params:
            groups.append(ParamGroup("head", list(self._head_params)))
        return groups

    def state_dict(self) -> dict[str, torch.Tensor]:
        require_attached(self)
        return tensor_state(self._own() + self._head_params)

    def load_state_dict(self, state) -> None:
        require_attached(self)
        copy_state(self._own() + self._head_params, state, source="apt adapter state")

    # --- artefact -----------------------------------------------------------------------------
    def save(self, out_dir: Path, base_ref: str) -> None:
        """APT (and trained head) tensors, with the config and base they belong to."""
        require_attached(self)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_tensors(out_dir / WEIGHTS, self.state_dict())
        write_meta(out_dir, self.name, base_ref, self.config, sites=self.sites)

    def load(self, in_dir: Path) -> None:
        require_attached(self)
        in_dir = Path(in_dir)
        check_meta(in_dir, self.name, self.config, _SHAPING, required=False)
        copy_state(self._own() + self._head_params, read_tensors(in_dir / WEIGHTS), source=str(in_dir / WEIGHTS))

    @contextlib.contextmanager
    def disabled(self):
        """The frozen base's computation while inside (a reference model without a second copy)."""
        require_attached(self)
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def merge(self) -> None:
        require_attached(self)
        refuse_merge("apt", "its memory attention ReLU(r K^T) M is a nonlinear function of each token's hidden "
                            "state added beside the attention output, which no change of the linear weights "
                            "reproduces")
