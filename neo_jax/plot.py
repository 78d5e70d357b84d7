"""`neo-jax plot RUN_DIR`: PNG training curves from a run's metrics.jsonl.

The curve code here (`pyplot`, `collect_series`, `draw_curve`, `draw_loss_curves`,
`save_figure`) is shared with `neo-jax report`.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from neo_jax.errors import UserError
from neo_jax.train.monitor import METRICS_FILE, read_metrics

SKIPPED_KEYS = {"step", "time"}
TRAIN_LOSS, VALID_LOSS = "loss", "valid_loss"

Series = dict[str, tuple[list[int], list[float]]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a training run directory (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="where to write PNGs (default RUN_DIR/plots)")


def pyplot():
    """`matplotlib.pyplot` on the Agg backend (files only, no display); a `UserError` without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib, a dependency of neo_jax: reinstall it (pip install -e .)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def collect_series(records: list[dict]) -> Series:
    """`metric -> (steps, values)` for every numeric metric; a resumed run's repeated steps keep the last value."""
    by_key: dict[str, dict[int, float]] = defaultdict(dict)
    for record in records:
        for key, value in record.items():
            if key not in SKIPPED_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
                by_key[key][int(record["step"])] = float(value)
    return {key: (sorted(points), [points[s] for s in sorted(points)]) for key, points in by_key.items()}


def draw_curve(ax, steps: list, values: list[float], label: str | None = None, xlabel: str = "step",
               ylabel: str | None = None, **style) -> None:
    """One metric against step as a line (dots while there are few points)."""
    style.setdefault("marker", "." if len(steps) < 50 else None)
    ax.plot(steps, values, label=label, **style)
    ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def draw_loss_curves(ax, series: Series, title: str) -> None:
    """Training loss as a line and validation loss as markers, on one axis."""
    if TRAIN_LOSS in series:
        draw_curve(ax, *series[TRAIN_LOSS], label="train loss", color="tab:blue", linewidth=1.2)
    if VALID_LOSS in series:
        steps, values = series[VALID_LOSS]
        ax.plot(steps, values, linestyle="--", linewidth=0.8, color="tab:orange", alpha=0.6)
        ax.plot(steps, values, linestyle="none", marker="o", markersize=5, color="tab:orange", label="valid loss")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    _clip_early_valid_loss(ax, series)
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()


def _clip_early_valid_loss(ax, series: Series) -> None:
    """The validation loss of the untrained model (often far above the rest) would squash the curves:
    cut the axis above the other points and mark such a point at the top edge with its value."""
    if TRAIN_LOSS not in series or VALID_LOSS not in series:
        return
    train, (steps, valid) = series[TRAIN_LOSS][1], series[VALID_LOSS]
    train = [v for v in train if v == v]  # NaN never equals itself
    if not train or max(train) <= 0:
        return
    cut = 1.5 * max(train)
    high = [(s, v) for s, v in zip(steps, valid) if v > cut]
    if not high:
        return
    kept = train + [v for v in valid if v <= cut]
    top, bottom = max(kept), min(kept)
    span = top - bottom or abs(top) or 1.0
    limit = top + 0.1 * span
    ax.set_ylim(bottom - 0.05 * span, limit)
    for step, value in high:
        ax.plot([step], [limit], marker="^", color="tab:orange", linestyle="none", clip_on=False)
        ax.annotate(f"valid loss {value:.2f} (off scale)", xy=(step, limit), xytext=(8, -12),
                    textcoords="offset points", fontsize=8, color="tab:orange")


def save_figure(fig, path: Path, dpi: int = 100) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def write_plots(run_dir: Path, out_dir: Path) -> list[Path]:
    plt = pyplot()
    if not (run_dir / METRICS_FILE).is_file():
        raise UserError(f"{run_dir / METRICS_FILE} does not exist: is {run_dir} a training run directory?")
    series = collect_series(read_metrics(run_dir))
    if not series:
        raise UserError(f"{run_dir / METRICS_FILE} holds no numeric metrics yet")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if TRAIN_LOSS in series or VALID_LOSS in series:  # training and validation loss on one axis
        fig, ax = plt.subplots(figsize=(6, 4))
        draw_loss_curves(ax, series, f"{run_dir.name}: loss")
        written.append(save_figure(fig, out_dir / "loss.png"))
    for key, (steps, values) in sorted(series.items()):
        if key in (TRAIN_LOSS, VALID_LOSS):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        draw_curve(ax, steps, values, ylabel=key)
        ax.set_title(f"{run_dir.name}: {key}")
        written.append(save_figure(fig, out_dir / f"{key.replace('/', '_')}.png"))
    return written


def run(args: argparse.Namespace) -> int:
    for path in write_plots(args.run_dir, args.out or args.run_dir / "plots"):
        print(path)
    return 0
