"""Run logging: metrics.jsonl (one line per logged step), TensorBoard events when available, and a
progress bar with loss, learning rate, tokens/s and ETA."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


class MetricsLog:
    def __init__(self, run_dir: Path, *, tensorboard: bool | None, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.writer = None
        if tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if tensorboard:
                    from ..errors import TokentuneError

                    raise TokentuneError("log.tensorboard is true but tensorboard is not installed",
                                         where="log.tensorboard", fix="pip install tensorboard") from None
            else:
                self.writer = SummaryWriter(str(Path(run_dir) / "events"))

    def _truncate_after(self, step: int) -> None:
        """A killed run may have logged steps past its last checkpoint; the resumed run logs them again."""
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ProgressBar:
    def __init__(self, total: int, start: int, enabled: bool):
        self.progress = None
        if enabled:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
            )
            self.task = self.progress.add_task("train", total=total, completed=start, info="")
            self.progress.start()

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step,
                                 info=f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
