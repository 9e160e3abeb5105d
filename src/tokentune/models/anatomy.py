"""The model view: the one place that knows where each family keeps its layers, embeddings, head
and projections. Adapters and selectors ask this module; supporting a new family means teaching it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..errors import TokentuneError

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
ADAPTER_PREFIX = "tokentune_"  # modules adapters add to the top model (soft prompts, generators): not heads


@dataclass(frozen=True)
class Family:
    backbone: str  # attribute path from the top model to the transformer body
    layers: str  # attribute path from the backbone to the list of blocks
    embed: str  # attribute path from the backbone to the token embedding
    final_norm: str | None  # attribute path from the backbone to the final norm (None: none / inside)
    roles: dict[str, tuple[str, ...]]  # role -> module path(s) inside one block
    fused_qkv: bool = False  # GPT-2's c_attn computes q, k and v together


_LLAMA = Family(
    backbone="model", layers="layers", embed="embed_tokens", final_norm="norm",
    roles={"q": ("self_attn.q_proj",), "k": ("self_attn.k_proj",), "v": ("self_attn.v_proj",),
           "o": ("self_attn.o_proj",), "gate": ("mlp.gate_proj",), "up": ("mlp.up_proj",),
           "down": ("mlp.down_proj",)},
)
_GPT2 = Family(
    backbone="transformer", layers="h", embed="wte", final_norm="ln_f",
    roles={"q": ("attn.c_attn",), "k": ("attn.c_attn",), "v": ("attn.c_attn",), "o": ("attn.c_proj",),
           "up": ("mlp.c_fc",), "down": ("mlp.c_proj",)},
    fused_qkv=True,
)
_BERT = Family(
    backbone="bert", layers="encoder.layer", embed="embeddings.word_embeddings", final_norm=None,
    roles={"q": ("attention.self.query",), "k": ("attention.self.key",), "v": ("attention.self.value",),
           "o": ("attention.output.dense",), "up": ("intermediate.dense",), "down": ("output.dense",)},
)

# model_type -> family. Llama-shaped decoders share one layout.
FAMILIES: dict[str, Family] = {
    **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "phi3")},
    "gpt2": _GPT2,
    **{t: _BERT for t in ("bert", "roberta", "xlm-roberta")},
}
_BACKBONE_OVERRIDES = {"roberta": "roberta", "xlm-roberta": "roberta"}


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class ModelView:
    """Answers structural questions about one loaded model."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.tokenizer = None  # set by the session; adapters that initialise from text read it
        cfg = getattr(model, "config", None)
        self.model_type = getattr(cfg, "model_type", type(model).__name__)
        if self.model_type not in FAMILIES:
            raise TokentuneError(
                f"architecture {self.model_type!r} ({type(model).__name__}) is not supported by tokentune's model view",
                fix="supported model types: " + ", ".join(sorted(FAMILIES))
                + "; teach tokentune/models/anatomy.py where this family keeps its layers, embedding, head and projections",
            )
        self.family = FAMILIES[self.model_type]
        self.backbone_attr = _BACKBONE_OVERRIDES.get(self.model_type, self.family.backbone)
        self.is_encoder = self.family is _BERT
        self.is_causal = not self.is_encoder

    # --- structure -------------------------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        return getattr(self.model, self.backbone_attr)

    @property
    def layers(self) -> nn.ModuleList:
        return _get(self.backbone, self.family.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return _get(self.backbone, self.family.embed)

    @property
    def embeddings(self) -> dict[str, nn.Embedding]:
        """Every embedding table (token; position and token-type where the family has them), by module name."""
        return {n: m for n, m in self.model.named_modules() if isinstance(m, nn.Embedding)}

    @property
    def lm_head(self) -> nn.Module:
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if head is None:
            raise TokentuneError(f"{type(self.model).__name__} has no language-model head")
        return head

    @property
    def head_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes of task heads (LM head, classifier) outside the backbone."""
        return tuple(n + "." for n, _ in self.model.named_children()
                     if n != self.backbone_attr and not n.startswith(ADAPTER_PREFIX))

    @property
    def heads(self) -> dict[str, nn.Module]:
        """Top-level modules outside the backbone that hold parameters: the LM head and any task head."""
        return {n: m for n, m in self.model.named_children()
                if n != self.backbone_attr and not n.startswith(ADAPTER_PREFIX) and next(m.parameters(), None) is not None}

    @property
    def task_heads(self) -> dict[str, nn.Module]:
        """Heads other than the LM head: a classifier or score layer, which transformers initialises fresh
        when a checkpoint is loaded for a task (top-level name -> module)."""
        out_emb = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        # Skip the LM head, or the module holding it (BERT's `cls`).
        return {n: m for n, m in self.heads.items() if out_emb is None or not any(x is out_emb for x in m.modules())}

    @property
    def final_norm(self) -> nn.Module | None:
        return _get(self.backbone, self.family.final_norm) if self.family.final_norm else None

    @property
    def tied_embeddings(self) -> bool:
        try:
            return self.lm_head.weight is self.embed_tokens.weight
        except TokentuneError:
            return False

    # --- projections by role --------------------------------------------------------------
    def layer_prefix(self, index: int) -> str:
        return f"{self.backbone_attr}.{self.family.layers}.{index}."

    def layer_of(self, param_name: str) -> int | None:
        """The block index a parameter belongs to, or None for embeddings/heads/norms outside blocks."""
        m = re.match(re.escape(f"{self.backbone_attr}.{self.family.layers}.") + r"(\d+)\.", param_name)
        return int(m.group(1)) if m else None

    @property
    def roles(self) -> tuple[str, ...]:
        """The projection roles this family has (GPT-2 and BERT have no gate)."""
        return tuple(r for r in ROLES if self.family.roles.get(r))

    def modules_for_roles(self, roles) -> dict[str, nn.Module]:
        """Full module names -> modules for the given roles (deduplicated: GPT-2's q/k/v share c_attn)."""
        out: dict[str, nn.Module] = {}
        for role in roles:
            if role not in ROLES:
                raise TokentuneError(f"unknown projection role {role!r}", fix=f"roles are {', '.join(ROLES)}")
            paths = self.family.roles.get(role)
            if not paths:
                raise TokentuneError(
                    f"{self.model_type} has no {role!r} projection",
                    fix=f"roles available for {self.model_type}: {', '.join(self.family.roles)}",
                )
            for i, layer in enumerate(self.layers):
                for path in paths:
                    out[self.layer_prefix(i) + path] = _get(layer, path)
        return out

    def role_of(self, module_name: str) -> list[str]:
        """Roles a module name plays (empty if none). The path inside the block must match exactly:
        BERT's `attention.output.dense` (o) also ends with `output.dense` (down)."""
        index = self.layer_of(module_name + ".x")
        if index is None:
            return []
        inner = module_name[len(self.layer_prefix(index)):]
        return [role for role, paths in self.family.roles.items() if inner in paths]
