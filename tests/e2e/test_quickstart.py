"""The quick-start config as shipped, on the real SmolLM2-135M-Instruct and real tweets (slow: ~3 min),
and the MiniLM + BBC News encoder path (a short run of the shipped config)."""

import json
from pathlib import Path

import pytest

from tokentune.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quickstart_improves_accuracy_by_30_points(tmp_path):
    data = tmp_path / "tweets"
    assert main(["data", "tweets", str(data)]) == 0
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "examples" / "quickstart.yaml"), f"data.train={data / 'train.jsonl'}",
                 f"data.eval={data / 'eval.jsonl'}", f"train.output_dir={run}", "log.progress=false"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    before, after = summary["before"]["eval/exact_match"], summary["after"]["eval/exact_match"]
    assert after - before >= 0.30, (before, after)


@pytest.mark.slow
def test_minilm_bbc_classification_path(tmp_path):
    data = tmp_path / "bbc"
    assert main(["data", "bbc", str(data)]) == 0
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "examples" / "bbc_minilm.yaml"), f"data.train={data / 'train.jsonl'}",
                 f"data.eval={data / 'eval.jsonl'}", f"train.output_dir={run}", "train.epochs=null",
                 "train.max_steps=24", "eval.max_examples=100", "log.progress=false"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["eval/accuracy"] > summary["before"]["eval/accuracy"] + 0.2
    assert (run / "final" / "model.safetensors").exists()
