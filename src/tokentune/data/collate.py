"""Rows (packed or not) -> the Batch dict of tensors (see DESIGN.md, "Batch")."""

from __future__ import annotations

import torch

from ..errors import TokentuneError
from .example import IGNORE, Example, PreferencePair
from .packing import PackedRow


def collate(items: list[PackedRow] | list[Example], pad_id: int | None, *, packed: bool) -> dict[str, torch.Tensor]:
    """Right-pads to the longest row. Padding restarts its position ids at 0, so transformers sees it as
    a segment of its own when it builds the block-diagonal mask from position ids (attention_mask=None)."""
    if pad_id is None:
        raise TokentuneError("the tokenizer has no pad token id to pad batches with",
                             fix="give the tokenizer a pad token (or an EOS token, which is used instead)")
    if not items:
        raise ValueError("collate needs at least one row")
    if isinstance(items[0], PreferencePair):  # two rows per pair, with is_chosen / pair_index (preference.py)
        from .preference import collate_pairs

        return collate_pairs(items, pad_id, packed=packed)
    kind = PackedRow if packed else Example
    if not all(isinstance(item, kind) for item in items):
        raise TypeError(f"collate(packed={packed}) takes {kind.__name__} items")
    width = max(len(item.input_ids) for item in items)
    ids, labels, positions, samples, mask, seq_lens, weights = [], [], [], [], [], [], []
    for item in items:
        n, pad = len(item.input_ids), width - len(item.input_ids)
        if packed:
            pos, sample, lens = item.position_ids, item.sample_index, item.seq_lens
        else:
            pos, sample, lens = list(range(n)), [item.index] * n, [n]
        ids.append(list(item.input_ids) + [pad_id] * pad)
        labels.append(list(item.labels) + [IGNORE] * pad)
        positions.append(list(pos) + list(range(pad)))
        samples.append(list(sample) + [-1] * pad)
        mask.append([1] * n + [0] * pad)
        seq_lens.append(list(lens))
        weights.append(list(item.weights or [1.0] * n) + [0.0] * pad)  # Example: None; PackedRow: filled by add()
    most = max(len(lens) for lens in seq_lens)
    batch = {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(positions, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
        "sample_index": torch.tensor(samples, dtype=torch.long),
        "num_segments": torch.tensor([len(lens) for lens in seq_lens], dtype=torch.long),
        "seq_lens": torch.tensor([lens + [0] * (most - len(lens)) for lens in seq_lens], dtype=torch.long),
    }
    # An example's own weights (e.g. TL-Training's key tokens) where it has them; 1.0 on every label token otherwise.
    batch["loss_weights"] = torch.tensor(weights, dtype=torch.float32) * (batch["labels"] != IGNORE)
    if not packed:
        class_labels = [item.class_label for item in items]
        if all(c is not None for c in class_labels):
            multi = [isinstance(c, list) for c in class_labels]
            if any(multi) and not all(multi):
                raise ValueError("a batch mixes single-label and multi-label examples")
            # multi-label: [B, L] multi-hot floats; single-label: [B] class ids
            batch["class_labels"] = torch.tensor(class_labels, dtype=torch.float32 if all(multi) else torch.long)
        elif any(c is not None for c in class_labels):
            raise ValueError("a batch mixes classification and causal examples")
    return batch
