"""`neo-jax bench catalog` at a small scale: every phase runs through the real commands and reports its
time, memory and bytes; every item gets a distinct SID; every decoded item is real and of the asked type."""

from __future__ import annotations

import json

import numpy as np
import pytest

from neo_jax import cli


def test_bench_catalog_runs_every_phase(tmp_path, capsys):
    out = tmp_path / "catalog"
    assert cli.main(["bench", "catalog", "--items", "3000", "--types", "3", "--last-type-codebook-size", "64",
                     "--topic-size", "100", "--kmeans-steps", "5", "--users", "60", "--repeats", "1", "--batch", "3",
                     "--workers", "1", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["phases"]) == ["data", "sids", "tasks", "tokenizer", "records", "decode"]
    for name, phase in result["phases"].items():
        assert phase["peak_rss_gb"] > 0
        assert (phase["bytes"] > 0) == (name != "decode")
    assert sum(p["seconds"] for p in result["phases"].values()) <= result["seconds"] + 0.3  # each rounded
    assert result["peak_rss_gb"] == max(p["peak_rss_gb"] for p in result["phases"].values())
    assert result["sids"]["collision_rate_after"] == 0.0
    assert result["sids"]["codebook_sizes"]["type2"][:3] == [64, 64, 64]
    assert result["records"]["test"]["examples"] == 60  # one test example a user
    assert result["decode"]["invalid_items"] == 0 and result["decode"]["wrong_type_items"] == 0
    embeddings = np.load(out / "data" / "embeddings.npy", mmap_mode="r")
    assert embeddings.shape == (3000, 64) and embeddings.dtype == np.float16
    copies = (embeddings[1:] == embeddings[:-1]).all(axis=1).sum()
    assert 0 < copies < 3000 * 0.05  # about 1% of the items copy their neighbour


@pytest.mark.parametrize("argv, message", [
    (["--items", "100", "--topic-size", "50"], "fewer than two topics"),
    (["--duplicate-share", "0.7"], "--duplicate-share must be in [0, 0.5)"),
    (["--users", "0"], "must be positive"),
])
def test_bench_catalog_rejects_bad_flags(tmp_path, capsys, argv, message):
    assert cli.main(["bench", "catalog", "--out", str(tmp_path / "x"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bench_catalog_refuses_an_existing_output(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert cli.main(["bench", "catalog", "--items", "3000", "--topic-size", "100", "--out", str(tmp_path / "x")]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
