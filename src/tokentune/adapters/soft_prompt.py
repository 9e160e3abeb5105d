"""A soft prompt and the two ways it enters a model, shared by every prompt method (prompt tuning, DePT,
PTEC, ProMoT, PANDA):

  causal models   the prompt runs alone and its keys/values are offered to the real tokens at every layer
                  (virtual_tokens.py: exact prompt tuning, packing- and cache-safe)
  encoders        the prompt's embeddings are inserted right after the first token ([CLS]), so the pooler still
                  reads [CLS]; the P positions are removed from the output hidden states again

Also the initialisations of the prompt (text, vocabulary sample, random) and the pieces every prompt adapter
needs: freezing the base, training a fresh task head, refusing to merge.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import nn

from ..errors import TokentuneError
from .virtual_tokens import VirtualTokens

PromptInit = Literal["vocab", "text", "random"]


def init_prompt(view, num_tokens: int, init: PromptInit, text: str | None = None, *, vocab_top: int = 5000,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """[P, d] initial prompt embeddings.

    vocab   embeddings of tokens sampled from the first `vocab_top` ids (Lester et al.: the 5,000 most common
            tokens; BPE ids roughly follow merge frequency), special tokens excluded
    text    embeddings of `text`, repeated or cut to P tokens (PEFT's TEXT init)
    random  normal with the standard deviation of the embedding table (PEFT's N(0, 1) is far off the table's scale)
    """
    table = view.embed_tokens.weight.detach()
    if init == "text":
        if not text:
            raise TokentuneError("init: text needs init_text", where="adapter.init_text",
                                 fix="give a task description, e.g. 'Classify the sentiment of this tweet:'")
        if view.tokenizer is None:
            raise TokentuneError("init: text needs the model's tokenizer, which this model view does not have",
                                 fix="attach through a tokentune session, or set view.tokenizer")
        ids = view.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise TokentuneError(f"init_text {text!r} tokenises to nothing", where="adapter.init_text")
        ids = (ids * (num_tokens // len(ids) + 1))[:num_tokens]
        return table[torch.tensor(ids, device=table.device)].clone()
    if init == "vocab":
        special = set(getattr(view.tokenizer, "all_special_ids", []) or []) if view.tokenizer is not None else set()
        pool = torch.tensor([i for i in range(min(vocab_top, table.shape[0])) if i not in special])
        pick = pool[torch.randint(len(pool), (num_tokens,), generator=generator)]
        return table[pick.to(table.device)].clone()
    if init == "random":
        return torch.randn(num_tokens, table.shape[1], generator=generator).to(table) * table.float().std()
    raise TokentuneError(f"unknown prompt init {init!r}", where="adapter.init", fix="use vocab, text or random")


class PromptEntry:
    """Installs a prompt (given by `embeds(kwargs) -> [1 or B, P, d]`) into a model; `enabled` toggles it."""

    def __init__(self, view, length: int, embeds: Callable[[dict], torch.Tensor]):
        self.view, self.length, self.embeds = view, length, embeds
        self._handles: list = []
        self.virtual = None
        if view.is_causal:
            self.virtual = VirtualTokens(view, length)
            self.virtual.before_forward = lambda kwargs: self.virtual.run_alone(self.embeds(kwargs))
            self.virtual.install()
        else:
            self._enabled = True
            backbone = view.backbone
            self._handles = [backbone.register_forward_pre_hook(self._insert, with_kwargs=True),
                             backbone.register_forward_hook(self._strip)]

    @property
    def enabled(self) -> bool:
        return self.virtual.enabled if self.virtual is not None else self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if self.virtual is not None:
            self.virtual.enabled = value
        else:
            self._enabled = value

    @property
    def positions(self) -> torch.Tensor | None:
        """Record-relative positions of the current forward (causal models)."""
        return self.virtual.positions if self.virtual is not None else None

    def remove(self) -> None:
        if self.virtual is not None:
            self.virtual.remove()
        for h in self._handles:
            h.remove()

    # --- encoders: insert after the first token ----------------------------------------------------
    def _insert(self, module, args, kwargs):
        if not self._enabled:
            return None
        kwargs = dict(kwargs)
        ids = kwargs.pop("input_ids", None)
        if ids is None and args:
            ids, args = args[0], args[1:]
        if ids is None:
            raise TokentuneError("an encoder prompt needs input_ids (inputs_embeds given)")
        if kwargs.get("position_ids") is not None:
            raise TokentuneError("an encoder prompt shifts positions itself; do not pass position_ids")
        words = self.view.embed_tokens(ids)
        prompt = self.embeds(kwargs).to(words.dtype)
        prompt = prompt.expand(words.shape[0], -1, -1) if prompt.shape[0] == 1 else prompt
        kwargs["inputs_embeds"] = torch.cat([words[:, :1], prompt, words[:, 1:]], 1)
        b, p = words.shape[0], self.length
        for key, fill in (("attention_mask", 1), ("token_type_ids", 0)):
            value = kwargs.get(key)
            if value is not None:
                kwargs[key] = torch.cat([value[:, :1], torch.full((b, p), fill, dtype=value.dtype, device=value.device),
                                         value[:, 1:]], 1)
        limit = getattr(self.view.model.config, "max_position_embeddings", None)
        if limit is not None and ids.shape[1] + p > limit:
            raise TokentuneError(f"{p} prompt tokens + {ids.shape[1]} input tokens exceed the model's {limit} positions",
                                 where="data.max_length", fix="shorten the inputs or the prompt")
        return args, kwargs

    def _strip(self, module, args, output):
        if not self._enabled:
            return None
        hidden = output.last_hidden_state
        output.last_hidden_state = torch.cat([hidden[:, :1], hidden[:, 1 + self.length:]], 1)
        return output


def own_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Register an adapter's new parameters inside the model (as `tokentune_<name>`), so that DDP syncs them,
    .to(device) moves them and model.parameters() counts them."""
    attr = f"tokentune_{name}"
    if hasattr(model, attr):
        raise TokentuneError(f"the model already carries an adapter module {attr!r}",
                             fix="attach one adapter of each kind per model")
    model.add_module(attr, module)
    return module


def freeze_base(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def task_head_params(view, train_head: bool | None) -> list[tuple[str, nn.Parameter]]:
    """A fresh task head (an encoder's classifier) must train; the causal LM head stays frozen.
    train_head None = train the task heads the model has."""
    if train_head is False:
        return []
    heads = view.task_heads
    if train_head and not heads:
        raise TokentuneError(f"train_head is true but {type(view.model).__name__} has no task head",
                             where="adapter.train_head", fix="remove train_head; the causal LM head stays frozen")
    params = [(f"{h}.{n}", p) for h, m in heads.items() for n, p in m.named_parameters()]
    for _, p in params:
        p.requires_grad_(True)
    return params


def refuse_merge(name: str, why: str) -> None:
    raise TokentuneError(f"{name} cannot be merged into the base weights: {why}",
                         fix="serve the base model with the adapter attached (tokentune generate / eval on the run), "
                             "or choose a mergeable adapter (lora, full, freeze)")
