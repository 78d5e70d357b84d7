"""Run monitoring: metrics.jsonl survives a torn line, plots are written, progress shows ETA."""

import io
import json

import pytest

from neo_jax.errors import UserError
from neo_jax.plot import collect_series, write_plots
from neo_jax.progress import Progress
from neo_jax.train.monitor import METRICS_FILE, MetricsLog, progress_fields, read_metrics


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


def test_training_and_validation_loss_share_one_plot(tmp_path):
    records = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0, "valid_loss": 2.5}, {"step": 3, "lr": 0.1}]
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    written = write_plots(tmp_path, tmp_path / "plots")
    assert sorted(p.name for p in written) == ["loss.png", "lr.png"]


def test_resumed_run_keeps_last_value_per_step(tmp_path):
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert collect_series(read_metrics(tmp_path))["loss"] == ([1, 2], [3.0, 1.5])


def test_plot_of_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="metrics.jsonl does not exist"):
        write_plots(tmp_path / "nope", tmp_path / "plots")


def test_progress_lines_in_a_log_show_count_rate_eta_and_the_training_metrics():
    out = io.StringIO()  # not a terminal: one line per update, at most every `interval` s
    progress = Progress(10, label="train", stream=out, interval=0.0, start=2)
    progress.update(5, progress_fields({"loss": 1.25, "tokens_per_s": 12345.6, "mfu": 0.0312}))
    progress.update(10, force=True)
    first, last = out.getvalue().splitlines()
    assert first.startswith("train 5/10 (50%) [") and "step/s" in first and "<" in first
    assert first.endswith(", loss 1.2500, tokens/s 12,346, mfu 3.12%")
    assert last.startswith("train 10/10 (100%)")


def test_progress_in_a_log_waits_for_its_interval_unless_forced():
    out = io.StringIO()
    progress = Progress(10, stream=out, interval=3600.0)
    for done in range(1, 10):
        progress.update(done)
    progress.update(10, force=True)
    assert [line.split(" ")[1] for line in out.getvalue().splitlines()] == ["1/10", "10/10"]
