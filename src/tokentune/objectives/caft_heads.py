"""CAFT's auxiliary heads: the modules, how they are built and initialised, and their files.

Head k (k = 1..K) maps the hidden state at position t to a hidden state whose unembedding predicts token t+1+k.
A head is `num_layers` blocks, each either
  transformer  a copy of one of the model's own decoder layers (the paper's code copies the second-to-last one when
               the heads are first trained), run over the whole sequence with the mask and rotary embeddings the
               model built for its last layer (block-diagonal for packed rows)
  linear       x + SiLU(W x + b) with W and b zero-initialised: the identity at init (the code zeroes W only and
               leaves b at PyTorch's default; zeroing b too makes the block exactly the identity, as the spec says)
followed by an optional unembedding of its own (`separate_unembedding`, initialised from the LM head). Without one,
the heads share the model's LM head (frozen unless the adapter trains it). No norm follows a head (as in the code)
unless the objective sets head_norm (the trunk's final norm, shared).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import TokentuneError

WEIGHTS, META = "caft_heads.safetensors", "caft_heads.json"
ARCH_KEYS = ("num_heads", "num_layers", "head_arch", "separate_unembedding", "head_input", "head_norm")


class ResidualBlock(nn.Module):
    """x + SiLU(W x + b); identity at init."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class AuxHead(nn.Module):
    def __init__(self, blocks: list[nn.Module], arch: str, unembed: nn.Linear | None):
        super().__init__()
        self.arch = arch
        self.layers = nn.ModuleList(blocks)
        self.unembed = unembed  # None: the model's LM head is shared

    def forward(self, x: torch.Tensor, layer_args: tuple = (), layer_kwargs: dict | None = None) -> torch.Tensor:
        """Hidden states before the unembedding. Linear blocks act per position (x may be [N, H]); transformer
        blocks need the whole sequence [B, T, H] and the extra arguments the model passed to its last layer."""
        for block in self.layers:
            if self.arch == "linear":
                x = block(x)
            else:
                out = block(x, *layer_args, **(layer_kwargs or {}))
                x = out[0] if isinstance(out, tuple) else out  # older layers return (hidden, ...)
        return x


class CaftHeads(nn.Module):
    def __init__(self, heads: list[AuxHead]):
        super().__init__()
        self.heads = nn.ModuleList(heads)


def base_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A decoder layer's own weights, with adapter wrappers seen through: LoRA's `x.base_layer.weight` is the
    layer's `x.weight`, and the adapter's own tensors (lora_A/B, ...) are left out by the caller's key filter."""
    return {k.replace(".base_layer.", "."): v for k, v in layer.state_dict().items()}


def copy_decoder_layer(view, index: int) -> nn.Module:
    """A fresh, unwrapped copy of decoder layer `index` (its pretrained weights, none of an adapter's)."""
    layers = view.layers
    if not -len(layers) <= index < len(layers):
        raise TokentuneError(f"layer {index} does not exist: the model has {len(layers)} decoder layers",
                             where="objective.init_layer", fix=f"use -{len(layers)}..{len(layers) - 1}")
    source = layers[index]
    position = index % len(layers)
    try:
        with torch.random.fork_rng(devices=[]):  # the fresh layer's throwaway init must not move the run's RNG
            fresh = type(source)(view.model.config, position)
    except TypeError as exc:
        raise TokentuneError(f"cannot build a {type(source).__name__} for a transformer head: {exc}",
                             where="objective.head_arch", fix="use head_arch: linear") from None
    state = base_state(source)
    wanted = fresh.state_dict()
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise TokentuneError(f"cannot read the weights of decoder layer {index} through the adapter: "
                             f"missing e.g. {missing[:3]}", where="objective.head_arch",
                             fix="use head_arch: linear, or load pretrained heads (objective.heads)")
    fresh.load_state_dict({k: state[k] for k in wanted})
    weight = next(source.parameters())
    return fresh.to(device=weight.device, dtype=weight.dtype)


def build_heads(view, cfg) -> CaftHeads:
    """cfg: CaftConfig. Transformer blocks start as copies of layer `cfg.init_layer`; linear blocks as the
    identity; separate unembeddings as copies of the LM head."""
    lm_head = view.lm_head
    weight = lm_head.weight
    hidden = weight.shape[1]
    if cfg.head_arch == "transformer":
        template = copy_decoder_layer(view, cfg.init_layer)
    heads = []
    for _ in range(cfg.num_heads):
        if cfg.head_arch == "transformer":
            blocks = [copy.deepcopy(template) for _ in range(cfg.num_layers)]
        else:
            blocks = [ResidualBlock(hidden).to(device=weight.device, dtype=weight.dtype) for _ in range(cfg.num_layers)]
        unembed = None
        if cfg.separate_unembedding:
            unembed = nn.Linear(hidden, weight.shape[0], bias=getattr(lm_head, "bias", None) is not None,
                                device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                unembed.weight.copy_(weight)
                if unembed.bias is not None:
                    unembed.bias.copy_(lm_head.bias)
        heads.append(AuxHead(blocks, cfg.head_arch, unembed))
    return CaftHeads(heads)


def heads_file_dir(path: str | Path) -> Path:
    """The directory holding caft_heads.safetensors: given directly, or a run directory / its final/."""
    path = Path(path)
    for candidate in (path, path / "objective", path / "final" / "objective"):
        if (candidate / WEIGHTS).is_file():
            return candidate
    raise TokentuneError(f"no {WEIGHTS} in {path} (nor in its objective/ or final/objective/)", where="objective.heads",
                         fix="point at a run trained with objective caft (e.g. the caft_heads recipe's heads/ stage)")


def write_heads(module: CaftHeads, out_dir: Path, meta: dict) -> None:
    from ..adapters.state_io import write_tensors
    from ..engine.atomic import atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tensors(out_dir / WEIGHTS, module.state_dict())
    atomic_write_text(out_dir / META, json.dumps(meta, indent=1) + "\n")


def read_heads(module: CaftHeads, path: str | Path, meta: dict) -> None:
    """Load heads saved by write_heads; their architecture (ARCH_KEYS) and size must match `meta`."""
    from ..adapters.state_io import copy_state, read_tensors

    src = heads_file_dir(path)
    saved = json.loads((src / META).read_text()) if (src / META).is_file() else {}
    differ = {k: (saved.get(k), meta[k]) for k in (*ARCH_KEYS, "hidden_size", "vocab_size") if saved.get(k) != meta[k]}
    if differ:
        shown = ", ".join(f"{k}: saved {a!r}, configured {b!r}" for k, (a, b) in differ.items())
        raise TokentuneError(f"the heads in {src} do not fit this objective ({shown})", where="objective.heads",
                             fix="configure the objective like the run that trained the heads, or train new heads")
    copy_state(list(module.state_dict(keep_vars=True).items()), read_tensors(src / WEIGHTS), source=str(src / WEIGHTS))
