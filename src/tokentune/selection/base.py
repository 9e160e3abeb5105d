"""The selector protocol. A selector sees a micro-batch (and the run, for signals it asks for) and
returns the batch it decides on: samples dropped, per-token `loss_weights` changed, inputs corrupted,
or extra fields (e.g. per-layer token plans) that the model or objective understands."""

from __future__ import annotations

from typing import Protocol


class Selector(Protocol):
    name: str

    def select(self, batch: dict, session) -> dict: ...


def apply_selectors(selectors, batch: dict, session) -> dict:
    for selector in selectors:
        batch = selector.select(batch, session)
    return batch
