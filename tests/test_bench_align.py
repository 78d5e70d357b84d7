"""`neo-jax bench align` end to end on a small generated catalog: the three variants (every level, no
behaviour level, no token level) each fine-tune and align, and the ablation table names each level off."""

from __future__ import annotations

import json
from pathlib import Path

import grain
import numpy as np
import pytest
import yaml

from neo_jax.align import scored_by
from neo_jax.bench.align import AlignBenchConfig, run_bench_align
from neo_jax.catalog.sid_output import load_sid_output
from neo_jax.checkpoint import load_model
from neo_jax.config import MeshConfig, load_config
from neo_jax.decode.commands import load_generator
from neo_jax.errors import UserError
from neo_jax.sharding import make_mesh
from neo_jax.tasks.builders import USER_LINE, read_examples
from neo_jax.tasks.preference import PreferenceExample
from neo_jax.tasks.records import record_paths
from neo_jax.train.monitor import read_metrics
from test_align import ALIGN, BENCH, small_catalog

SETTINGS = [*(f"rec.{s}" for s in BENCH), "rec.item_ids=true", "rec.users.codebook_sizes=[8,8]",
            "rec.users.steps=30", "rec.users.batch_size=32", "rec.users.dim=8", "rec.users.hidden=16",
            "rec.user_sid_share=0.5",
            *(f"align.{s}" for s in ALIGN), "align.stages=[easy,disliked]",
            "behaviour_task_weights={recommend: 2, profile_to_user: 1, user_to_profile: 1}", "behaviour_steps=48"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_align")
    config = load_config(AlignBenchConfig, None, [f"out={root / 'out'}", *SETTINGS])
    return root, run_bench_align(config, small_catalog(root))


def test_the_ablation_turns_each_level_off(bench):
    root, result = bench
    assert json.loads((root / "out" / "result.json").read_text()) == result
    assert [row["variant"] for row in result["ablation"]] == ["full", "no_preference", "no_behaviour", "no_token"]
    for row in result["ablation"]:
        for key in ("valid_recall@10", "valid_ndcg@10", "test_recall@10", "test_ndcg@10"):
            assert 0.0 <= row[key] <= 1.0, (row, key)
    assert result["variants"]["full"]["levels"] == ["token", "behaviour", "preference"]
    assert [s["stage"] for s in result["variants"]["no_token"]["align"]] == ["fine-tuned", "easy", "disliked"]


def test_each_variant_builds_what_its_levels_say(bench):
    root, _ = bench
    out = root / "out"
    types = {name: [t.name for t in load_sid_output(out / name / "rec" / "sids").entity_types]
             for name in ("full", "no_behaviour", "no_token")}
    assert "user" in types["full"] and "user" in types["no_behaviour"] and "user" not in types["no_token"]
    for name, named in (("full", True), ("no_behaviour", False), ("no_token", False)):
        test = read_examples(out / name / "rec" / "tasks" / "test.jsonl")
        assert all((e.prompt.split("\n")[1].startswith(USER_LINE)) == named for e in test), name
        train = read_examples(out / name / "rec" / "tasks" / "train.jsonl")
        assert {e.task for e in train} == ({"recommend", "profile_to_user", "user_to_profile"} if named
                                           else {"recommend"}), name
        windows_named = [e.prompt.split("\n")[1].startswith(USER_LINE) for e in train if e.task == "recommend"]
        assert (0 < sum(windows_named) < len(windows_named)) if named else not any(windows_named), name  # share 0.5


def test_the_behaviour_variant_trains_on_its_own_task_mix_and_steps(bench):
    root, result = bench
    for name, steps, weights in (("full", 48, {"recommend": 2, "profile_to_user": 1, "user_to_profile": 1}),
                                 ("no_behaviour", 40, {}), ("no_token", 40, {})):
        train = yaml.safe_load((root / "out" / name / "rec" / "train.yaml").read_text())
        assert (train["steps"], train["data"].get("task_weights", {})) == (steps, weights), name
        assert (result["variants"][name]["steps"], result["variants"][name]["task_weights"]) == (steps, weights)
        assert read_metrics(root / "out" / name / "rec" / "train")[-1]["step"] == steps, name


def test_the_stored_reference_of_a_model_with_item_identity_is_its_own_scoring(bench):
    """The DPO stage trains with the item ids in its batches; the reference log-probabilities it stores
    are the reference model's with the same ids (and differ without them)."""
    root, result = bench
    full = root / "out" / "full"
    mesh = make_mesh(MeshConfig())
    source = grain.sources.ArrayRecordDataSource(record_paths(full / "align" / "1_easy" / "records", "train"))
    stored = [PreferenceExample.from_bytes(source[i]) for i in range(min(len(source), 8))]
    reference = Path(result["variants"]["full"]["align"][1]["reference"])  # the fine-tuned model
    generator = load_generator(reference, full / "rec" / "sids", mesh)
    assert generator.model.config.num_item_ids > 0
    with_ids = scored_by(generator.model, stored, 128, 8, generator.item_ids)
    without = scored_by(generator.model, stored, 128, 8)
    for kept, rescored, blind in zip(stored, with_ids, without):
        np.testing.assert_allclose(kept.reference, rescored.reference, rtol=1e-5, atol=1e-4)
        assert not np.allclose(kept.reference, blind.reference, atol=1e-4)
    assert load_model(full / "align" / "1_easy" / "train" / "final", mesh).config.num_item_ids > 0


def test_unknown_variants_are_refused():
    with pytest.raises(UserError, match="variants"):
        load_config(AlignBenchConfig, None, ["variants=[full,no_language]"])


def test_the_shipped_config_loads():
    config = load_config(AlignBenchConfig, Path(__file__).resolve().parents[1] / "configs" /
                         "bench_align_synthetic.yaml")
    assert config.variants == ("full", "no_behaviour", "no_token")
    assert config.align.stages[-2:] == ("disliked", "neutral") and config.rec.item_ids
