"""benchmarks/adapters_table.py: the table and the per-page numbers come from the same rows."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("adapters_table", ROOT / "benchmarks" / "adapters_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(method, after, task="causal"):
    return {"task": task, "method": method, "steps": 40, "lr": 2e-4, "dev_by_lr": {"0.0002": 0.7, "0.001": 0.6},
            "trainable_params": 1234, "test_before": 0.38, "test_after": after, "s_per_step": 1.5,
            "peak_rss_mb": 900.0, "forgetting": 0.01 if task == "causal" else None}


def test_pages_get_the_rows_numbers_once_and_follow_a_rerun(tmp_path):
    mod = _module()
    (tmp_path / "lora.md").write_text("# LoRA\n\n**Measured.** See [benchmarks.md](benchmarks.md).\n\n## More\ntext\n")
    (tmp_path / "layerwise.md").write_text("# layerwise\n\n**Measured.** See the table.\n")
    rows = [_row("lora", 0.73), _row("last_block", 0.64), _row("lora", 0.9, task="encoder")]
    assert sorted(mod.write_pages(rows, tmp_path)) == ["layerwise.md", "lora.md"]
    lora = (tmp_path / "lora.md").read_text()
    assert lora.count(mod.MARK) == 1
    assert lora.index("**Measured.**") < lora.index(mod.MARK) < lora.index("## More")  # after the Measured line
    assert "test 0.380 → 0.730" in lora and "test 0.380 → 0.900" in lora  # both tasks' rows
    assert "forgetting +0.0100" in lora and "1,234 trainable" in lora
    mod.write_pages(rows, tmp_path)
    assert (tmp_path / "lora.md").read_text() == lora  # idempotent
    mod.write_pages([*rows, _row("lora", 0.75)], tmp_path)  # a re-run's later line replaces the earlier
    lora = (tmp_path / "lora.md").read_text()
    assert lora.count(mod.MARK) == 1 and "0.380 → 0.750" in lora and "0.380 → 0.730" not in lora
    assert (tmp_path / "layerwise.md").read_text().endswith("[benchmarks.md](benchmarks.md).\n")


def test_failed_row_is_reported_not_dropped():
    mod = _module()
    row = {"task": "causal", "method": "cpt", "steps": 40, "dev_by_lr": {"0.1": "boom"}, "error": "Trace\nValueError: x"}
    assert "failed (ValueError: x)" in mod.sentence(row)
    table = mod.render([row])
    assert "| cpt | failed |" in table
