"""`neo-jax plot RUN_DIR`: PNG training curves from a run's metrics.jsonl."""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from neo_jax.errors import UserError
from neo_jax.train.monitor import METRICS_FILE, read_metrics

SKIPPED_KEYS = {"step", "time"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a training run directory (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="where to write PNGs (default RUN_DIR/plots)")


def collect_series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """`metric -> (steps, values)` for every numeric metric; a resumed run's repeated steps keep the last value."""
    by_key: dict[str, dict[int, float]] = defaultdict(dict)
    for record in records:
        for key, value in record.items():
            if key not in SKIPPED_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
                by_key[key][int(record["step"])] = float(value)
    return {key: (sorted(points), [points[s] for s in sorted(points)]) for key, points in by_key.items()}


def write_plots(run_dir: Path, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not (run_dir / METRICS_FILE).is_file():
        raise UserError(f"{run_dir / METRICS_FILE} does not exist: is {run_dir} a training run directory?")
    series = collect_series(read_metrics(run_dir))
    if not series:
        raise UserError(f"{run_dir / METRICS_FILE} holds no numeric metrics yet")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, (steps, values) in sorted(series.items()):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(f"{run_dir.name}: {key}")
        ax.grid(alpha=0.3)
        path = out_dir / f"{key.replace('/', '_')}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def run(args: argparse.Namespace) -> int:
    for path in write_plots(args.run_dir, args.out or args.run_dir / "plots"):
        print(path)
    return 0
