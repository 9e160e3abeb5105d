"""multilabel_bce against hand computations: pos_weight w_c = max n / n_c from the training records, the loss as the
BCE formula written out (and torch's BCEWithLogitsLoss), sample weights, micro/macro-F1 at 0.5; and the data layer
that feeds it (lists of labels -> multi-hot class_labels; single-label data unchanged)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from tokentune.data.collate import collate
from tokentune.data.config import DataConfig
from tokentune.data.pipeline import build_data
from tokentune.errors import TokentuneError
from tokentune.objectives.cross_entropy import CrossEntropy, CrossEntropyConfig
from tokentune.objectives.multilabel_bce import MultilabelBce, MultilabelBceConfig, f1_scores
from tokentune.probes.evaluation import loss_metrics


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are given: the loss is then checked on its own."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.config = SimpleNamespace(pad_token_id=0)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.logits[:input_ids.shape[0]])


ENCODER = SimpleNamespace(is_causal=False, is_encoder=True)


@pytest.fixture(scope="module")
def tok():
    from tokentune.models.loading import load_tokenizer, resolve_ref

    return load_tokenizer(resolve_ref("builtin:tiny-llama"))


def _write(tmp_path, name, records):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


TRAIN = [{"text": "one", "labels": ["a", "b"]}, {"text": "two", "labels": ["a"]},
         {"text": "three", "labels": ["a", "c"]}, {"text": "four", "labels": []},
         {"text": "five", "labels": ["c", "a", "a"]}]  # n = (a 4, b 1, c 2); a repeat counts once


def _splits(tmp_path, tok, train=TRAIN, evals=None):
    cfg = DataConfig(train=_write(tmp_path, "train.jsonl", train),
                     eval=_write(tmp_path, "eval.jsonl", evals) if evals else None)
    return build_data(cfg, tok, task="classification", seed=0)


def test_lists_of_labels_become_multi_hot_class_labels(tmp_path, tok):
    splits = _splits(tmp_path, tok, evals=[{"text": "x", "label": "b"}, {"text": "y", "labels": ["c", "b"]}])
    assert splits.format == "classification" and splits.label_names == ["a", "b", "c"]
    assert [e.class_label for e in splits.train] == [[1, 1, 0], [1, 0, 0], [1, 0, 1], [0, 0, 0], [1, 0, 1]]
    assert [e.class_label for e in splits.eval] == [[0, 1, 0], [0, 1, 1]]  # a lone label is a one-element list
    batch = collate(splits.train[:3], tok.pad_token_id, packed=False)
    assert batch["class_labels"].dtype == torch.float32
    assert batch["class_labels"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 0, 1]]


def test_single_label_data_is_unchanged_and_refuses_lists_in_eval(tmp_path, tok):
    splits = _splits(tmp_path, tok, train=[{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    assert [e.class_label for e in splits.train] == [1, 0]
    assert collate(splits.train, tok.pad_token_id, packed=False)["class_labels"].dtype == torch.long
    with pytest.raises(TokentuneError, match="single-label"):
        _splits(tmp_path, tok, train=[{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}],
                evals=[{"text": "c", "label": ["pos", "neg"]}])


def test_pos_weight_is_max_count_over_each_count(tmp_path, tok):
    objective = MultilabelBce()
    objective.prepare_data(_splits(tmp_path, tok), None, tok, is_main=True)
    assert objective.counts.tolist() == [4, 1, 2]
    assert objective.pos_weight.tolist() == [1.0, 4.0, 2.0]


def test_loss_equals_the_written_out_formula_and_torch_bce_with_pos_weight():
    logits = torch.tensor([[0.3, -1.2, 2.0], [-0.5, 0.8, 0.1], [1.5, -0.2, -2.2]])
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    w = [1.0, 4.0, 2.0]
    objective = MultilabelBce(MultilabelBceConfig(pos_weight=w))
    batch = {"input_ids": torch.ones(3, 2, dtype=torch.long), "attention_mask": torch.ones(3, 2, dtype=torch.long),
             "class_labels": y}
    out = objective(FixedLogits(logits), ENCODER, batch)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    by_hand = [-(w[c] * y[i, c].item() * math.log(sig(logits[i, c].item()))
                 + (1 - y[i, c].item()) * math.log(1 - sig(logits[i, c].item())))
               for i in range(3) for c in range(3)]
    expected = sum(by_hand) / 9  # mean over records and labels
    assert float(out.loss_sum / out.weight_sum) == pytest.approx(expected, rel=1e-6)
    torch_loss = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(w))(logits, y)
    assert float(out.loss_sum / out.weight_sum) == pytest.approx(float(torch_loss), rel=1e-6)
    assert float(objective.weight_total(batch)) == 3.0


def test_sample_weights_scale_each_record():
    logits = torch.tensor([[0.3, -1.2], [-0.5, 0.8]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    objective = MultilabelBce(MultilabelBceConfig(pos_weight="none"))
    batch = {"input_ids": torch.ones(2, 2, dtype=torch.long), "attention_mask": torch.ones(2, 2, dtype=torch.long),
             "class_labels": y, "sample_weights": torch.tensor([2.0, 0.0])}
    out = objective(FixedLogits(logits), ENCODER, batch)
    first = torch.nn.functional.binary_cross_entropy_with_logits(logits[0], y[0])
    assert float(out.loss_sum) == pytest.approx(2 * float(first), rel=1e-6)
    assert float(out.weight_sum) == 2.0 == float(objective.weight_total(batch))
    assert out.metrics["tp"].tolist() == [1.0, 0.0]  # the zero-weight record is not counted


def test_single_label_ids_are_one_hot_targets(tmp_path, tok):
    splits = _splits(tmp_path, tok, train=[{"text": "a", "label": "x"}, {"text": "b", "label": "y"},
                                           {"text": "c", "label": "y"}])
    objective = MultilabelBce()
    objective.prepare_data(splits, None, tok, is_main=True)
    assert objective.pos_weight.tolist() == [2.0, 1.0]
    logits = torch.tensor([[0.2, -0.4], [1.0, 0.5]])
    batch = {"input_ids": torch.ones(2, 1, dtype=torch.long), "attention_mask": torch.ones(2, 1, dtype=torch.long),
             "class_labels": torch.tensor([0, 1])}
    out = objective(FixedLogits(logits), ENCODER, batch)
    ref = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0, 1.0]))(logits, torch.tensor([[1.0, 0], [0, 1.0]]))
    assert float(out.loss_sum / out.weight_sum) == pytest.approx(float(ref), rel=1e-6)


def test_f1_by_hand():
    # label 0: tp 2 fp 1 fn 0 -> F1 4/5; label 1: tp 0 fp 0 fn 1 -> 0; label 2: nothing anywhere -> 0
    tp, fp, fn = torch.tensor([2.0, 0, 0]), torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0])
    micro, macro = f1_scores(tp, fp, fn)
    assert micro == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert macro == pytest.approx((4 / 5 + 0 + 0) / 3)


def test_evaluation_reports_micro_and_macro_f1_at_half():
    logits = torch.tensor([[2.0, -1.0], [0.1, 0.3], [-3.0, -0.1], [0.5, 2.0]])  # sigmoid >= 0.5 <=> logit >= 0
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    model = FixedLogits(logits)
    objective = MultilabelBce(MultilabelBceConfig(pos_weight="none"))

    def batches():  # two batches: the counts are summed before F1
        for rows in (slice(0, 3), slice(3, 4)):
            n = rows.stop - rows.start
            model.logits = logits[rows]
            yield {"input_ids": torch.ones(n, 1, dtype=torch.long),
                   "attention_mask": torch.ones(n, 1, dtype=torch.long), "class_labels": y[rows]}

    decoder = SimpleNamespace(is_causal=True, is_encoder=False)
    from contextlib import nullcontext
    result = loss_metrics(model, decoder, objective, batches(), chunk_size=8, autocast=nullcontext)
    # predicted: [1,0] [1,1] [0,0] [1,1]; label 0: tp 2 fp 1 fn 1; label 1: tp 2 fp 0 fn 0
    assert result["eval/micro_f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 1))
    assert result["eval/macro_f1"] == pytest.approx((4 / 6 + 1.0) / 2)
    assert "eval/ppl" not in result and "eval/accuracy" not in result


def test_decoder_record_ending_in_the_pad_token_is_refused():
    from tests.adapters.test_ptec import classifier

    model = classifier("llama")  # pad id 0
    view = SimpleNamespace(is_causal=True, is_encoder=False)
    objective = MultilabelBce(MultilabelBceConfig(pos_weight="none"))
    x = torch.tensor([[5, 6, 0, 0], [7, 8, 9, 0]])  # row 0 is [5, 6, <pad>] with the pad id as its own last token
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    batch = {"input_ids": x, "attention_mask": mask, "class_labels": torch.zeros(2, 3)}
    with pytest.raises(TokentuneError, match="pad token"):
        objective(model, view, batch)
    batch["attention_mask"] = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    assert torch.isfinite(objective(model, view, batch).loss_sum)


def test_config_errors():
    batch = {"input_ids": torch.ones(1, 1, dtype=torch.long), "attention_mask": torch.ones(1, 1, dtype=torch.long),
             "class_labels": torch.ones(1, 2)}
    with pytest.raises(TokentuneError, match="prepare_data"):
        MultilabelBce()(FixedLogits(torch.zeros(1, 2)), ENCODER, batch)
    with pytest.raises(TokentuneError, match="3 entries"):
        MultilabelBce(MultilabelBceConfig(pos_weight=[1.0, 2.0, 3.0]))(FixedLogits(torch.zeros(1, 2)), ENCODER, batch)
    with pytest.raises(TokentuneError, match="multilabel_bce"):
        CrossEntropy(CrossEntropyConfig())._classification(FixedLogits(torch.zeros(1, 2)), batch)
