"""Render the JSON lines of benchmarks/adapters.py as the markdown tables of docs/adapters/benchmarks.md.

  python benchmarks/adapters_table.py benchmarks/adapters_results.jsonl
"""

from __future__ import annotations

import json
import sys

COLUMNS = ["method", "lr", "trainable", "test before", "test after", "Δ", "s/step", "peak RSS MB", "forgetting",
           "dev accuracy per lr"]


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def cell_row(row: dict, causal: bool) -> list[str]:
    if row.get("error") and row.get("lr") is None:
        return [row["method"], "failed", "", "", "", "", "", "", "", row["error"].strip().splitlines()[-1][:80]]
    before, after = row.get("test_before"), row.get("test_after")
    delta = None if before is None or after is None else after - before
    dev = ", ".join(f"{lr}: {fmt(v) if isinstance(v, float) else 'failed'}" for lr, v in row["dev_by_lr"].items())
    return [row["method"], f"{row['lr']:g}", f"{row['trainable_params']:,}", fmt(before), fmt(after),
            f"{delta:+.3f}" if delta is not None else "—", fmt(row.get("s_per_step"), 2),
            fmt(row.get("peak_rss_mb")), fmt(row.get("forgetting"), 4) if causal else "n/a", dev]


def render(rows: list[dict]) -> str:
    out = []
    for task, title in (("causal", "SmolLM2-135M-Instruct, tweet sentiment (exact-label accuracy)"),
                        ("encoder", "MiniLM-L6, BBC News topics (accuracy)")):
        chosen = [r for r in rows if r.get("task") == task]
        if not chosen:
            continue
        latest = {r["method"]: r for r in chosen}  # a re-run of a method replaces its earlier line
        out += [f"### {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        out += ["| " + " | ".join(cell_row(r, task == "causal")) + " |" for r in latest.values()]
        out.append("")
    return "\n".join(out)


def main() -> None:
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    print(render(rows))


if __name__ == "__main__":
    main()
