import numpy as np
import pytest

from neo_jax.errors import UserError
from neo_jax.eval.metrics import ranking_metrics


def test_metrics_by_hand():
    ranked = np.array([[3, 1, 2], [5, 6, -1], [9, 8, 7], [4, -1, -1]])
    targets = np.array([1, 5, 0, 4])
    m = ranking_metrics(ranked, targets, ks=(1, 3))
    assert m["recall@1"] == pytest.approx(2 / 4)
    assert m["recall@3"] == pytest.approx(3 / 4)
    assert m["ndcg@3"] == pytest.approx((1 / np.log2(3) + 1 + 0 + 1) / 4)
    assert m["ndcg@1"] == pytest.approx(2 / 4)


def test_target_repeated_in_list_counts_once_at_first_rank():
    m = ranking_metrics(np.array([[2, 7, 7]]), np.array([7]), ks=(3,))
    assert m["recall@3"] == 1.0 and m["ndcg@3"] == pytest.approx(1 / np.log2(3))


def test_bad_shapes_are_clear_errors():
    with pytest.raises(UserError, match="asked for @10"):
        ranking_metrics(np.zeros((2, 5), int), np.zeros(2, int), ks=(10,))
    with pytest.raises(UserError, match="ranked must be"):
        ranking_metrics(np.zeros(5, int), np.zeros(5, int))


def test_a_limited_evaluation_draws_a_seeded_sample_not_the_first_users():
    from neo_jax.eval.recommend import sample_examples, sample_indices

    users = list(range(1000))
    first = sample_examples(users, 50, seed=3)
    assert first == sample_examples(users, 50, seed=3)  # seeded
    assert first != sample_examples(users, 50, seed=4)
    assert first != users[:50] and len(set(first)) == 50 and first == sorted(first)  # original order, no repeats
    assert max(first) > 500  # drawn from the whole file
    assert sample_examples(users, 0, seed=3) == users == sample_examples(users, 5000, seed=3)
    assert sample_indices(10, 3, seed=0).tolist() == sorted(sample_indices(10, 3, seed=0).tolist())
    with pytest.raises(UserError, match="positive"):
        sample_indices(10, -1, seed=0)


def test_ks_are_parsed_and_checked():
    from neo_jax.eval.recommend import parse_ks

    assert parse_ks("20,1,5,10,5") == (1, 5, 10, 20)
    for bad in ("", "0,5", "five"):
        with pytest.raises(UserError, match="positive integers"):
            parse_ks(bad)
