"""Run monitoring: metrics.jsonl survives a torn line, plots are written, progress shows ETA."""

import io
import json

import pytest

from neo_jax.errors import UserError
from neo_jax.plot import collect_series, write_plots
from neo_jax.train.monitor import METRICS_FILE, MetricsLog, Progress, read_metrics


def test_metrics_log_and_plots(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=True)
    for step in range(1, 6):
        log.write(step, {"loss": 5.0 / step, "tokens_per_s": 100.0})
    log.close()
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 6, "loss"')  # a run killed mid-write
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert any((tmp_path / "tensorboard").iterdir())
    series = collect_series(records)
    assert series["loss"][0] == [1, 2, 3, 4, 5]
    written = write_plots(tmp_path, tmp_path / "plots")
    assert sorted(p.name for p in written) == ["loss.png", "tokens_per_s.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


def test_resumed_run_keeps_last_value_per_step(tmp_path):
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert collect_series(read_metrics(tmp_path))["loss"] == ([1, 2], [3.0, 1.5])


def test_plot_of_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="metrics.jsonl does not exist"):
        write_plots(tmp_path / "nope", tmp_path / "plots")


def test_progress_line():
    out = io.StringIO()
    progress = Progress(total_steps=10, stream=out, interval=0.0)
    progress.update(5, {"loss": 1.25, "tokens_per_s": 12345.6, "mfu": 0.0312})
    line = out.getvalue()
    assert "step 5/10" in line and "loss 1.2500" in line and "12,346" in line and "3.12%" in line and "ETA" in line
