"""Periodic Recall@K validation during training: logged at every evaluation, equal to `neo-jax eval recommend`;
model selection (`eval.select`) keeps the model of the best evaluation, across a resume."""

import dataclasses
import json
import shutil

import grain
import jax
import numpy as np
import pytest

from neo_jax.catalog.sid_output import SidOutput, write_sid_output
from neo_jax.catalog.table import build_trie
from neo_jax.config import MeshConfig
from neo_jax.decode.commands import load_generator
from neo_jax.errors import UserError
from neo_jax.eval.recommend import evaluate_recommendations, sample_examples, target_rows
from neo_jax.sharding import make_mesh
from neo_jax.tasks.builders import TaskExample, read_examples, write_examples
from neo_jax.tasks.records import TokenizedExample, record_paths
from neo_jax.tokenizer import MixedTokenizer
from neo_jax.train.monitor import read_metrics
from neo_jax.train.config import SELECTABLE_METRICS
from neo_jax.train.trainer import BEST_DIR, SELECTION_FILE, train
from train_fixtures import tiny_config, write_catalog_dataset, write_dataset

RECALL_KEYS = ("valid_recall@5", "valid_recall@10", "valid_ndcg@10")
USERS = 8


def write_sids_dir(sids_tsv, layout, directory):
    """A `sids build` directory holding the two-level codes of `sids_tsv`, types in the order of `layout`."""
    rows = [line.split("\t") for line in sids_tsv.read_text().splitlines()[1:]]
    item_types = np.array([layout.type_index(row[1]) for row in rows])  # [items]
    codes = np.array([[int(row[2]), int(row[3])] for row in rows], np.int32)  # [items, 2]
    trie = build_trie(codes, item_types, [t.num_levels for t in layout.entity_types])
    directory.mkdir()
    write_sid_output(directory, SidOutput(trie, [row[0] for row in rows], layout.entity_types, {}), {})


def write_valid_jsonl(records, tokenizer, path):
    """The valid records as `neo-jax data tasks` wrote them: text prompt and completion, bos and eos dropped."""
    source = grain.sources.ArrayRecordDataSource(record_paths(records, "valid"))
    examples = []
    for index in range(len(source)):
        record = TokenizedExample.from_bytes(source[index])
        examples.append(TaskExample(record.task, record.entity_type, record.output_format,
                                    tokenizer.decode(record.prompt[1:].tolist()),
                                    tokenizer.decode(record.completion[:-1].tolist())))
    write_examples(path, examples)


@pytest.fixture(scope="module")
def recall_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("recall")
    records, tokenizer_dir = write_catalog_dataset(root)
    tokenizer = MixedTokenizer.load(tokenizer_dir)
    write_sids_dir(root / "sids.tsv", tokenizer.layout, root / "sids")
    write_valid_jsonl(records, tokenizer, root / "valid.jsonl")
    config = tiny_config(root, "run", ("seq_len=128", "steps=4", "eval.every_steps=2", "checkpoint.every_steps=100",
                                       f"eval.recall_examples={root / 'valid.jsonl'}",
                                       f"eval.recall_sids={root / 'sids'}", f"eval.recall_users={USERS}",
                                       "eval.recall_beams=10", "eval.select=valid_ndcg@10"))
    return root, config, train(config)


def test_recall_is_logged_at_every_evaluation(recall_run):
    root, _, result = recall_run
    evaluations = [r for r in read_metrics(root / "run") if "valid_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 2, 4]
    for record in evaluations:
        for key in RECALL_KEYS:
            assert 0.0 <= record[key] <= 1.0, record
        assert record["valid_recall@5"] <= record["valid_recall@10"]
    assert not any(key in r for r in read_metrics(root / "run") if "valid_loss" not in r for key in RECALL_KEYS)


def test_recall_equals_the_evaluation_of_the_saved_model(recall_run):
    root, config, result = recall_run
    last = [r for r in read_metrics(root / "run") if "valid_loss" in r][-1]
    generator = load_generator(result.final_dir, root / "sids", make_mesh(MeshConfig(), jax.devices()[:1]),
                               config.data.tokenizer)
    sample = sample_examples(read_examples(root / "valid.jsonl"), USERS, config.seed)
    expected = evaluate_recommendations(generator, sample, beams=10, show_progress=False)
    for key in RECALL_KEYS:
        assert last[key] == pytest.approx(expected[key.removeprefix("valid_")], abs=1e-6)


def test_the_recall_sample_is_seeded_not_the_first_users(recall_run):
    root, config, _ = recall_run
    examples = read_examples(root / "valid.jsonl")
    assert len(examples) > USERS  # a sample, not the whole file
    assert sample_examples(examples, USERS, config.seed) != examples[:USERS]


def test_the_selected_model_is_that_of_the_best_evaluation(recall_run):
    """`best/` is the model of the evaluation with the highest valid NDCG@10 (the earliest on ties):
    evaluating it gives that evaluation's figures."""
    root, config, result = recall_run
    evaluations = [r for r in read_metrics(root / "run") if "valid_loss" in r]
    best = max(evaluations, key=lambda r: (r["valid_ndcg@10"], -r["step"]))
    selection = json.loads((root / "run" / BEST_DIR / SELECTION_FILE).read_text())
    assert selection == {"metric": "valid_ndcg@10", "value": best["valid_ndcg@10"], "step": best["step"]}
    assert result.best_dir == str(root / "run" / BEST_DIR)
    generator = load_generator(result.best_dir, root / "sids", make_mesh(MeshConfig(), jax.devices()[:1]),
                               config.data.tokenizer)
    sample = sample_examples(read_examples(root / "valid.jsonl"), USERS, config.seed)
    figures = evaluate_recommendations(generator, sample, beams=10, show_progress=False)
    for key in RECALL_KEYS:
        assert figures[key.removeprefix("valid_")] == pytest.approx(best[key], abs=1e-6)


def test_every_selectable_metric_is_logged_at_every_evaluation(recall_run):
    root, _, _ = recall_run
    for record in [r for r in read_metrics(root / "run") if "valid_loss" in r]:
        assert set(SELECTABLE_METRICS) <= set(record)


def test_a_resumed_run_keeps_the_best_of_the_part_before(tmp_path):
    """The best value is read back from `best/selection.json`: a run resumed from step 3 whose
    saved best is unbeatable keeps that model, and a fresh run selects its lowest validation loss."""
    write_dataset(tmp_path)
    config = tiny_config(tmp_path, "run", ("eval.select=valid_loss",))
    result = train(config)
    evaluations = [r for r in read_metrics(tmp_path / "run") if "valid_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 3, 6]
    lowest = min(evaluations, key=lambda r: (r["valid_loss"], r["step"]))
    selection_path = tmp_path / "run" / BEST_DIR / SELECTION_FILE
    assert json.loads(selection_path.read_text()) == {"metric": "valid_loss", "value": lowest["valid_loss"],
                                                      "step": lowest["step"]}
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "6")  # as if killed after step 3's checkpoint
    shutil.rmtree(tmp_path / "run" / "final")
    unbeatable = {"metric": "valid_loss", "value": -1.0, "step": 3}
    selection_path.write_text(json.dumps(unbeatable))
    resumed = train(config)
    assert resumed.step == 6 and resumed.best_dir == result.best_dir
    assert json.loads(selection_path.read_text()) == unbeatable


def test_excluding_all_but_ten_items_of_the_type_ranks_exactly_those_ten(recall_run):
    """Each user's history is every item of the target's type but the target and 9 others: the 10
    beams must be those 10 items, so Recall@10 is exactly 1 whatever the model."""
    root, config, result = recall_run
    generator = load_generator(result.final_dir, root / "sids", make_mesh(MeshConfig(), jax.devices()[:1]),
                               config.data.tokenizer)
    examples = read_examples(root / "valid.jsonl")[:USERS]
    trie, item_ids = generator.sids.trie, generator.sids.item_ids
    with_history = []
    for example, target in zip(examples, target_rows(examples, generator)):
        same_type = np.flatnonzero(trie.item_types == trie.item_types[target])  # [items of the type]
        kept = {int(target), *[int(r) for r in same_type if r != target][:9]}
        history = tuple(item_ids[r] for r in same_type if int(r) not in kept)
        with_history.append(dataclasses.replace(example, history=history))
    metrics = evaluate_recommendations(generator, with_history, beams=10, batch_size=4, show_progress=False,
                                       exclude_history=True)
    assert metrics["recall@10"] == 1.0 and metrics["beams_naming_an_item"] == 1.0
    assert metrics["history_first"] == metrics["history_share@10"] == 0.0  # excluded: no beam repeats the history


@pytest.mark.parametrize("prompt, message", [
    ("Recommend the next product.", "evaluation example 1: prompt does not start with a header line"),
    ("task: recommend | type: product | format: mixed\nHistory: ...", "needs the 'ids' output format"),
])
def test_examples_without_an_ids_header_are_refused(recall_run, prompt, message):
    root, config, result = recall_run
    generator = load_generator(result.final_dir, root / "sids", make_mesh(MeshConfig(), jax.devices()[:1]),
                               config.data.tokenizer)
    examples = read_examples(root / "valid.jsonl")[:2]
    examples[1] = dataclasses.replace(examples[1], prompt=prompt)
    with pytest.raises(UserError, match=message):
        evaluate_recommendations(generator, examples, beams=10, show_progress=False)
