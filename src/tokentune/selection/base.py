"""The selector protocol. A selector sees a micro-batch and the signals it declared (see signals.py) and
returns the batch it decides on: samples dropped (their weights set to 0; rows left without loss are
not computed at all), per-token `loss_weights` changed, inputs corrupted, or extra fields (e.g. per-layer
token plans) that the model or objective understands. Selectors run on training batches only."""

from __future__ import annotations

from typing import Protocol

import torch


class Selector(Protocol):
    name: str
    needs: set[str]  # signals it reads: "current", "history", "attention:L"

    def select(self, batch: dict, signals) -> dict: ...


def apply_selectors(selectors, batch: dict, signals) -> dict:
    for selector in selectors:
        batch = selector.select(batch, signals)
    return batch


def drop_empty_rows(batch: dict) -> dict:
    """Rows whose every weight is 0 are removed before the forward pass: a dropped sample costs nothing
    (in packed rows a sample shares its row, so only whole-row drops save compute). One row always stays
    so that every rank still joins the gradient reduction."""
    if "class_labels" in batch:
        return batch
    live = ((batch["loss_weights"] * (batch["labels"] != -100)).sum(1) > 0)
    if bool(live.all()):
        return batch
    if not bool(live.any()):
        live[0] = True
    rows = live.nonzero(as_tuple=True)[0]
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == live.shape[0] else v
            for k, v in batch.items()}
