"""What decomposed prompt methods (DePT, EPT) share: a position-indexed low-rank offset on the frozen input word
embeddings, the record-length check it needs, and saving/loading the adapter's tensors.

The token at record-relative position i gets row i of `scale · A @ B` (A ∈ R^{s×r}, B ∈ R^{r×d}) added to its
word embedding, whatever the token is. Positions are the record's own: on causal models the virtual tokens'
`positions` (they restart in every packed record and ignore the soft prompt's shift); on encoders 0..T-1 of
the input before the prompt is inserted after [CLS]. The soft prompt itself never passes through the word
embedding, so it is never offset.

Positions past s (the reference code pads/truncates every input to exactly s, so it never sees one):
  error  a TokentuneError (default: the table has no row for them)
  zero   they get no offset (an extension; lets generation run past s)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..errors import TokentuneError
from .state_io import copy_state, read_tensors, tensor_state, write_tensors

Beyond = Literal["error", "zero"]


class LowRankOffset(nn.Module):
    """A [s, r], B [r, d]; `table()` = scale · A @ B, one row per position."""

    def __init__(self, length: int, rank: int, width: int, scale: float):
        super().__init__()
        self.scale = float(scale)
        self.lora_embedding_A = nn.Parameter(torch.empty(length, rank))
        self.lora_embedding_B = nn.Parameter(torch.zeros(rank, width))
        # the reference's init, on A as stored ([s, r]: fan-in r); B = 0 so training starts from the prompt alone
        nn.init.kaiming_uniform_(self.lora_embedding_A, a=math.sqrt(5))

    @property
    def length(self) -> int:
        return self.lora_embedding_A.shape[0]

    def table(self) -> torch.Tensor:
        return self.scale * (self.lora_embedding_A @ self.lora_embedding_B)


class OffsetHook:
    """Adds `offset.table()` rows to the output of the word embedding, by position, while `entry` is enabled."""

    def __init__(self, view, entry, offset: LowRankOffset, beyond: Beyond, name: str):
        self.view, self.entry, self.offset, self.beyond, self.name = view, entry, offset, beyond, name
        self._handle = view.embed_tokens.register_forward_hook(self._hook)

    def remove(self) -> None:
        self._handle.remove()

    def positions(self, ids: torch.Tensor) -> torch.Tensor | None:
        if self.view.is_causal:
            return self.entry.positions  # None outside a backbone forward: not an input embedding, no offset
        return torch.arange(ids.shape[-1], device=ids.device).unsqueeze(0)

    def _hook(self, module, args, output):
        if not self.entry.enabled:
            return None
        pos = self.positions(args[0])
        if pos is None:
            return None
        return output + self.rows(pos).to(output.dtype)

    def rows(self, pos: torch.Tensor) -> torch.Tensor:
        """[.., T, d] offset rows for positions `pos` [.., T]."""
        table, s = self.offset.table(), self.offset.length
        pos = pos.clamp_min(0)  # left padding may carry negative positions; those tokens are masked anyway
        if self.beyond == "zero":
            table = torch.cat([table, table.new_zeros(1, table.shape[1])])
            return table[pos.clamp_max(s)]
        longest = int(pos.max()) + 1 if pos.numel() else 0
        if longest > s:
            raise TokentuneError(
                f"{self.name}: a record reaches position {longest - 1} but the offset table has max_length={s} rows",
                where="adapter.max_length",
                fix=f"set adapter.max_length >= {longest} (and data.max_length to match), shorten the inputs / "
                    "max_new_tokens, or set adapter.beyond: zero (no offset past max_length)")
        return table[pos]


def check_record_lengths(splits, length: int, beyond: Beyond, name: str):
    """At data time: with beyond=error every tokenised record must fit the offset table."""
    if beyond != "error":
        return splits
    for part in (splits.train, splits.eval or []):
        longest = max(part, key=len, default=None)
        if longest is not None and len(longest) > length:
            raise TokentuneError(
                f"{name}: record {longest.source} has {len(longest)} tokens but the offset table covers "
                f"max_length={length} positions",
                where=longest.source,
                fix=f"set data.max_length={length} (records are truncated to it), raise adapter.max_length, "
                    "or set adapter.beyond: zero")
    return splits


# --- the artefact: tensors (safetensors) + the config they were trained with -------------------------------

META = "tokentune_adapter.json"


def save_tensors(out_dir: Path, weights: str, params, config, base_ref: str) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tensors(out_dir / weights, tensor_state(params))
    (out_dir / META).write_text(json.dumps({"adapter": config.model_dump(), "base_model": base_ref}, indent=1))


def load_tensors(in_dir: Path, weights: str, params, config, keys: tuple[str, ...]) -> None:
    """Read what save_tensors wrote; config `keys` that change the tensors' shapes or meaning must match."""
    meta_path = Path(in_dir) / META
    if meta_path.is_file():
        saved = json.loads(meta_path.read_text()).get("adapter", {})
        if saved.get("name") not in (None, config.name):
            raise TokentuneError(f"{in_dir} holds a {saved.get('name')!r} adapter, not {config.name!r}",
                                 where=str(meta_path), fix="load it with the adapter that wrote it")
        differ = {k: saved[k] for k in keys if k in saved and saved[k] != getattr(config, k)}
        if differ:
            raise TokentuneError(f"the {config.name} adapter was trained with {differ}", where=str(meta_path),
                                 fix="set " + " ".join(f"adapter.{k}={v}" for k, v in differ.items()))
    copy_state(params, read_tensors(Path(in_dir) / weights), source=str(in_dir))
