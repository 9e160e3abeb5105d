"""Render the JSON lines of benchmarks/adapters.py as the markdown tables of docs/adapters/benchmarks.md.

  python benchmarks/adapters_table.py benchmarks/adapters_results.jsonl                       # the tables
  python benchmarks/adapters_table.py benchmarks/adapters_results.jsonl --pages docs/adapters  # + each page

With --pages, every method page's "**Measured (benchmark).**" paragraph (inserted after the page's
"**Measured.**" line the first time) is rewritten from the same rows, so the pages never disagree with the table.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

COLUMNS = ["method", "lr", "trainable", "test before", "test after", "Δ", "s/step", "peak RSS MB", "forgetting",
           "dev accuracy per lr"]


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def failure(row: dict) -> str:
    """The last line of a failed row's error (the exception), short enough for a table cell."""
    return row["error"].strip().splitlines()[-1][:80]


def cell_row(row: dict, causal: bool) -> list[str]:
    if row.get("error") and row.get("lr") is None:
        return [row["method"], "failed", "", "", "", "", "", "", "", failure(row)]
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


# benchmark row -> the docs page that describes the method
PAGES = {"full": "full.md", "lora": "lora.md", "prompt_tuning": "prompt_tuning.md", "prefix_tuning": "prefix_tuning.md",
         "hft": "hft.md", "layerwise_llrd": "layerwise.md", "last_block": "layerwise.md", "lt_sft": "lt_sft.md",
         "dept": "dept.md", "ept": "ept.md", "parallel_adapter": "parallel_adapter.md",
         "scaled_parallel_adapter": "parallel_adapter.md", "mam_adapter": "mam_adapter.md",
         "greentrainer_50": "greentrainer.md", "locft": "locft.md", "dsee": "dsee.md", "cpt": "cpt.md",
         "iapt": "iapt.md", "ptec": "ptec.md", "apt": "apt.md"}
TASK_WORDS = {"causal": "SmolLM2-135M-Instruct, tweet sentiment", "encoder": "MiniLM-L6, BBC News topics"}
MARK = "**Measured (benchmark).**"


def sentence(row: dict) -> str:
    """One row in words, e.g. for a method page."""
    head = f"{row['method']} on {TASK_WORDS[row['task']]}"
    if row.get("error") and row.get("lr") is None:
        return f"{head}: failed ({failure(row)})."
    text = (f"{head}: test {fmt(row.get('test_before'))} → {fmt(row.get('test_after'))} at lr {row['lr']:g} "
            f"(best of {len(row['dev_by_lr'])} on dev), {row['trainable_params']:,} trainable parameters, "
            f"{fmt(row.get('s_per_step'), 2)} s/step, peak RSS {fmt(row.get('peak_rss_mb'))} MB")
    if row.get("forgetting") is not None:
        text += f", forgetting {row['forgetting']:+.4f} nats on held-out plays"
    return text + "."


def paragraph(rows: list[dict]) -> str:
    body = " ".join(sentence(r) for r in rows)
    return (f"{MARK} {body} One seed, {row_steps(rows)}; the table with every method and how to reproduce it: "
            "[benchmarks.md](benchmarks.md).")


def row_steps(rows: list[dict]) -> str:
    return ", ".join(sorted({f"{r['steps']} steps ({r['task']})" for r in rows}))


def write_pages(rows: list[dict], folder: Path) -> list[str]:
    """Rewrite (or insert after "**Measured.**") each page's benchmark paragraph; returns the pages touched."""
    latest = {(r["task"], r["method"]): r for r in rows}
    by_page: dict[str, list[dict]] = {}
    for method, page in PAGES.items():  # the table's order: methods as listed, causal before encoder
        for task in TASK_WORDS:
            if (task, method) in latest:
                by_page.setdefault(page, []).append(latest[(task, method)])
    touched = []
    for page, page_rows in by_page.items():
        path = folder / page
        text = path.read_text()
        new = paragraph(page_rows)
        if MARK in text:
            text = re.sub(re.escape(MARK) + r".*?(?=\n\n|\n?\Z)", lambda _: new, text, count=1, flags=re.S)
        elif re.search(r"\*\*Measured[^*]*\*\*", text):
            text = re.sub(r"(\*\*Measured[^*]*\*\*.*?)(\n\n|\n?\Z)", lambda m: m.group(1) + "\n\n" + new + m.group(2),
                          text, count=1, flags=re.S)
        else:
            text = text.rstrip("\n") + "\n\n" + new + "\n"
        path.write_text(text.rstrip("\n") + "\n")
        touched.append(page)
    return touched


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="JSON lines written by benchmarks/adapters.py --out")
    p.add_argument("--pages", type=Path, default=None, help="docs/adapters: also rewrite each method page's numbers")
    args = p.parse_args()
    rows = [json.loads(line) for line in open(args.results) if line.strip()]
    print(render(rows))
    if args.pages is not None:
        print("pages updated:", ", ".join(write_pages(rows, args.pages)))


if __name__ == "__main__":
    main()
