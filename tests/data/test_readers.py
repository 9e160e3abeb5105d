import json

import pytest

from tokentune.data import read_records
from tokentune.errors import TokentuneError


def test_jsonl_sources_are_file_and_line_and_blank_lines_skip(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    records = read_records(str(path))
    assert [r.data["text"] for r in records] == ["a", "b"]
    assert [r.source for r in records] == [f"{path}:1", f"{path}:3"]


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",\n', encoding="utf-8")
    with pytest.raises(TokentuneError) as err:
        read_records(str(path))
    assert f"{path}:3" in str(err.value) and "malformed JSON on line 3" in str(err.value)


def test_jsonl_non_object_line(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('["a", "b"]\n', encoding="utf-8")
    with pytest.raises(TokentuneError, match=r"list.jsonl:1"):
        read_records(str(path))


def test_json_list_and_data_key(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([{"text": "x"}, {"text": "y"}]), encoding="utf-8")
    b.write_text(json.dumps({"data": [{"text": "x"}]}), encoding="utf-8")
    assert [r.source for r in read_records(str(a))] == [f"{a}[record 0]", f"{a}[record 1]"]
    assert read_records(str(b))[0].data == {"text": "x"}


def test_json_other_shape_is_an_error(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"rows": []}), encoding="utf-8")
    with pytest.raises(TokentuneError, match="list of records"):
        read_records(str(path))


def test_csv_reads_rows_with_lines_and_strips_bom(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes('\ufeffprompt,completion\nq1,"multi\nline"\nq2,a2\n'.encode("utf-8"))
    records = read_records(str(path))
    assert records[0].data == {"prompt": "q1", "completion": "multi\nline"}
    assert [r.source for r in records] == [f"{path}:2", f"{path}:4"]


def test_csv_latin1_error_names_offset_and_fix_then_reads_with_encoding(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncafe,a\ncaf\u00e9,b\n".encode("latin-1"))
    with pytest.raises(TokentuneError) as err:
        read_records(str(path))
    msg = str(err.value)
    assert f"{path}:3" in msg and "byte offset 21" in msg and "data.encoding: latin-1" in msg
    assert read_records(str(path), encoding="latin-1")[1].data["text"] == "caf\u00e9"


def test_csv_wrong_field_count_names_line(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("text,label\nfine,a\ntoo,many,cells\n", encoding="utf-8")
    with pytest.raises(TokentuneError) as err:
        read_records(str(path))
    assert "3 fields, the header has 2" in str(err.value) and f"{path}:3" in str(err.value)


def test_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "f.parquet"
    pq.write_table(pa.table({"prompt": ["p0", "p1", "p2"], "completion": ["c0", "c1", "c2"]}), path)
    records = read_records(str(path), limit=2)
    assert [r.data for r in records] == [{"prompt": "p0", "completion": "c0"}, {"prompt": "p1", "completion": "c1"}]
    assert records[1].source == f"{path}[row 1]"


def test_datasets_directory_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    single, split = tmp_path / "single", tmp_path / "dict"
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(single))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t"]}),
                          "test": datasets.Dataset.from_dict({"text": ["e"]})}).save_to_disk(str(split))
    assert [r.data["text"] for r in read_records(str(single))] == ["a", "b"]
    records = read_records(str(split))
    assert records[0].data == {"text": "t"} and records[0].source == f"{split}[train][row 0]"
    assert read_records(str(split), splits=("validation", "test"))[0].data == {"text": "e"}
    with pytest.raises(TokentuneError, match="none of"):
        read_records(str(split), splits=("validation",))


def test_plain_directory_is_an_error(tmp_path):
    pytest.importorskip("datasets")
    with pytest.raises(TokentuneError, match="save_to_disk"):
        read_records(str(tmp_path))


def test_missing_path_names_config_key(tmp_path):
    with pytest.raises(TokentuneError, match=r"data.eval: .*nope.jsonl"):
        read_records(str(tmp_path / "nope.jsonl"), key="data.eval")


def test_unknown_extension_lists_supported(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(TokentuneError, match=r"\.jsonl, \.json, \.csv, \.parquet"):
        read_records(str(path))


@pytest.mark.parametrize("name,content", [("h.jsonl", "\n\n"), ("h.csv", "text,label\n"), ("h.json", "[]")])
def test_empty_file_is_an_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TokentuneError, match=f"{name} holds no records"):
        read_records(str(path))


def test_limit_stops_early(tmp_path):
    path = tmp_path / "i.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\nnot json\n', encoding="utf-8")
    assert len(read_records(str(path), limit=2)) == 2
