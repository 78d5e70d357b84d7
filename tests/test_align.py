"""`neo-jax align` end to end on a small generated catalog: a model fine-tuned by `bench rec`, then
progressive self-play softmax-DPO stages. Every mined negative is a catalog item of the asked type,
never the chosen one, in its stage's bin; the stored reference log-probabilities are the reference
model's (the model before the stage, untouched by it); each stage's model is the next one's
reference; a second run resumes without training again."""

from __future__ import annotations

import json
from pathlib import Path

import grain
import numpy as np
import pytest

from neo_jax.align import AlignConfig, _inputs, run_align, scored_by
from neo_jax.bench.rec import RecBenchConfig, run_bench
from neo_jax.cli import main
from neo_jax.config import MeshConfig, load_config
from neo_jax.data.loaders import load_dataset
from neo_jax.data.schema import NEGATIVE, NEUTRAL, POSITIVE
from neo_jax.checkpoint import load_model
from neo_jax.errors import UserError
from neo_jax.sharding import make_mesh
from neo_jax.tasks.builders import load_sid_map
from neo_jax.tasks.preference import PreferenceExample
from neo_jax.tasks.records import record_paths
from neo_jax.tokenizer import MixedTokenizer
from neo_jax.train.self_play import DIFFICULTY_BINS
from neo_jax.vocab import format_sid

BENCH = ["steps=40", "batch_size=8", "seq_len=128", "window=6", "beams=10", "ks=[1,5,10]", "eval_batch_size=8",
         "eval_users=12", "text_vocab_size=400", "model.hidden_size=32", "model.intermediate_size=64",
         "model.num_layers=1", "model.head_dim=8", "embedding.text_encoder=hashed_tfidf", "embedding.text.dim=32",
         "embedding.collab.epochs=1", "embedding.collab.dim=8", "sids.codebook_sizes=[8,8]",
         "sids.type_codebook_sizes={brand: [8], creator: [8]}", "baselines=[]", "evaluations=2"]
STAGES = ("easy", "medium", "disliked", "neutral")


# `neo-jax align` settings of a small run (the model, data, SIDs, output and stages aside)
ALIGN = ["users=0", "valid_users=20", "eval_users=0", "beams=10", "rejected=2", "batch_size=8", "seq_len=128",
         "eval_batch_size=8", "learning_rate=1e-3", "test_users=12"]


def align_settings(root: Path) -> list[str]:
    return [f"init={root / 'bench' / 'train' / 'final'}", f"data={root / 'data'}", f"sids={root / 'bench' / 'sids'}",
            f"out={root / 'align'}", "window=6", f"stages=[{','.join(STAGES)}]", *ALIGN]


def small_catalog(root: Path) -> Path:
    """A generated catalog of 150 items and 50 users at `root/data`."""
    assert main(["data", "synth", str(root / "data"), "--num-items", "150", "--num-users", "50",
                 "--num-queries", "5"]) == 0
    return root / "data"


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    small_catalog(root)
    run_bench(load_config(RecBenchConfig, None, [f"out={root / 'bench'}", *BENCH]), root / "data")
    return root, run_align(load_config(AlignConfig, None, align_settings(root)))


def stage_groups(root: Path, index: int, stage: str, split: str = "train") -> list[PreferenceExample]:
    source = grain.sources.ArrayRecordDataSource(record_paths(root / "align" / f"{index}_{stage}" / "records", split))
    return [PreferenceExample.from_bytes(source[i]) for i in range(len(source))]


def test_the_result_lists_the_fine_tuned_model_then_each_stage_on_the_last_ones_model(aligned):
    root, result = aligned
    assert json.loads((root / "align" / "result.json").read_text()) == result
    rows = result["stages"]
    assert [row["stage"] for row in rows] == ["fine-tuned", *STAGES]
    for before, row in zip(rows, rows[1:]):
        assert row["reference"] == before["model"] and Path(row["model"]).is_dir()
        assert row["groups"] > 0 and 1 <= row["rejected_per_group"] <= 2
        assert {"loss", "accuracy", "valid_loss"} <= set(row["training"])
    assert result["test_users"] == 12
    for row in rows:
        for split in ("valid", "test"):
            assert set(row[split]) == {f"{m}@{k}" for m in ("recall", "ndcg") for k in (1, 5, 10)}


def test_mined_negatives_are_catalog_items_of_the_asked_type_in_their_bin_never_the_chosen(aligned):
    root, _ = aligned
    dataset = load_dataset(root / "data")
    sid_map = load_sid_map(root / "bench" / "sids" / "sids.tsv", dataset.catalog)
    tokenizer = MixedTokenizer.load(root / "bench" / "tokenizer")
    row_of_tokens = {tuple(tokenizer.encode(format_sid(entity, codes))): row for row, (entity, codes) in sid_map.items()}
    for index, stage in enumerate(STAGES[:2], start=1):  # the self-play stages
        for split in ("train", "valid"):
            groups = stage_groups(root, index, stage, split)
            assert groups
            for group in groups:
                asked = group.entity_type  # the type the prompt's header asks for
                chosen, *rejected = [row_of_tokens[tuple(c.tolist())] for c in group.completions]
                assert 1 <= len(rejected) <= 2 and chosen not in rejected and len(set(rejected)) == len(rejected)
                for row in rejected:
                    assert dataset.catalog.type_name(row) == asked
                    shared = 0
                    for a, b in zip(sid_map[row][1], sid_map[chosen][1]):
                        if a != b:
                            break
                        shared += 1
                    assert min(shared, len(DIFFICULTY_BINS) - 1) == DIFFICULTY_BINS.index(stage)


@pytest.mark.parametrize("stage,kind", [("disliked", NEGATIVE), ("neutral", NEUTRAL)])
def test_a_feedback_stage_rejects_the_users_own_feedback_of_its_kind_from_before_the_chosen_item(aligned, stage,
                                                                                                 kind):
    root, _ = aligned
    dataset = load_dataset(root / "data")
    interactions = dataset.interactions
    config = load_config(AlignConfig, None, align_settings(root))
    users = _inputs(config).train
    tokenizer = MixedTokenizer.load(root / "bench" / "tokenizer")
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    written = {tuple(g.prompt.tolist()): [tokenizer.decode(c.tolist()) for c in g.completions]
               for g in stage_groups(root, STAGES.index(stage) + 1, stage)}
    sid_rows = {sid: row for row, sid in enumerate(_inputs(config).sids)}
    checked = 0
    for example, user in zip(users.examples, users.user_indices):
        completions = written.get(tuple(bos + tokenizer.encode(example.prompt)))
        if completions is None:
            continue
        chosen, *rejected = [sid_rows[c] for c in completions]
        events = np.flatnonzero(interactions.users == user)
        chosen_time = interactions.timestamps[events[(interactions.items[events] == chosen)
                                                     & (interactions.feedback[events] == POSITIVE)]].max()
        for row in rejected:
            assert row != chosen and dataset.catalog.type_name(row) == example.entity_type
            mine = events[(interactions.items[events] == row) & (interactions.feedback[events] == kind)]
            assert mine.size and interactions.timestamps[mine].min() <= chosen_time
        checked += 1
    assert checked == len(written) > 0


def test_the_stored_reference_is_the_reference_models_own_after_the_stage(aligned):
    root, result = aligned
    mesh = make_mesh(MeshConfig())
    for index, (stage, row) in enumerate(zip(STAGES, result["stages"][1:]), start=1):
        stored = stage_groups(root, index, stage)
        rescored = scored_by(load_model(row["reference"], mesh), stored, 128, 8)
        np.testing.assert_allclose(np.concatenate([g.reference for g in rescored]),
                                   np.concatenate([g.reference for g in stored]), rtol=1e-5, atol=1e-5)
        moved = scored_by(load_model(row["model"], mesh), stored, 128, 8)  # the stage did train
        assert not np.allclose(np.concatenate([g.reference for g in moved]),
                               np.concatenate([g.reference for g in stored]), atol=1e-3)


def test_a_second_run_resumes_from_the_results_without_training(aligned):
    root, result = aligned
    stamps = {p: p.stat().st_mtime_ns for p in (root / "align").glob("*/result.json")}
    assert run_align(load_config(AlignConfig, None, align_settings(root))) == result
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.parametrize("override, message", [
    ("stages=[easy,impossible]", "stages:.*choose from"),
    ("rejected=0", "rejected must be >= 1"),
    ("valid_users=0", "valid_users must be positive"),
])
def test_bad_settings_are_refused_before_any_work(override, message):
    with pytest.raises(UserError, match=message):
        load_config(AlignConfig, None, [override])


def test_the_shipped_beauty_config_loads_and_names_the_self_play_stages():
    config = load_config(AlignConfig, Path(__file__).parent.parent / "configs" / "align_beauty.yaml")
    assert config.stages == DIFFICULTY_BINS and config.beams >= config.rejected + 1
