"""The two contrast models of cDPO (a positive run trained on correct solutions, a negative run on incorrect
ones), loaded from their tokentune run directories, frozen and in eval mode.

When both runs have the same model and adapter config (the usual case: two LoRA runs of one base), the base
is loaded once: the positive run's trainable tensors are live in the model and the negative run's are kept
beside them, swapped in by pointer for the negative forward. Memory is then one base plus two adapter states
instead of two whole models, and a swap copies nothing."""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import TokentuneError


@dataclass
class ContrastSide:
    model: torch.nn.Module
    view: object
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


class StateSwap:
    """Exchanges the live tensors of `params` with `other` (same shapes) by swapping `.data`: no copies."""

    def __init__(self, params: list[torch.nn.Parameter], other: list[torch.Tensor]):
        self.params, self.other = params, other

    def _swap(self) -> None:
        for i, p in enumerate(self.params):
            p.data, self.other[i] = self.other[i], p.data

    @contextmanager
    def swapped(self):
        self._swap()
        try:
            yield
        finally:
            self._swap()


class ContrastPair:
    """`side("positive")` / `side("negative")` give (model, view, autocast) ready for a no-grad forward."""

    def __init__(self, positive: ContrastSide, negative: ContrastSide | None = None, *,
                 swap: StateSwap | None = None, tokenizer=None):
        if (negative is None) == (swap is None):
            raise ValueError("give either a separate negative side or a state swap on the positive one")
        self.positive, self.negative = positive, negative or positive
        self.swap, self.tokenizer = swap, tokenizer
        self.shared = swap is not None

    @contextmanager
    def side(self, which: str):
        if which == "positive":
            yield self.positive
        elif self.swap is not None:
            with self.swap.swapped():
                yield self.negative
        else:
            yield self.negative

    def vocab_size(self) -> int:
        """Width of the LM head; both sides must agree (their logits are combined per position)."""
        sizes = {_head_width(s.view) for s in (self.positive, self.negative)}
        if len(sizes) != 1:
            raise TokentuneError(f"the positive and negative models have LM heads of different widths {sorted(sizes)}",
                                 where="selectors.critical_tokens", fix="train both contrast runs from the same base model")
        return sizes.pop()


def _head_width(view) -> int:
    head = view.lm_head
    return int(getattr(head, "out_features", None) or head.weight.shape[0])


def contrast_run_config(run_dir: Path, which: str):
    from ..engine.session import run_config

    if not Path(run_dir).is_dir():
        raise TokentuneError(f"the {which} contrast run {str(run_dir)!r} is not a directory",
                             where=f"critical_tokens.{which}", fix="pass the output_dir of a finished tokentune run")
    cfg = run_config(Path(run_dir))
    if cfg.model.task != "causal":
        raise TokentuneError(f"the {which} contrast run {run_dir} is a {cfg.model.task} model; cDPO needs causal LMs",
                             where=f"critical_tokens.{which}")
    # The contrast run's own selectors (if any) play no part in scoring; building them could even recurse.
    return cfg.model_copy(update={"selectors": []})


def _trainable(adapter) -> list[torch.nn.Parameter]:
    seen, out = set(), []
    for group in adapter.param_groups():
        for _, p in group.params:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def load_contrast_pair(positive: Path, negative: Path, env, *, share_base: bool = True) -> ContrastPair:
    """Both runs loaded on env.device. The global RNG is left as it was (building a session re-seeds it)."""
    from ..engine.session import _load_trained, build_session

    positive, negative = Path(positive), Path(negative)
    cfg_p, cfg_n = contrast_run_config(positive, "positive"), contrast_run_config(negative, "negative")
    devices = [env.device] if env.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        pos = build_session(cfg_p, env, with_data=False, trained_from=positive)
        pos_side = ContrastSide(pos.model, pos.view, pos.autocast)
        if share_base and cfg_p.model == cfg_n.model and cfg_p.adapter == cfg_n.adapter:
            params = _trainable(pos.adapter)
            live = [p.detach().clone() for p in params]
            _load_trained(pos.adapter, pos.objective, negative, env.device)  # the negative state into the live tensors
            other = [p.data for p in params]
            for p, value in zip(params, live):
                p.data = value
            pair = ContrastPair(pos_side, swap=StateSwap(params, other), tokenizer=pos.tokenizer)
        else:
            neg = build_session(cfg_n, env, with_data=False, trained_from=negative)
            check_same_vocab(pos.tokenizer, neg.tokenizer, f"{positive} vs {negative}")
            pair = ContrastPair(pos_side, ContrastSide(neg.model, neg.view, neg.autocast), tokenizer=pos.tokenizer)
    for side in (pair.positive, pair.negative):
        side.model.eval()
        side.model.requires_grad_(False)
    pair.vocab_size()
    return pair


def check_same_vocab(tokenizer, other, where: str) -> None:
    """Scores index the contrast models' logits with the training data's token ids: the vocabularies must be
    the same mapping, not just the same size."""
    if tokenizer.get_vocab() != other.get_vocab():
        raise TokentuneError("the contrast models' tokenizer vocabulary differs from the one the data is tokenised with",
                             where=where, fix="train the positive and negative runs from the same base model "
                                              "(same tokenizer) as the model being trained")
