"""Recall/NDCG@K of `ranking_metrics` against values computed by hand, at K = 1, 5, 10, 20, and the
history-repeat shares of `history_repeats`."""

import numpy as np
import pytest

from neo_jax.errors import UserError
from neo_jax.eval.metrics import history_repeats, ranking_metrics

KS = (1, 5, 10, 20)


def one_user(target_rank: int | None, length: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """A ranked list of rows 100, 101, ... with the target (row 7) at 1-based `target_rank` (None: absent)."""
    ranked = np.arange(100, 100 + length)[None, :]
    if target_rank is not None:
        ranked[0, target_rank - 1] = 7
    return ranked, np.array([7])


def test_target_at_rank_one_scores_one_at_every_k():
    m = ranking_metrics(*one_user(1), ks=KS)
    assert m == {f"{name}@{k}": 1.0 for k in KS for name in ("recall", "ndcg")}


def test_target_at_rank_three():
    m = ranking_metrics(*one_user(3), ks=KS)
    assert m["recall@1"] == 0.0 and m["ndcg@1"] == 0.0
    for k in (5, 10, 20):
        assert m[f"recall@{k}"] == 1.0
        assert m[f"ndcg@{k}"] == pytest.approx(0.5)  # 1 / log2(3 + 1)


def test_target_at_rank_twelve_counts_only_at_twenty():
    m = ranking_metrics(*one_user(12), ks=KS)
    assert [m[f"recall@{k}"] for k in KS] == [0.0, 0.0, 0.0, 1.0]
    assert m["ndcg@10"] == 0.0 and m["ndcg@20"] == pytest.approx(1 / np.log2(13))


def test_absent_target_scores_zero():
    m = ranking_metrics(*one_user(None), ks=KS)
    assert all(value == 0.0 for value in m.values())


def test_minus_one_padding_never_matches():
    ranked = np.array([[4, -1, -1, -1, -1], [-1, -1, -1, -1, -1], [2, 9, -1, -1, -1]])
    m = ranking_metrics(ranked, np.array([0, 3, 9]), ks=(1, 5))
    assert m["recall@1"] == 0.0
    assert m["recall@5"] == pytest.approx(1 / 3)
    assert m["ndcg@5"] == pytest.approx((1 / np.log2(3)) / 3)
    with pytest.raises(UserError, match="targets must be catalog rows"):
        ranking_metrics(ranked, np.array([0, -1, 9]), ks=(5,))


def test_target_listed_twice_counts_its_first_position():
    # the target 7 at ranks 2 and 4: recall is 1 (not 2) and NDCG uses rank 2
    m = ranking_metrics(np.array([[5, 7, 6, 7, 8]]), np.array([7]), ks=(1, 5))
    assert m["recall@1"] == 0.0 and m["recall@5"] == 1.0
    assert m["ndcg@5"] == pytest.approx(1 / np.log2(3))


def test_means_over_users():
    ranked = np.stack([one_user(r)[0][0] for r in (1, 3, 7, None)])  # [4 users, 20]
    m = ranking_metrics(ranked, np.full(4, 7), ks=KS)
    assert m["recall@1"] == pytest.approx(1 / 4)
    assert m["recall@5"] == pytest.approx(2 / 4)
    assert m["recall@10"] == m["recall@20"] == pytest.approx(3 / 4)
    assert m["ndcg@5"] == pytest.approx((1 + 0.5) / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 0.5 + 1 / np.log2(8)) / 4)  # rank 7: 1 / log2(8) = 1/3


def test_bad_cutoffs_are_clear_errors():
    ranked, targets = one_user(1, length=10)
    with pytest.raises(UserError, match="asked for @20"):
        ranking_metrics(ranked, targets, ks=KS)
    with pytest.raises(UserError, match="positive cutoffs"):
        ranking_metrics(ranked, targets, ks=(0, 5))
    with pytest.raises(UserError, match="positive cutoffs"):
        ranking_metrics(ranked, targets, ks=())


def test_history_repeats_count_first_places_and_slots():
    ranked = np.array([[5, 1, 2, 3],    # first item is a history item; 2 of the top 2 slots are too
                       [9, 8, 5, -1],   # history {5}: only slot 3; -1 pads never count
                       [7, 6, 4, 3]])   # empty history
    histories = [{5, 1}, {5, -1}, set()]
    m = history_repeats(ranked, histories, ks=(2, 4))
    assert m["history_first"] == pytest.approx(1 / 3)
    assert m["history_share@2"] == pytest.approx(2 / 6)
    assert m["history_share@4"] == pytest.approx(3 / 12)
    with pytest.raises(UserError, match="asked for @5"):
        history_repeats(ranked, histories, ks=(5,))
    with pytest.raises(UserError, match="one history per user"):
        history_repeats(ranked, histories[:2])
