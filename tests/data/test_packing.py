import pytest
import torch
from transformers.masking_utils import find_packed_sequence_indices

from tokentune.data import DataConfig, Example, collate, pack, packing_enabled
from tokentune.errors import TokentuneError

IGNORE = -100


def example(index, n, start=10):
    ids = list(range(start, start + n))
    return Example(ids, [IGNORE, *ids[1:]], f"train.jsonl:{index + 1}", index)


def test_greedy_in_order_whole_examples():
    examples = [example(0, 4), example(1, 4, 20), example(2, 3, 30), example(3, 2, 40)]
    rows = pack(examples, 7)
    # Greedy in order: example 2 does not go back into row 0 (first-fit would put it there).
    assert [r.seq_lens for r in rows] == [[4], [4, 3], [2]]
    assert rows[1].input_ids == [20, 21, 22, 23, 30, 31, 32]
    assert rows[1].labels == [IGNORE, 21, 22, 23, IGNORE, 31, 32]
    assert rows[1].position_ids == [0, 1, 2, 3, 0, 1, 2]
    assert rows[1].sample_index == [1, 1, 1, 1, 2, 2, 2]
    assert pack(examples, 7) == rows  # deterministic


def test_example_longer_than_max_length_is_refused():
    with pytest.raises(ValueError, match="max_length"):
        pack([example(0, 5)], 4)


def test_collate_packed_rows_pad_as_their_own_segment():
    rows = pack([example(0, 4), example(1, 4, 20), example(2, 3, 30), example(3, 2, 40)], 7)
    batch = collate(rows, 0, packed=True)
    assert batch["input_ids"].shape == (3, 7)
    assert batch["input_ids"][2].tolist() == [40, 41, 0, 0, 0, 0, 0]
    assert batch["labels"][2].tolist() == [IGNORE, 41] + [IGNORE] * 5
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4]]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert batch["sample_index"][0].tolist() == [0, 0, 0, 0, -1, -1, -1]
    assert batch["loss_weights"].dtype == torch.float32
    assert batch["loss_weights"].tolist()[1] == [0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert batch["num_segments"].tolist() == [1, 2, 1] and batch["seq_lens"].tolist() == [[4, 0], [4, 3], [2, 0]]
    # transformers reads the same segments from the position ids: padding never joins a record.
    assert find_packed_sequence_indices(batch["position_ids"]).tolist() == [
        [0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]]


def test_collate_unpacked_and_class_labels():
    a, b = example(0, 3), example(1, 1, 20)
    a.class_label, b.class_label = 1, 0
    batch = collate([a, b], 0, packed=False)
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["sample_index"].tolist() == [[0, 0, 0], [1, -1, -1]]
    assert batch["class_labels"].tolist() == [1, 0]
    assert "class_labels" not in collate([example(0, 2)], 0, packed=False)


def test_collate_refuses_wrong_rows_and_missing_pad():
    with pytest.raises(TypeError):
        collate([example(0, 2)], 0, packed=True)
    with pytest.raises(TokentuneError, match="pad"):
        collate([example(0, 2)], None, packed=False)


def test_packed_row_matches_examples_run_alone(tiny_llama):
    """The engine calls the model with position ids, no mask and no cache (transformers detects packing only
    then): each packed record must see only itself."""
    examples = [example(0, 5, 3), example(1, 3, 40), example(2, 4, 80)]
    batch = collate(pack(examples, 16), 0, packed=True)
    with torch.no_grad():
        packed = tiny_llama(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                            use_cache=False).logits[0]
        start = 0
        for ex in examples:
            alone = tiny_llama(input_ids=torch.tensor([ex.input_ids])).logits[0]
            torch.testing.assert_close(packed[start:start + len(ex)], alone, atol=1e-5, rtol=1e-4)
            start += len(ex)


def test_packing_default_and_classification():
    cfg = DataConfig(train="x.jsonl")
    assert packing_enabled(cfg, "causal") and not packing_enabled(cfg, "classification")
    assert not packing_enabled(DataConfig(train="x.jsonl", packing=False), "causal")
    with pytest.raises(TokentuneError, match="data.packing"):
        packing_enabled(DataConfig(train="x.jsonl", packing=True), "classification")
