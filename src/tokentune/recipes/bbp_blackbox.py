"""The black-box interface of black-box prompt learning, and one implementation over a local causal LM.

The learner sees a model only through `label_scores(queries, labels) -> [N, C]` (one score per query and label
string, higher = more likely) and a call counter (`calls`: queries scored so far, one call per query as an API
returning the log-probabilities of every label word). It never reads parameters or gradients.
"""

from __future__ import annotations

import contextlib
from typing import Protocol, runtime_checkable

import torch

from ..errors import TokentuneError


@runtime_checkable
class BlackBox(Protocol):
    calls: int

    def label_scores(self, queries: list[str], labels: list[str]) -> torch.Tensor:
        """[len(queries), len(labels)] scores of each label string as the continuation of each query."""


class LocalCausalLM:
    """A transformers/tokentune causal LM behind the black-box interface. A label's score is the log-likelihood of
    its tokens right after the query's (sum, or mean, of their log-probabilities), computed under torch.no_grad in
    batches of `batch_size` rows. Labels that are one token each cost one row per query (read at its last
    position); otherwise each (query, label) pair is its own row. The LM head is applied only where it is read."""

    def __init__(self, model, tokenizer, *, batch_size: int = 16, reduce: str = "sum", device=None,
                 autocast_bf16: bool = False):
        from ..models.anatomy import ModelView

        if reduce not in ("sum", "mean"):
            raise TokentuneError(f"unknown label score reduction {reduce!r}", where="recipe.label_score",
                                 fix="sum or mean")
        self._model, self._tokenizer, self._view = model, tokenizer, ModelView(model)
        if not self._view.is_causal:
            raise TokentuneError("the black box scores label words as continuations: it needs a causal LM",
                                 where="model.task", fix="use a causal model")
        self._batch_size, self._reduce = batch_size, reduce
        self._device = device or next(model.parameters()).device
        self._bf16 = autocast_bf16
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._max_positions = getattr(model.config, "max_position_embeddings", None)
        self._label_cache: dict[str, list[int]] = {}
        self.calls = 0

    @classmethod
    def from_config(cls, model_cfg, *, device, batch_size: int = 16, reduce: str = "sum") -> "LocalCausalLM":
        from ..models.loading import load_model

        if model_cfg.task != "causal":
            raise TokentuneError("the black box must be a causal LM", where="model.task", fix="set model.task: causal")
        loaded = load_model(model_cfg, device=device)
        loaded.model.eval()
        bf16 = torch.device(device).type == "cuda" and model_cfg.precision in ("auto", "bf16")
        return cls(loaded.model, loaded.tokenizer, batch_size=batch_size, reduce=reduce, device=device,
                   autocast_bf16=bf16)

    def vocabulary(self) -> list[str]:
        """Every token of the vocabulary as text (for vocabulary candidates), in id order."""
        return [self._tokenizer.decode([i]) for i in range(len(self._tokenizer))]

    def _label_ids(self, label: str) -> list[int]:
        if label not in self._label_cache:
            ids = self._tokenizer(label, add_special_tokens=False)["input_ids"]
            if not ids:
                raise TokentuneError(f"the label {label!r} has no tokens", where="recipe.label_words")
            self._label_cache[label] = ids
        return self._label_cache[label]

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self._bf16 else contextlib.nullcontext()

    @torch.no_grad()
    def label_scores(self, queries: list[str], labels: list[str]) -> torch.Tensor:
        self.calls += len(queries)
        labels_ids = [self._label_ids(label) for label in labels]
        query_ids = self._tokenizer(list(queries))["input_ids"]
        longest = max(len(q) for q in query_ids) + max(len(t) for t in labels_ids) - 1
        if self._max_positions and longest > self._max_positions:
            raise TokentuneError(f"an assembled query has {longest} tokens; the model reads at most "
                                 f"{self._max_positions}", where="recipe",
                                 fix="set recipe.max_text_words, or lower num_demos / prompt_length")
        if all(len(t) == 1 for t in labels_ids):
            # One row per query: every label's only token is read at the query's last position.
            first = torch.tensor([t[0] for t in labels_ids], device=self._device)
            rows = [(q, [(len(q) - 1, first)]) for q in query_ids]
            return self._run(rows).reshape(len(queries), len(labels))  # one token each: sum = mean
        # One row per (query, label): query + label[:-1]; positions len(q)-1 .. predict the label's tokens.
        rows = []
        for q in query_ids:
            for t in labels_ids:
                targets = torch.tensor(t, device=self._device)
                rows.append((q + t[:-1], [(len(q) - 1 + j, targets[j:j + 1]) for j in range(len(t))]))
        per_token = self._run(rows).tolist()
        lengths = [len(t) for t in labels_ids] * len(queries)
        scores, at = [], 0
        for n in lengths:
            total = sum(per_token[at:at + n])
            scores.append(total / n if self._reduce == "mean" else total)
            at += n
        return torch.tensor(scores, dtype=torch.float32).reshape(len(queries), len(labels))

    def _run(self, rows: list[tuple[list[int], list]]) -> torch.Tensor:
        """Log-probabilities of each row's targets: rows = (ids, [(position, target ids)]), flattened in row order.
        Rows are batched sorted by length (less padding); the LM head runs once per batch, on the read positions."""
        from ..objectives.base import backbone_hidden

        order = sorted(range(len(rows)), key=lambda r: len(rows[r][0]))
        results: list = [None] * len(rows)
        head = self._view.lm_head
        for s in range(0, len(order), self._batch_size):
            chunk = order[s:s + self._batch_size]
            batch = _right_padded([rows[r][0] for r in chunk], self._pad, self._device)
            where = [(b, position) for b, r in enumerate(chunk) for position, _ in rows[r][1]]
            with self._autocast():
                hidden = backbone_hidden(self._view, batch)
                picked = hidden[[b for b, _ in where], [p for _, p in where]]
                logp = torch.log_softmax(head(picked).float(), -1)
            at = 0
            for r in chunk:
                values = []
                for _, targets in rows[r][1]:
                    values.append(logp[at, targets].cpu())
                    at += 1
                results[r] = torch.cat(values)
        return torch.cat(results)


def _right_padded(rows: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """A causal batch (no labels): the padding is its own segment, with positions restarting at 0 (as collate)."""
    width = max(len(r) for r in rows)
    ids = [r + [pad_id] * (width - len(r)) for r in rows]
    positions = [list(range(len(r))) + list(range(width - len(r))) for r in rows]
    mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    return {"input_ids": torch.tensor(ids, device=device), "position_ids": torch.tensor(positions, device=device),
            "attention_mask": torch.tensor(mask, device=device)}
