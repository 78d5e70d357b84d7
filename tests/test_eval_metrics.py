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
