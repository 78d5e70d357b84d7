"""The count baselines on tiny hand-made sequences, against rankings worked out by hand: the
first-order transition baseline (weights 1.0 / 0.3, popularity tie-break, history exclusion,
popularity fallback), the popularity baseline (ties, exclusion, entity types) that the
quickstart and SASRec reports share, and `neo-jax baseline transition|popularity`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from neo_jax.baselines.popularity import (padded_rows, popularity_metrics, popularity_ranking,
                                         popularity_ranking_metrics, training_counts)
from neo_jax.baselines.transition import TransitionCounts, transition_metrics, transition_ranking
from neo_jax.cli import main
from neo_jax.data.loaders import load_dataset
from neo_jax.data.splits import leave_one_out
from neo_jax.errors import UserError

# transitions 0->1 x2, 0->2, 1->2, 1->3 x2, 3->4; popularity 0:3 1:3 2:2 3:3 4:1 5:0, so the
# popularity order is 0, 1, 3, 2, 4, 5 (equal counts: lower row first); 2, 4 and 5 lead nowhere
TRAIN = [[0, 1, 2], [0, 1, 3], [0, 2], [3, 4], [1, 3]]
POPULAR = [0, 1, 3, 2, 4, 5]


@pytest.fixture(scope="module")
def counts() -> TransitionCounts:
    return TransitionCounts.of([np.array(s) for s in TRAIN], num_items=6)


def rank(model: TransitionCounts, history: list[int], k: int = 6, **kwargs) -> list[int]:
    return transition_ranking(model, [np.array(history)], k, **kwargs)[0].tolist()


def test_counts_are_the_training_transitions(counts):
    assert counts.following(0) == {1: 2, 2: 1}
    assert counts.following(1) == {2: 1, 3: 2}
    assert counts.following(3) == {4: 1}
    assert counts.following(2) == counts.following(4) == counts.following(5) == {}
    np.testing.assert_array_equal(counts.popularity, [3, 3, 2, 3, 1, 0])


def test_newest_item_weighs_one_and_the_one_before_it_weighs_point_three(counts):
    # newest 0: 1 -> 2.0, 2 -> 1.0; before it 1: 2 -> +0.3, 3 -> +0.6; then popularity 0, 4, 5
    assert rank(counts, [4, 1, 0]) == [1, 2, 3, 0, 4, 5]
    # the same two items the other way round: newest 1: 3 -> 2.0, 2 -> 1.0 (+0.3 from 0), 1 -> 0.6
    assert rank(counts, [0, 1]) == [3, 2, 1, 0, 4, 5]
    # with the newest item alone, 1 loses its 0.6 and falls back to its popularity place
    assert rank(counts, [0, 1], weights=(1.0,)) == [3, 2, 0, 1, 4, 5]
    # items older than the second-to-last one do not count
    assert rank(counts, [3, 5, 1, 0]) == rank(counts, [1, 0])


def test_an_item_with_no_transitions_falls_back_to_popularity(counts):
    assert rank(counts, [5]) == POPULAR
    assert rank(counts, [2]) == POPULAR
    assert rank(counts, [2, 4]) == POPULAR
    # newest 5 leads nowhere; the one before it (3) still adds 0.3 to 4
    assert rank(counts, [3, 5]) == [4, 0, 1, 3, 2, 5]


def test_equal_scores_go_to_the_more_popular_item_then_the_lower_row():
    # 0 -> 1 and 0 -> 2 once each; 2 is the more popular; 3 and 5 tie on popularity too
    model = TransitionCounts.of([np.array(s) for s in ([0, 1], [0, 2], [2, 3], [5, 2])], num_items=6)
    assert rank(model, [0]) == [2, 1, 0, 3, 5, 4]


def test_weighted_sums_that_are_equal_tie_exactly():
    # history [2, 0]: item 1 scores 0.3 * 12 and item 3 scores 1.0 * 3 + 0.3 * 2, both 3.6, so the more
    # popular 1 (32 events against 5) comes first, although in floating point the first sum is smaller
    sequences = [[0, 3]] * 3 + [[2, 3]] * 2 + [[2, 1]] * 12 + [[1]] * 20
    model = TransitionCounts.of([np.array(s) for s in sequences], num_items=4)
    assert 0.3 * 12 < 1.0 * 3 + 0.3 * 2
    assert rank(model, [2, 0], k=4) == [1, 3, 2, 0]


def test_history_exclusion_drops_exactly_the_history_and_pads_with_minus_one(counts):
    assert rank(counts, [4, 1, 0], exclude_history=True) == [2, 3, 5, -1, -1, -1]
    assert rank(counts, [2], exclude_history=True, k=5) == [0, 1, 3, 4, 5]
    assert rank(counts, [4, 1, 0], k=3, exclude_history=True) == [2, 3, 5]


def test_batches_do_not_change_the_ranking(counts):
    rng = np.random.default_rng(0)
    histories = [rng.integers(0, 6, rng.integers(1, 5)) for _ in range(50)]
    for exclude in (False, True):
        whole = transition_ranking(counts, histories, 4, exclude, batch_size=1024)
        np.testing.assert_array_equal(transition_ranking(counts, histories, 4, exclude, batch_size=7), whole)
        for history, row in zip(histories, whole):
            assert row.tolist() == rank(counts, history.tolist(), k=4, exclude_history=exclude)


def test_bad_arguments_are_clear_errors(counts):
    with pytest.raises(UserError, match="k must be in 1 .. 6"):
        rank(counts, [0], k=7)
    with pytest.raises(UserError, match="non-negative"):
        rank(counts, [0], weights=(1.0, -0.3))
    with pytest.raises(UserError, match="outside 0 .. 5"):
        TransitionCounts.of([np.array([0, 6])], num_items=6)


# Full histories for leave-one-out: the training parts are [0, 1], [2, 3, 4], [1, 2] (transitions
# 0->1, 2->3, 3->4, 1->2; popularity order 1, 2, 0, 3, 4, 5). Test examples (history -> target):
# [0, 1, 2] -> 3, [2, 3, 4, 0] -> 1, [1, 2, 4] -> 5; the newest history item is the validation one.
SEQUENCES = [[0, 1, 2, 3], [2, 3, 4, 0, 1], [1, 2, 4, 5]]
# transition, test: [3, 2, 1, 0, 4, 5] (3 first), [1, 2, 0, ...] (1 first), [3, 1, 2, 0, 4, 5] (5 last)
TRANSITION_TEST = {"recall@1": 2 / 3, "ndcg@1": 2 / 3, "recall@5": 2 / 3, "ndcg@5": 2 / 3,
                   "recall@6": 1.0, "ndcg@6": (2 + 1 / np.log2(7)) / 3}
# without history: [3, 4, 5], [1, 5], [3, 0, 5] (5 third)
TRANSITION_TEST_EXCLUDED = {"recall@1": 2 / 3, "ndcg@1": 2 / 3, "recall@5": 1.0, "ndcg@5": 2.5 / 3}
# popularity, test: 3 fourth, 1 first, 5 sixth; without history: [3, 4, 5], [1, 5], [0, 3, 5]
POPULARITY_TEST = {"recall@1": 1 / 3, "ndcg@1": 1 / 3, "recall@5": 2 / 3, "ndcg@5": (1 + 1 / np.log2(5)) / 3}
POPULARITY_TEST_EXCLUDED = {"recall@1": 2 / 3, "ndcg@1": 2 / 3, "recall@5": 1.0, "ndcg@5": 2.5 / 3}


def assert_metrics(measured: dict, expected: dict) -> None:
    assert set(measured) >= set(expected)
    for name, value in expected.items():
        assert measured[name] == pytest.approx(value), name


def test_transition_metrics_on_a_leave_one_out_split():
    split = leave_one_out([np.array(s) for s in SEQUENCES])
    assert [s.tolist() for s in split.train_sequences] == [[0, 1], [2, 3, 4], [1, 2]]
    assert_metrics(transition_metrics(split.test, split.train_sequences, 6, ks=(1, 5, 6)), TRANSITION_TEST)
    assert_metrics(transition_metrics(split.test, split.train_sequences, 6, ks=(1, 5), exclude_history=True),
                   TRANSITION_TEST_EXCLUDED)
    # validation: [0, 1] -> 2 (2, 1, ...: first), [2, 3, 4] -> 0 (4 leads nowhere; 0.3 from 3 -> 4:
    # 4, 1, 2, 0: fourth), [1, 2] -> 4 (2 -> 3 and 0.3 from 1 -> 2: 3, 2, 1, 0, 4: fifth)
    valid = transition_metrics(split.valid, split.train_sequences, 6, ks=(1, 5))
    assert_metrics(valid, {"recall@1": 1 / 3, "recall@5": 1.0,
                           "ndcg@5": (1 + 1 / np.log2(5) + 1 / np.log2(6)) / 3})


def test_popularity_ranking_ties_exclusion_and_types():
    counts = np.array([5, 1, 3, 3, 0, 2])
    assert popularity_ranking(counts, 2, 4).tolist() == [[0, 2, 3, 5]] * 2  # 2 and 3 tie: lower row first
    excluded = np.array([[-1, 0], [3, 2]])
    assert popularity_ranking(counts, 2, 4, excluded).tolist() == [[2, 3, 5, 1], [0, 5, 1, 4]]
    # types: 0, 1, 5 are one type (order 0, 5, 1), 2, 3, 4 another (order 2, 3, 4)
    item_types, user_types = np.array([0, 0, 1, 1, 1, 0]), np.array([0, 1, 1])
    assert popularity_ranking(counts, 3, 3, None, item_types, user_types).tolist() == [[0, 5, 1], [2, 3, 4],
                                                                                       [2, 3, 4]]
    excluded = np.array([[0, 2], [3, -1], [2, 3]])  # item 2 is of another type than user 0's
    assert popularity_ranking(counts, 3, 3, excluded, item_types, user_types).tolist() == [
        [5, 1, -1], [2, 4, -1], [4, -1, -1]]
    np.testing.assert_array_equal(padded_rows([{3, 1}, set(), [2]]), [[1, 3], [-1, -1], [2, -1]])
    with pytest.raises(UserError, match="both"):
        popularity_ranking(counts, 3, 3, None, item_types, None)


def test_popularity_metrics_on_a_leave_one_out_split():
    split = leave_one_out([np.array(s) for s in SEQUENCES])
    counts = training_counts(split.train_sequences, 6)
    np.testing.assert_array_equal(counts, [1, 2, 2, 1, 1, 0])
    targets = np.array([e.target for e in split.test])
    assert_metrics(popularity_metrics(counts, targets, (1, 5)), POPULARITY_TEST)
    excluded = padded_rows([e.history for e in split.test])
    assert_metrics(popularity_metrics(counts, targets, (1, 5), excluded), POPULARITY_TEST_EXCLUDED)


def test_quickstart_popularity_baseline_ranks_within_the_asked_type(tmp_path):
    from neo_jax.quickstart import popularity_baseline

    data = tmp_path / "synth"
    assert main(["data", "synth", str(data), "--num-items", "150", "--num-users", "40", "--num-queries", "5"]) == 0
    dataset = load_dataset(data)
    catalog = dataset.catalog
    assert len(catalog.type_names) > 1
    split = leave_one_out(dataset.interactions.sequences())
    counts = np.bincount(np.concatenate(split.train_sequences), minlength=len(catalog))
    targets = np.array([e.target for e in split.valid])
    types = [catalog.type_name(t) for t in targets]
    histories = [set(e.history.tolist()) for e in split.valid]
    for excluded in (None, histories):
        expected = np.full((len(targets), 10), -1)  # one user at a time, by brute force
        for user, name in enumerate(types):
            rows = sorted(catalog.rows_of_type(name), key=lambda r: (-counts[r], r))
            rows = [r for r in rows if excluded is None or r not in excluded[user]][:10]
            expected[user, :len(rows)] = rows
        hits = expected == targets[:, None]
        first = np.where(hits.any(1), hits.argmax(1), 10)
        measured = popularity_baseline(data, targets, types, 10, excluded)
        for k in (5, 10):
            assert measured[f"recall@{k}"] == pytest.approx(np.mean(first < k))
            assert measured[f"ndcg@{k}"] == pytest.approx(np.mean(np.where(first < k, 1 / np.log2(first + 2), 0)))
        # `baseline popularity` asks for each target's type, the same figures
        assert popularity_ranking_metrics(split, catalog, (5, 10), excluded is not None, on="valid") == measured


def write_amazon_layout(directory: Path, sequences: list[list[int]], num_items: int) -> Path:
    directory.mkdir()
    (directory / "items.tsv").write_text("item_id\tasin\n" + "".join(f"{i + 1}\tA{i}\n" for i in range(num_items)),
                                         encoding="utf-8")
    (directory / "sequences.txt").write_text("".join(
        f"{user + 1} " + " ".join(str(i + 1) for i in s) + "\n" for user, s in enumerate(sequences)), encoding="utf-8")
    return directory


@pytest.mark.parametrize("baseline, exclude, expected", [
    ("transition", False, TRANSITION_TEST), ("transition", True, TRANSITION_TEST_EXCLUDED),
    ("popularity", False, POPULARITY_TEST), ("popularity", True, POPULARITY_TEST_EXCLUDED)])
def test_cli_prints_the_metrics_as_one_json_object(tmp_path, capsys, baseline, exclude, expected):
    data = write_amazon_layout(tmp_path / "data", SEQUENCES, 6)
    ks = ",".join(sorted({name.split("@")[1] for name in expected}, key=int))
    argv = ["baseline", baseline, "--data", str(data), "--ks", ks] + (["--exclude-history"] if exclude else [])
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert {k: result[k] for k in ("model", "split", "exclude_history", "users", "items")} == {
        "model": baseline, "split": "test", "exclude_history": exclude, "users": 3, "items": 6}
    assert_metrics(result, expected)
    assert result["wall_seconds"] >= 0


def test_cli_valid_split_and_errors(tmp_path, capsys):
    data = write_amazon_layout(tmp_path / "data", SEQUENCES, 6)
    assert main(["baseline", "transition", "--data", str(data), "--split", "valid", "--ks", "1,5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "valid" and result["recall@1"] == pytest.approx(1 / 3)
    assert main(["baseline", "transition", "--data", str(data), "--ks", "1,7"]) == 2
    assert "k must be in 1 .. 6" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["baseline", "transition", "--data", str(data), "--ks", "five"])
    short = write_amazon_layout(tmp_path / "short", [[0, 1], [1]], 2)
    assert main(["baseline", "transition", "--data", str(short)]) == 2
    assert "no user has the three items" in capsys.readouterr().err
