"""What a person watching a run sees: a progress line, JSON-lines metrics, TensorBoard events."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

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


def progress_fields(metrics: dict[str, Any]) -> dict[str, str]:
    """The training metrics the progress line shows, formatted: loss, tokens/s, MFU."""
    fields = {}
    if "loss" in metrics:
        fields["loss"] = f"{float(metrics['loss']):.4f}"
    if "tokens_per_s" in metrics:
        fields["tokens/s"] = f"{float(metrics['tokens_per_s']):,.0f}"
    if "mfu" in metrics:
        fields["mfu"] = f"{float(metrics['mfu']):.2%}"
    return fields
