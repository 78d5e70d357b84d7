"""What a person watching a run sees: a progress line, JSON-lines metrics, TensorBoard events."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from neo_jax.errors import UserError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsLog:
    """Appends one JSON object per record to `run_dir/metrics.jsonl` and mirrors scalars to TensorBoard.

    Only process 0 of a multi-host run should create one. Appending keeps the history of
    a run that was preempted and resumed.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": int(step), "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, global_step=int(step))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _plain(value: Any) -> Any:
    """numpy / jax scalars to Python numbers, so that json can write them."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of `run_dir/metrics.jsonl`, skipping a torn last line of a killed run; each record
    is an object with an integer `step`."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise UserError(f"{path}:{line_number}: a metrics record needs an integer 'step'")
            records.append(record)
    return records


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """A one-line progress report: step, loss, tokens/s, MFU and ETA, at most every `interval` s."""

    def __init__(self, total_steps: int, start_step: int = 0, interval: float = 2.0,
                 stream: TextIO | None = None):
        self.total_steps = total_steps
        self.start_step = start_step
        self.interval = interval
        self.stream = stream or sys.stderr
        self._start = time.monotonic()
        self._last_print = -math.inf

    def update(self, step: int, metrics: dict[str, Any], force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_print < self.interval:
            return
        self._last_print = now
        done = step - self.start_step
        elapsed = now - self._start
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        parts = [f"step {step}/{self.total_steps}"]
        for key in ("loss", "tokens_per_s", "mfu"):
            if key in metrics:
                value = float(metrics[key])
                parts.append(f"{key} {value:.2%}" if key == "mfu" else
                             f"{key} {value:,.0f}" if key == "tokens_per_s" else f"{key} {value:.4f}")
        parts.append(f"ETA {format_duration(eta) if math.isfinite(eta) else '--:--'}")
        print(" | ".join(parts), file=self.stream, flush=True)
