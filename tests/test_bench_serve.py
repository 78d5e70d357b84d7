"""`neo-jax bench serve`: a short run prints one JSON object with both phases' figures. No speed is asserted."""

from __future__ import annotations

import json

import test_export_bundle
from neo_jax import cli

exported = test_export_bundle.run  # the fixture: a training run's final/, its bundle, the catalog, the mesh

SMALL = ["--clients", "4", "--seconds", "1", "--history", "2", "--max-batch", "4", "--beams", "3",
         "--max-prompt-tokens", "128", "--text-tokens", "16"]


def test_bench_serve_prints_both_phases(exported, capsys):
    root, _, _ = exported
    assert cli.main(["bench", "serve", "--bundle", str(root / "bundle"), *SMALL]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["benchmark"] == "serve" and result["clients"] == 4 and result["beam"] == 3
    for phase in ("concurrent", "sequential"):
        figures = result[phase]
        assert figures["requests"] > 0 and figures["requests_per_s"] > 0
        assert 0 < figures["p50_ms"] <= figures["p99_ms"]
        assert figures["errors"] == 0 and figures["invalid_items"] == 0
        assert figures["mean_batch_size"] >= 1
    assert result["sequential"]["mean_batch_size"] == 1  # one client: one request a call
    assert result["throughput_ratio"] > 0 and result["compiles_after_ready"] == 0
    assert result["server_invalid_items"] == 0 and result["shapes"] > 0


def test_bench_serve_rejects_a_beam_it_does_not_serve(exported, capsys):
    root, _, _ = exported
    assert cli.main(["bench", "serve", "--bundle", str(root / "bundle"), *SMALL, "--beam", "5"]) == 2
    assert "--beam 5 is not one of --beams [3]" in capsys.readouterr().err
