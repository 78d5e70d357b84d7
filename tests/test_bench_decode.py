"""`neo-jax bench decode`: one JSON object, every decoded item valid, the host trie agrees. No speed is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from neo_jax import cli
from neo_jax.bench.host_trie import HostTrie
from neo_jax.bench.trie import synthetic_codes
from neo_jax.catalog.table import build_trie
from neo_jax.vocab import EntityType, VocabLayout

SMALL = ["--preset", "tiny", "--levels", "2", "--codebook-size", "16", "--batch", "2", "--beams", "3",
         "--prompt-len", "4", "--repeats", "1"]


def test_bench_decode_prints_one_json_object_with_valid_items(capsys):
    assert cli.main(["bench", "decode", "--items", "40,200", "--host-trie-max-items", "40", *SMALL]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["invalid_items"] == 0 and [c["items"] for c in result["catalogs"]] == [40, 200]
    for row in result["catalogs"]:
        assert row["items_decoded"] == 2 * 3  # ID mode: every beam names one item
        assert row["steps_per_run"] == 2 + 3  # [SID], two codes, [/SID], EOS
        assert row["constrained_ms_per_step"] > 0 and row["unconstrained_ms_per_step"] > 0
        assert 0 < row["bitmap_bytes"] < row["table_bytes"]
        in_stock = row["in_stock"]  # half the items, cached after the first set-up
        assert in_stock["invalid_items"] == 0 and in_stock["out_of_stock_items"] == 0
        assert min(in_stock[f"setup_{t}"] for t in ("first_call_ms", "cached_call_ms", "without_subset_ms")) > 0
    small, large = result["catalogs"]
    assert small["host_trie_ms_per_step"] > 0 and large["host_trie_ms_per_step"] is None  # skipped above the limit
    assert 0.0 <= small["hf_topk_agreement"] <= 1.0
    for variant in ("constrained", "unconstrained"):
        per_step = [row[f"{variant}_ms_per_step"] for row in result["catalogs"]]
        assert result[f"{variant}_ms_per_step_growth"] == pytest.approx(max(per_step) / min(per_step), rel=1e-3)


def test_bench_decode_over_several_types_names_only_items_of_the_asked_type(capsys):
    assert cli.main(["bench", "decode", "--items", "90", "--types", "3", "--last-type-codebook-size", "32",
                     *SMALL, "--batch", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["type_codebook_sizes"] == {"type0": [16, 16], "type1": [16, 16], "type2": [32, 32]}
    assert result["invalid_items"] == 0 and result["wrong_type_items"] == 0
    (row,) = result["catalogs"]
    assert row["items_decoded"] == 3 * 3 and 0.0 <= row["hf_topk_agreement"] <= 1.0


def test_bench_decode_times_a_built_catalog_of_types_of_different_depths(tmp_path, capsys):
    from neo_jax.catalog.commands import SidsBuildConfig, build_sids
    from neo_jax.config import load_config

    config = load_config(SidsBuildConfig, Path(__file__).parents[1] / "configs" / "sids_synthetic.yaml", [
        f"output={tmp_path / 'sids'}", "synthetic.num_items=150", "synthetic.num_users=40", "embedding.text.dim=32",
        "embedding.collab.dim=8", "embedding.collab.epochs=1", "sids.quantiser.kmeans_iters=5"])
    summary = build_sids(config)
    capsys.readouterr()
    assert len(set(summary["levels"].values())) > 1  # the types' SIDs differ in depth
    assert cli.main(["bench", "decode", "--sids", str(tmp_path / "sids"), *SMALL, "--batch", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["types"] == 3 and result["levels"] == max(summary["levels"].values())
    assert result["invalid_items"] == 0 and result["wrong_type_items"] == 0
    (row,) = result["catalogs"]
    assert row["items"] == summary["items"] and row["items_decoded"] == 3 * 3
    assert row["steps_per_run"] == result["levels"] + 3


@pytest.mark.parametrize("argv, message", [
    (["--items", "ten"], "--items must be comma-separated integers"),
    (["--items", "2"], "--beams 3 is more than the 2 items of the smallest catalog's smallest type"),
    (["--items", "10", "--types", "4"], "more than the 2 items of the smallest catalog"),
    (["--types", "0"], "--items and --types must be positive"),
    (["--in-stock-share", "1.5"], "--in-stock-share must be in [0, 1]"),
])
def test_bench_decode_rejects_bad_flags(capsys, argv, message):
    assert cli.main(["bench", "decode", *SMALL, *argv]) == 2
    assert message in capsys.readouterr().err


def test_host_trie_allows_exactly_the_catalog_prefixes():
    layout = VocabLayout(8, (EntityType("item", (4, 4)),))
    codes = synthetic_codes(6, 2, 4, seed=1)
    trie = build_trie(codes, np.zeros(6, np.int32), (2,))
    host = HostTrie(trie, layout, eos_id=1)
    first = {layout.sid_token("item", 0, int(c)) for c in codes[:, 0]}
    assert host.allowed([]) == [layout.sid_open_id]
    assert set(host.allowed([layout.sid_open_id])) == first
    item = [layout.sid_token("item", level, int(c)) for level, c in enumerate(codes[0])]
    assert host.allowed([layout.sid_open_id, *item]) == [layout.sid_close_id]
    assert host.allowed([layout.sid_open_id, *item, layout.sid_close_id]) == [1]
