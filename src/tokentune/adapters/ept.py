"""EPT, efficient prompt tuning by multi-space projection and prompt fusion (Lan et al., AAAI 2025) — REFERENCE
DESIGN. The paper has no released code and its equations could not be read; this implements the library's
reference design from shared/methods/ept.md as written, not the paper's formulas.

    E'  = E + A @ B                                   position-wise offset on the frozen word embeddings (DePT)
    F   = softmax((P_s Wq)(T Wk)^T / sqrt(d)) (T Wv)  fusion, T = A @ B (the [n, d] offset table)
    P~  = P_s + F Wo                                  Wo = 0 at init
    g   = softmax(mean_rows(P~) W_g)                  gate, N weights per prompt
    P*  = sum_i g_i · P~ W_i                          N sub-space projections, W_i ≈ I at init
    X   = concat(P*, E')                              input length s + n

init "svd": a long prompt P0 (l x d) ≈ U_r S_r V_r^T gives B = S_r V_r^T, A = 0 and P_s = P0[:s];
init "dept": A Kaiming-uniform, B = 0, P_s initialised directly.

W_i start at the identity plus a perturbation that sums to zero over the N sub-spaces, and W_g at zero (a uniform
gate), so P* = P~ at init (exactly when N = 1). The perturbation is ours: with every W_i = I the sub-spaces get
equal gradients up to the gate's scale, which Adam divides out, so they stay identical and the gate never learns.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ..errors import TokentuneError
from ..registry import register
from .base import ParamGroup
from .decomposed_prompt import (Beyond, LowRankOffset, OffsetHook, check_record_lengths, load_tensors,
                                save_tensors)
from .dept import REFERENCE_TEXT
from .soft_prompt import PromptEntry, PromptInit, freeze_base, init_prompt, own_module, refuse_merge, task_head_params
from .state_io import copy_state, require_attached, tensor_state

WEIGHTS = "ept.safetensors"


class EptConfig(BaseModel):
    """num_virtual_tokens  s, the short prompt's length
    r                   rank of the offset: A is [max_length, r], B is [r, d]
    max_length          n, the positions the offset covers
    num_spaces          N, sub-space projections mixed by the gate (each d x d)
    init                svd: A = 0, B = S_r V_r^T of a long prompt P0, P_s = P0's first s rows;
                        dept: A Kaiming-uniform, B = 0 (as DePT)
    long_prompt_length  l, the long prompt P0 that init: svd decomposes; None = 100 (the budget EPT matches:
                        s·d + r·(n+d) ≈ l·d)
    prompt_init         how P0 (svd) or P_s (dept) is initialised: text, vocab, random. text repeats the text's
                        tokens, so P0 has rank <= its distinct tokens: an svd init with r above that gives
                        (near-)zero rows of B; vocab gives a full-rank P0
    init_text           the text for prompt_init: text; None = DePT's reference string (describe your task)
    proj_noise          the W_i's perturbation around the identity, relative (entry std proj_noise / sqrt(d)),
                        zero-mean over the N sub-spaces; 0 = all W_i = I (the gate then never learns)
    prompt_lr           learning rate of P_s (DePT's default); None = train.lr
    low_rank_lr         learning rate of A and B (DePT's default); None = train.lr
    network_lr          learning rate of the fusion (Wq, Wk, Wv, Wo), the W_i and W_g; None = whatever P_s gets
                        (the design puts them in the prompt-side group)
    weight_decay        AdamW weight decay of every EPT tensor
    beyond              a position >= max_length: error, or zero = no offset there
    train_head          None: a fresh task head (encoder classifier) trains, the LM head stays frozen"""

    model_config = ConfigDict(extra="forbid")
    name: Literal["ept"] = "ept"
    num_virtual_tokens: int = Field(60, gt=0)
    r: int = Field(30, gt=0)
    max_length: int = Field(256, gt=0)
    num_spaces: int = Field(4, gt=0)
    init: Literal["svd", "dept"] = "svd"
    long_prompt_length: int | None = Field(None, gt=0)
    prompt_init: PromptInit = "text"
    init_text: str | None = None
    proj_noise: float = Field(0.1, ge=0)
    prompt_lr: float | None = Field(3e-1, ge=0)
    low_rank_lr: float | None = Field(5e-3, ge=0)
    network_lr: float | None = Field(None, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    beyond: Beyond = "error"
    train_head: bool | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.init_text is not None and self.prompt_init != "text":
            raise ValueError(f"init_text is used by prompt_init: text only (prompt_init is {self.prompt_init!r})")
        if self.init == "svd":
            if self.num_virtual_tokens > self.long_length:
                raise ValueError(f"init: svd takes P_s from the long prompt: num_virtual_tokens "
                                 f"({self.num_virtual_tokens}) must be <= long_prompt_length ({self.long_length})")
            if self.r > self.long_length:
                raise ValueError(f"init: svd needs r ({self.r}) <= long_prompt_length ({self.long_length})")
        elif self.long_prompt_length is not None:
            raise ValueError("long_prompt_length is used by init: svd only")
        return self

    @property
    def long_length(self) -> int:
        return 100 if self.long_prompt_length is None else self.long_prompt_length


def prompt_budget(s: int, r: int, n: int, d: int) -> int:
    """The decomposed prompt's own budget s·d + r·(n + d), comparable to a long prompt's l·d."""
    return s * d + r * (n + d)


def ept_parameter_count(s: int, r: int, n: int, d: int, spaces: int) -> int:
    """The whole trainable count: the prompt budget + Wq, Wk, Wv, Wo + N·d² projections + the d x N gate."""
    return prompt_budget(s, r, n, d) + 4 * d * d + spaces * d * d + d * spaces


class PromptNetwork(nn.Module):
    """Fusion, projections and gate: P* from P_s and the offset table (see the module docstring)."""

    def __init__(self, width: int, spaces: int, proj_noise: float):
        super().__init__()
        d = width
        self.query, self.key, self.value = (nn.Parameter(torch.empty(d, d)) for _ in range(3))
        for w in (self.query, self.key, self.value):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Linear's default
        self.out = nn.Parameter(torch.zeros(d, d))
        noise = torch.randn(spaces, d, d) * (proj_noise / math.sqrt(d))
        self.projections = nn.Parameter(torch.eye(d).expand(spaces, d, d) + (noise - noise.mean(0)))
        self.gate = nn.Parameter(torch.zeros(d, spaces))

    def fuse(self, prompt: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """P~ [s, d] from P_s [s, d] and the offset table [n, d]."""
        q, k, v = prompt @ self.query, table @ self.key, table @ self.value
        attn = torch.softmax(q @ k.T / math.sqrt(prompt.shape[-1]), dim=-1)
        return prompt + (attn @ v) @ self.out

    def gate_weights(self, fused: torch.Tensor) -> torch.Tensor:
        """g [N]: non-negative, sums to 1."""
        return torch.softmax(fused.mean(0) @ self.gate, dim=-1)

    def forward(self, prompt: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        fused = self.fuse(prompt, table)
        spaces = torch.einsum("sd,nde->nse", fused, self.projections)
        return torch.einsum("n,nse->se", self.gate_weights(fused), spaces)


def svd_init(long_prompt: torch.Tensor, rank: int) -> torch.Tensor:
    """B = S_r V_r^T [r, d] of P0 ≈ U_r S_r V_r^T: orthogonal rows scaled by the top-r singular values."""
    _, s, vh = torch.linalg.svd(long_prompt.float(), full_matrices=False)
    return s[:rank, None] * vh[:rank]


@register("adapter", "ept", config=EptConfig,
          description="EPT (reference design, no official code): DePT-style decomposed prompt + prompt fusion "
                      "attention + gated multi-space projection")
class EptAdapter:
    name = "ept"

    def __init__(self, config: EptConfig | None = None):
        self.config = config or EptConfig()
        self._attached = False

    def prepare_data(self, splits, data_cfg, tokenizer, *, is_main: bool = True):
        return check_record_lengths(splits, self.config.max_length, self.config.beyond, "ept")

    def attach(self, model: nn.Module, view) -> None:
        if self._attached:
            raise TokentuneError("the ept adapter is already attached", fix="create a new adapter for another model")
        cfg = self.config
        freeze_base(model)
        table, text = view.embed_tokens.weight, cfg.init_text or REFERENCE_TEXT
        d = table.shape[1]
        holder = own_module(model, "ept", nn.Module())  # -> model.tokentune_ept
        offset = LowRankOffset(cfg.max_length, cfg.r, d, scale=1.0)  # the design's E + A@B has no scale
        if cfg.init == "svd":
            if cfg.r > d:
                raise TokentuneError(f"init: svd needs r <= d ({cfg.r} > {d})", where="adapter.r")
            long_prompt = init_prompt(view, cfg.long_length, cfg.prompt_init, text)
            with torch.no_grad():
                offset.lora_embedding_A.zero_()
                offset.lora_embedding_B.copy_(svd_init(long_prompt, cfg.r))
            prompt = long_prompt[:cfg.num_virtual_tokens].clone()
        else:
            prompt = init_prompt(view, cfg.num_virtual_tokens, cfg.prompt_init, text)
        holder.prompt = nn.Parameter(prompt)
        holder.offset = offset.to(device=table.device)
        holder.network = PromptNetwork(d, cfg.num_spaces, cfg.proj_noise).to(device=table.device)
        self.prompt, self.offset, self.network = holder.prompt, holder.offset, holder.network
        self.entry = PromptEntry(view, cfg.num_virtual_tokens, lambda kwargs: self.reconstructed().unsqueeze(0))
        self.hook = OffsetHook(view, self.entry, self.offset, cfg.beyond, "ept")
        self._head_params = task_head_params(view, cfg.train_head)
        self.model, self.view = model, view
        self._attached = True

    def reconstructed(self) -> torch.Tensor:
        """P* [s, d], in the word embedding's dtype (the network computes in float32)."""
        out = self.network(self.prompt.float(), self.offset.table().float())
        return out.to(self.view.embed_tokens.weight.dtype)

    def gate(self) -> torch.Tensor:
        """The current gate weights g [N]."""
        return self.network.gate_weights(self.network.fuse(self.prompt.float(), self.offset.table().float()))

    def _own(self) -> list[tuple[str, nn.Parameter]]:
        return [("prompt_embeddings", self.prompt), ("lora_embedding_A", self.offset.lora_embedding_A),
                ("lora_embedding_B", self.offset.lora_embedding_B),
                *((f"network.{n}", p) for n, p in self.network.named_parameters())]

    def param_groups(self) -> list[ParamGroup]:
        require_attached(self)
        cfg, own = self.config, self._own()
        network_lr = cfg.prompt_lr if cfg.network_lr is None else cfg.network_lr
        groups = [ParamGroup("prompt", own[:1], lr=cfg.prompt_lr, weight_decay=cfg.weight_decay),
                  ParamGroup("low_rank", own[1:3], lr=cfg.low_rank_lr, weight_decay=cfg.weight_decay),
                  ParamGroup("network", own[3:], lr=network_lr, weight_decay=cfg.weight_decay)]
        if self._head_params:
            groups.append(ParamGroup("head", list(self._head_params)))
        return groups

    def state_dict(self) -> dict[str, torch.Tensor]:
        require_attached(self)
        return tensor_state(self._own() + self._head_params)

    def load_state_dict(self, state) -> None:
        require_attached(self)
        copy_state(self._own() + self._head_params, state, source="ept adapter state")

    def save(self, out_dir: Path, base_ref: str) -> None:
        require_attached(self)
        save_tensors(out_dir, WEIGHTS, self._own() + self._head_params, self.config, base_ref)

    def load(self, in_dir: Path) -> None:
        require_attached(self)
        load_tensors(in_dir, WEIGHTS, self._own() + self._head_params, self.config,
                     ("num_virtual_tokens", "r", "max_length", "num_spaces"))

    def merge(self) -> None:
        refuse_merge("ept", "the prompt is extra input, and the offset depends on a token's position, not on its id")
