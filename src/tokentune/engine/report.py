"""report.html: a self-contained page (images inlined) with the loss and eval curves and the config."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import yaml

from .atomic import atomic_write_text
from .logging import read_metrics


def _plot(series: dict[str, list[tuple[int, float]]], title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=100)
    for name, points in series.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=name)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def write_report(run_dir: Path, config: dict, summary: dict) -> Path:
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evals = [m for m in metrics if any(k.startswith("eval/") for k in m)]
    sections = []
    curves = [("loss", {"train loss": train, "eval loss": [(m["step"], m["eval/loss"]) for m in evals if "eval/loss" in m]})]
    metric_keys = sorted({k for m in evals for k in m if k.startswith("eval/") and k not in ("eval/loss", "eval/ppl")})
    if metric_keys:
        curves.append(("eval metrics", {k: [(m["step"], m[k]) for m in evals if k in m] for k in metric_keys}))
    for title, series in curves:
        img = _plot(series, title)
        if img:
            sections.append(f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" src="data:image/png;base64,{img}">')
        else:
            sections.append(f"<h2>{html.escape(title)}</h2><p>matplotlib is not installed; the curve is in metrics.jsonl.</p>")
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items())
    eval_rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(m.get(k, '')))}</td>" for k in ["step", "eval/loss", "eval/ppl", *metric_keys]) + "</tr>"
        for m in evals)
    eval_head = "".join(f"<th>{html.escape(k)}</th>" for k in ["step", "eval/loss", "eval/ppl", *metric_keys])
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>tokentune run {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}}td,th{{border:1px solid #ccc;padding:2px 8px}}
table{{border-collapse:collapse}}pre{{background:#f6f6f6;padding:1em}}</style></head><body>
<h1>tokentune run: {html.escape(run_dir.name)}</h1>
<h2>summary</h2><table>{rows}</table>
{''.join(sections)}
<h2>evaluations</h2><table><tr>{eval_head}</tr>{eval_rows}</table>
<h2>config</h2><pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>
</body></html>"""
    path = run_dir / "report.html"
    atomic_write_text(path, page)
    return path
