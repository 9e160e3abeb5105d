"""The LiST adapter (Wang et al., "LiST: Lite Prompted Self-training", NAACL 2022 Findings; shared/methods/list.md).

In every block, right after the dense output projection of the attention sublayer and of the FFN sublayer, and
before whatever follows it (dropout, residual, LayerNorm):

    h = Dense(x);   h <- h + (h W1) W2        W1: d x r, W2: r x d, no bias, no nonlinearity; W1, W2 ~ N(0, 0.02)

(the official code's `AdapeterLayer`, choice "LiST", inside RobertaAdaSelfOutput / RobertaAdaOutput). Both matrices
start non-zero, so the model is perturbed at attach, as in the code. Trainable: the adapters, plus every parameter of
the model's heads except the output-embedding matrix (the paper's `update_component=adapter`: the MLM head's dense,
LayerNorm and bias train, the decoder tied to the embeddings stays frozen). A decoder whose LM head is only the
(tied or untied) output embedding, as Llama-family models and GPT-2, therefore trains the adapters alone.

The map is linear, so it merges exactly: h (I + W1 W2) = x W^T (I + W1 W2) + b (I + W1 W2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import TokentuneError
from ..registry import register
from .base import ParamGroup
from .state_io import check_meta, copy_state, read_tensors, require_attached, tensor_state, write_meta, write_tensors

CHILD = "list_adapter"
WEIGHTS = "trainable.safetensors"
_ROLES = {"attn": ("o",), "ffn": ("down",), "both": ("o", "down")}
_SHAPING = ("r", "placement")  # a saved state with other values computes another function: refused at load


class ListAdapterConfig(BaseModel):
    """LiST's linear adapter (h <- h + h W1 W2 after the dense output projections).

    r          bottleneck width (the paper and run.sh: 128)
    placement  both (the code: after the attention-output and the FFN-output dense), attn, or ffn
    init_std   W1 and W2 are drawn from N(0, init_std^2) (the code's adapter_init_std 0.02)
    train_head the heads' parameters other than the output-embedding matrix train (the MLM head's transform and
               bias; a task classifier); false: the adapters alone"""

    model_config = ConfigDict(extra="forbid")
    name: Literal["list_adapter"] = "list_adapter"
    r: int = Field(128, gt=0)
    placement: Literal["both", "attn", "ffn"] = "both"
    init_std: float = Field(0.02, gt=0)
    train_head: bool = True


class LinearBottleneck(nn.Module):
    """(h W1) W2, without bias or nonlinearity; W1 is `down.weight`^T [d, r], W2 is `up.weight`^T [r, d]."""

    def __init__(self, d: int, r: int, *, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(d, r, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(r, d, bias=False, device=device, dtype=dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(h.to(self.down.weight.dtype))).to(h.dtype)

    @torch.no_grad()
    def draw(self, std: float, generator: torch.Generator | None = None) -> None:
        for w in (self.down.weight, self.up.weight):
            w.copy_(torch.randn(w.shape, generator=generator, dtype=torch.float32).mul_(std).to(w))

    def matrix(self) -> torch.Tensor:
        """I + W1 W2 [d, d] in fp32: the whole map h -> h + h W1 W2."""
        w1, w2 = self.down.weight.float().t(), self.up.weight.float().t()
        return torch.eye(w1.shape[0], device=w1.device) + w1 @ w2


def _add_bottleneck(module, args, output):
    return output + getattr(module, CHILD)(output)


def head_parameters(view) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the heads (outside the backbone) except the output-embedding matrix and anything tied to
    the input embeddings."""
    frozen = {id(view.embed_tokens.weight)}
    out = view.model.get_output_embeddings() if hasattr(view.model, "get_output_embeddings") else None
    if out is not None:
        frozen.add(id(out.weight))
    return [(f"{h}.{n}", p) for h, m in view.heads.items() for n, p in m.named_parameters() if id(p) not in frozen]


@register("adapter", "list_adapter", config=ListAdapterConfig,
          description="LiST adapter: linear bottleneck h + (h W1) W2 after each attention/FFN output dense; "
                      "MLM-head transform trains, tied decoder frozen; mergeable")
class ListAdapter:
    name = "list_adapter"

    def __init__(self, config: ListAdapterConfig | None = None):
        self.config = config or ListAdapterConfig()
        self._attached = self._merged = False

    # --- attach -----------------------------------------------------------------------------
    def attach(self, model: nn.Module, view) -> None:
        if self._attached:
            raise TokentuneError("the list_adapter is already attached", fix="create a new adapter for another model")
        cfg = self.config
        d = view.embed_tokens.weight.shape[1]
        for p in model.parameters():
            p.requires_grad_(False)
        self.targets = view.modules_for_roles(_ROLES[cfg.placement])
        self.handles, self._adapter_params = [], []
        for name, module in self.targets.items():
            out_dim = _out_features(module)
            if out_dim != d:
                raise TokentuneError(f"{name} outputs {out_dim} features, not the hidden size {d}", where="adapter")
            weight = next(module.parameters())
            # half-precision bases keep fp32 adapters: small updates vanish in bf16
            dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
            bottleneck = LinearBottleneck(d, cfg.r, device=weight.device, dtype=dtype)
            bottleneck.draw(cfg.init_std)
            module.add_module(CHILD, bottleneck)
            self.handles.append(module.register_forward_hook(_add_bottleneck))
            self._adapter_params += [(f"{name}.{CHILD}.{n}", p) for n, p in bottleneck.named_parameters()]
        self._head_params = head_parameters(view) if cfg.train_head else []
        for _, p in self._adapter_params + self._head_params:
            p.requires_grad_(True)
        self.model, self.view = model, view
        self._attached = True

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw every W1, W2 again from N(0, init_std^2) (LiST's re-initialised student); heads are left as they are."""
        self._live()
        for module in self.targets.values():
            getattr(module, CHILD).draw(self.config.init_std, generator)

    # --- training state ---------------------------------------------------------------------
    def _live(self) -> None:
        require_attached(self)
        if self._merged:
            raise TokentuneError("the list_adapter was merged into the base weights; it has no separate state now",
                                 where="adapter", fix="reload the run to train or save the adapter again")

    @property
    def _params(self) -> list[tuple[str, nn.Parameter]]:
        return self._adapter_params + self._head_params

    def param_groups(self) -> list[ParamGroup]:
        self._live()
        groups = [ParamGroup(self.name, list(self._adapter_params))]
        if self._head_params:
            groups.append(ParamGroup("head", list(self._head_params)))
        return groups

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._live()
        return tensor_state(self._params)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._live()
        copy_state(self._params, state, source="list_adapter state")

    # --- artefact ---------------------------------------------------------------------------
    def save(self, out_dir: Path, base_ref: str) -> None:
        self._live()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_tensors(out_dir / WEIGHTS, self.state_dict())
        write_meta(out_dir, self.name, base_ref, self.config, parameters=[n for n, _ in self._params])

    def load(self, in_dir: Path) -> None:
        self._live()
        in_dir = Path(in_dir)
        check_meta(in_dir, self.name, self.config, _SHAPING, required=False)
        copy_state(self._params, read_tensors(in_dir / WEIGHTS), source=str(in_dir / WEIGHTS))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold I + W1 W2 into each dense projection (weight and bias), then remove the adapters."""
        self._live()
        for module in self.targets.values():
            m = getattr(module, CHILD).matrix()
            w = module.weight
            if isinstance(module, nn.Linear):  # y = x W^T + b, W [d, in]
                w.copy_((m.t() @ w.float()).to(w.dtype))
            else:  # transformers' Conv1D (GPT-2): y = x W + b, W [in, d]
                w.copy_((w.float() @ m).to(w.dtype))
            if module.bias is not None:
                module.bias.copy_((module.bias.float() @ m).to(module.bias.dtype))
        for handle in self.handles:
            handle.remove()
        for module in self.targets.values():
            delattr(module, CHILD)
        self._merged = True


def _out_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[1]
    raise TokentuneError(f"the list_adapter cannot sit after a {type(module).__name__}", where="adapter",
                         fix="it adapts nn.Linear and GPT-2 Conv1D projections")
