"""Every objective and recipe of issue 5 on real offline tasks, one JSON line per row (benchmarks/objective_rows/).

  otr                OTR vs plain SFT, LoRA on SmolLM2-135M-Instruct: arithmetic (mathematics-dataset) and tweets
  caft               CAFT (heads stage + fine-tune) vs plain SFT on the same two tasks
  dpo                DPO and cDPO on arithmetic preference pairs sampled from SmolLM2 and judged by the answers
  leti               LeTI pass rates before/after each round (arithmetic-as-code; HumanEval on request)
  verbalizer         SciPrompt verbalizer vs manual verbalizer / label-word SFT / MiniLM head, BBC 16 per class
  list               LiST self-training vs its teacher vs prompt-based fine-tuning, BBC 16 per class
  tl_training        TL-Training: weighted SFT then PPO with the tool-call reward
  black_box_prompt   discrete prompt learning through a score-only interface, tweets

Each row module has its own defaults (its docstring says what they are and how long they take) and can be run alone
(`python benchmarks/objective_rows/<row>.py --help`). This script runs the chosen rows in turn, each in its own
process (so one row's memory does not count against the next and a failing row is reported, not fatal), and
appends every line to --out.

  python benchmarks/objectives.py --out benchmarks/objectives_results.jsonl              # everything (hours on CPU)
  python benchmarks/objectives.py --rows otr,caft --out /tmp/o.jsonl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ROWS = ["otr", "caft", "dpo", "leti", "verbalizer", "list", "tl_training", "black_box_prompt"]


def run_row(name: str, extra: list[str]) -> tuple[list[dict], str]:
    """One row module in a child process; returns its rows (JSON lines on stdout) and, on failure, the error."""
    script = ROOT / "objective_rows" / f"{name}.py"
    proc = subprocess.run([sys.executable, str(script), *extra], capture_output=True, text=True)
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    # The exit status says whether the row crashed or was killed (a negative status is the signal number).
    error = "" if proc.returncode == 0 else f"exit status {proc.returncode}: {proc.stderr[-2000:]}"
    return rows, error


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {ROWS}")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args, extra = p.parse_known_args()
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}; choose from {ROWS}")
    for name in args.rows.split(","):
        start = time.time()
        rows, error = run_row(name, extra)
        if error:
            rows.append({"benchmark": "objectives", "row": name, "error": error})
        for row in rows:
            row.setdefault("row", name)
            row["row_wall_seconds"] = round(time.time() - start)
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(line + "\n")


if __name__ == "__main__":
    main()
