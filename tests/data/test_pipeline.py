import pytest
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from tokentune.data import DataConfig, build_data, split_off
from tokentune.data.records import Record
from tokentune.errors import TokentuneError


def build(tok, task="causal", seed=0, **kw):
    return build_data(DataConfig(**kw), tok, task=task, seed=seed)


def test_drop_counts_and_lists_every_bad_record(chat_tok, write_jsonl):
    rows = [{"prompt": "Hi", "completion": " yes"}, {"prompt": "Hi"}, {"prompt": 3, "completion": "x"},
            {"prompt": "Hello there! How are you today?", "completion": " fine"}, {"prompt": "Hi", "completion": " ok"}]
    path = write_jsonl(rows)
    splits = build(chat_tok, train=path, on_bad_record="drop", max_length=6)
    s = splits.summary.splits["train"]
    assert (s.records, s.examples, s.dropped) == (5, 2, 3)
    assert [src.split(": ")[0] for src in s.dropped_sources] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert "missing field 'completion'" in s.dropped_sources[0]
    assert "must be a string" in s.dropped_sources[1] and "after truncation" in s.dropped_sources[2]
    assert [e.source for e in splits.train] == [f"{path}:1", f"{path}:5"]
    assert [e.index for e in splits.train] == [0, 1]  # dense, so a per-sample table can be indexed by it
    assert splits.summary.to_dict()["train"]["dropped"] == 3


def test_drop_listing_is_capped(chat_tok, write_jsonl):
    rows = [{"text": "ok"}] + [{"text": 1}] * 25
    s = build(chat_tok, train=write_jsonl(rows), on_bad_record="drop").summary.to_dict()["train"]
    assert s["dropped"] == 25 and len(s["dropped_sources"]) == 20 and s["dropped_unlisted"] == 5


def test_all_dropped_is_an_error(chat_tok, write_jsonl):
    with pytest.raises(TokentuneError, match="no usable records"):
        build(chat_tok, train=write_jsonl([{"text": 1}, {"text": 2}]), on_bad_record="drop")


def test_summary_counts_tokens_and_renders(chat_tok, write_jsonl):
    splits = build(chat_tok, train=write_jsonl([{"prompt": "Hi", "completion": " yes"}] * 3), eval_fraction=0.34)
    d = splits.summary.to_dict()
    train = splits.train
    assert d["format"] == "prompt_completion" and d["train"]["examples"] == 2 and d["eval"]["examples"] == 1
    assert d["train"]["tokens"] == sum(len(e.input_ids) for e in train)
    assert d["train"]["loss_tokens"] == sum(sum(x != -100 for x in e.labels) for e in train)
    table = splits.summary.render()
    assert isinstance(table, Table)
    console = Console(record=True, width=100)
    console.print(table)
    assert "loss tokens" in console.export_text()


def test_eval_fraction_is_deterministic_by_seed(chat_tok, write_jsonl):
    path = write_jsonl([{"text": f"record {i}"} for i in range(20)])
    a = build(chat_tok, train=path, eval_fraction=0.25, seed=1)
    b = build(chat_tok, train=path, eval_fraction=0.25, seed=1)
    c = build(chat_tok, train=path, eval_fraction=0.25, seed=2)
    sources = lambda s: [e.source for e in s.eval]  # noqa: E731
    assert len(a.eval) == 5 and len(a.train) == 15 and sources(a) == sources(b) != sources(c)
    assert not set(sources(a)) & {e.source for e in a.train}


def test_split_off_takes_the_first_of_a_seeded_shuffle():
    import random

    records = [Record({"text": str(i)}, f"f:{i}") for i in range(10)]
    order = list(range(10))
    random.Random(7).shuffle(order)
    train, evals = split_off(records, 0.3, 7)
    assert {r.source for r in evals} == {f"f:{i}" for i in order[:3]}
    assert len(train) == 7


def test_eval_fraction_that_leaves_no_train(chat_tok, write_jsonl):
    with pytest.raises(TokentuneError, match="eval_fraction"):
        build(chat_tok, train=write_jsonl([{"text": "a"}]), eval_fraction=0.5)


def test_eval_and_eval_fraction_together_is_an_error():
    with pytest.raises(ValidationError, match="not both"):
        DataConfig(train="a.jsonl", eval="b.jsonl", eval_fraction=0.1)


def test_max_records_per_file(chat_tok, write_jsonl):
    train = write_jsonl([{"text": f"t{i}"} for i in range(10)])
    evals = write_jsonl([{"text": f"e{i}"} for i in range(10)], "eval.jsonl")
    splits = build(chat_tok, train=train, eval=evals, max_records=3)
    assert len(splits.train) == 3 and len(splits.eval) == 3


def test_eval_file_uses_the_same_format(chat_tok, write_jsonl):
    train = write_jsonl([{"prompt": "a", "completion": "b"}])
    evals = write_jsonl([{"text": "a"}], "eval.jsonl")
    with pytest.raises(TokentuneError) as err:
        build(chat_tok, train=train, eval=evals)
    assert f"{evals}:1" in str(err.value) and "missing field 'prompt'" in str(err.value)


def test_csv_latin1_classification(chat_tok, tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_bytes("review,sentiment\ncaf\u00e9 was great,pos\nslow service,neg\n".encode("latin-1"))
    with pytest.raises(TokentuneError, match="data.encoding: latin-1"):
        build(chat_tok, task="classification", train=str(path), fields={"text": "review", "label": "sentiment"})
    splits = build(chat_tok, task="classification", train=str(path), encoding="latin-1",
                   fields={"text": "review", "label": "sentiment"})
    assert splits.label_names == ["neg", "pos"]
    assert chat_tok.decode(splits.train[0].input_ids, skip_special_tokens=True) == "caf\u00e9 was great"


def test_parquet_messages(chat_tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"conversation": [convo]}), path)
    splits = build(chat_tok, train=str(path), fields={"messages": "conversation"})
    assert splits.format == "messages" and splits.train[0].reference == "Hello there"
    assert splits.train[0].source == f"{path}[row 0]"


def test_datasets_directory_with_eval_split(chat_tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "ds"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"prompt": ["a", "b"], "completion": [" x", " y"]}),
        "validation": datasets.Dataset.from_dict({"prompt": ["c"], "completion": [" z"]}),
    }).save_to_disk(str(path))
    splits = build(chat_tok, train=str(path), eval=str(path))
    assert len(splits.train) == 2 and splits.eval[0].reference == " z"
    assert splits.eval[0].source == f"{path}[validation][row 0]"
