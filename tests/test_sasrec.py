"""SASRec baseline: causality, padding invariance, history exclusion, learning a sequential
pattern better than popularity, and the `neo-jax baseline sasrec` command."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neo_jax.baselines.sasrec import SasRec, SasRecConfig, next_item_loss, top_items
from neo_jax.baselines.train import RankingInputs, TrainingWindows, epoch_batches, left_padded
from neo_jax.cli import main
from neo_jax.data.splits import SequenceExample

NUM_ITEMS = 30
CONFIG = SasRecConfig(max_len=8, hidden=16, blocks=2, heads=2, dropout=0.3)


@pytest.fixture(scope="module")
def model() -> SasRec:
    return SasRec(NUM_ITEMS, CONFIG, nnx.Rngs(params=0))


def write_sequential_dataset(directory: Path, num_items: int = 120, num_users: int = 400, follow: float = 0.9,
                             seed: int = 0) -> Path:
    """An Amazon-2014-layout dataset where the next item is a fixed successor of the last one 90% of the time."""
    rng = np.random.default_rng(seed)
    successor = rng.permutation(num_items)  # [num_items]
    directory.mkdir(parents=True)
    (directory / "items.tsv").write_text("item_id\tasin\ttitle\n" + "".join(
        f"{i + 1}\tA{i:04d}\titem {i}\n" for i in range(num_items)), encoding="utf-8")
    lines = []
    for user in range(num_users):
        sequence = [int(rng.integers(num_items))]
        for _ in range(int(rng.integers(7, 12))):
            follows = rng.random() < follow
            sequence.append(int(successor[sequence[-1]]) if follows else int(rng.integers(num_items)))
        lines.append(f"{user + 1} " + " ".join(str(i + 1) for i in sequence))
    (directory / "sequences.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def test_changing_a_later_item_never_changes_earlier_scores(model):
    rows = jnp.asarray(np.random.default_rng(0).integers(0, NUM_ITEMS, (3, 8)), jnp.int32)  # [batch, len]
    scores = model.item_scores(model(rows + 1))  # [batch, len, items]
    for t in range(8):
        changed = rows.at[:, t].set((rows[:, t] + 7) % NUM_ITEMS)
        changed_scores = model.item_scores(model(changed + 1))
        np.testing.assert_allclose(changed_scores[:, :t], scores[:, :t], rtol=1e-5, atol=1e-5)
        assert np.abs(np.asarray(changed_scores[:, t] - scores[:, t])).max() > 1e-3


def test_padding_never_affects_outputs(model):
    history = np.array([4, 17, 2, 9, 9], np.int32)
    short = jnp.asarray(left_padded([history], 5)) + 1  # [1, 5] no padding
    padded = jnp.asarray(left_padded([history, history[:2]], 8)) + 1  # [2, 8] 3 and 6 padding slots
    hidden_short, hidden_padded = model(short), model(padded)  # [1, 5, hidden], [2, 8, hidden]
    np.testing.assert_allclose(hidden_padded[0, 3:], hidden_short[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hidden_padded[1, 6:], hidden_short[0, :2], rtol=1e-5, atol=1e-5)
    assert not np.asarray(hidden_padded[0, :3]).any() and not np.asarray(hidden_padded[1, :6]).any()
    assert np.isfinite(np.asarray(hidden_padded)).all()


def test_loss_counts_only_real_targets(model):
    windows = TrainingWindows.of([np.array([1, 2, 3]), np.array([5, 6, 7, 8, 9, 10])], CONFIG.max_len)
    inputs, targets = jnp.asarray(windows.inputs[:2]), jnp.asarray(windows.targets[:2])  # [2, max_len]
    np.testing.assert_array_equal(windows.lengths, [2, 5])
    np.testing.assert_array_equal(windows.targets[0, -2:], [2, 3])
    logits = model.item_scores(model(jnp.where(inputs >= 0, inputs + 1, 0)))  # [2, max_len, items]
    log_probs = jax.nn.log_softmax(logits)
    real = np.asarray(targets) >= 0
    expected = -np.mean(np.asarray(jnp.take_along_axis(log_probs, jnp.maximum(targets, 0)[..., None], -1))[real])
    np.testing.assert_allclose(next_item_loss(model, inputs, targets, rngs=None), expected, rtol=1e-5)
    # the all-padding row that fills short batches adds nothing
    with_padding_row = next_item_loss(model, jnp.asarray(windows.inputs), jnp.asarray(windows.targets), None)
    np.testing.assert_allclose(with_padding_row, expected, rtol=1e-5)


def test_history_exclusion_masks_exactly_the_history():
    rng = np.random.default_rng(1)
    examples = [SequenceExample(0, np.array([3, 11, 3, 25], np.int32), 7, 4),
                SequenceExample(1, np.array([0], np.int32), 29, 1),
                SequenceExample(2, rng.choice(NUM_ITEMS, 12, replace=False).astype(np.int32), 1, 12)]
    inputs = RankingInputs.of(examples, max_len=8, exclude_history=True)
    scores = jnp.asarray(rng.normal(size=(3, NUM_ITEMS)), jnp.float32)  # [users, items]
    ranked = np.asarray(top_items(scores, jnp.asarray(inputs.excluded), NUM_ITEMS - 12))  # [users, k]
    for row, example in enumerate(examples):
        kept = np.setdiff1d(np.arange(NUM_ITEMS), example.history)
        best_first = kept[np.argsort(-np.asarray(scores[row])[kept])]
        np.testing.assert_array_equal(ranked[row], best_first[: NUM_ITEMS - 12])
    assert RankingInputs.of(examples, max_len=8, exclude_history=False).excluded.shape == (3, 0)
    np.testing.assert_array_equal(inputs.history[0], [-1, -1, -1, -1, 3, 11, 3, 25])
    np.testing.assert_array_equal(inputs.history[2], examples[2].history[-8:])


def test_epoch_batches_cover_every_user_once():
    lengths = np.random.default_rng(2).integers(1, 50, 1000)
    batches = epoch_batches(lengths, 64, np.random.default_rng(3))
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(1000))
    assert max(len(b) for b in batches) == 64


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sasrec")
    data = write_sequential_dataset(root / "data")
    argv = ["baseline", "sasrec", "--data", str(data), "--out", str(root / "run"), "epochs=12", "eval_every=4",
            "model.max_len=12", "model.hidden=32", "model.blocks=1", "model.dropout=0.1", "learning_rate=0.01"]
    assert main(argv) == 0
    return root / "run"


def test_cli_writes_result_with_best_epoch_metrics(trained_run):
    result = json.loads((trained_run / "result.json").read_text())
    assert (trained_run / "config.yaml").is_file()
    assert result["users"] == {"valid": 400, "test": 400} and result["exclude_history"] is True
    for split in ("valid", "test"):
        assert set(result[split]) == {"recall@5", "ndcg@5", "recall@10", "ndcg@10"}
        assert set(result["popularity_baseline"][split]) == set(result[split])
    best = max(result["history"], key=lambda h: h["valid"]["ndcg@10"])
    assert result["best_epoch"] == best["epoch"] and result["valid"] == best["valid"]


def test_training_learns_the_sequence_and_beats_popularity(trained_run):
    result = json.loads((trained_run / "result.json").read_text())
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < 0.7 * losses[0]
    popularity = result["popularity_baseline"]["test"]
    # 90% of next items are the last item's fixed successor: a sequential model finds most of them
    assert result["test"]["recall@10"] > 0.6 > popularity["recall@10"] + 0.4
    assert result["test"]["ndcg@10"] > popularity["ndcg@10"] + 0.4


def test_cli_rejects_bad_input(tmp_path, capsys):
    def error_of(*argv: str) -> str:
        assert main(["baseline", "sasrec", *argv]) == 2
        return capsys.readouterr().err

    missing = tmp_path / "missing"
    assert f"{missing}: not a directory" in error_of("--data", str(missing), "--out", str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()
    data = write_sequential_dataset(tmp_path / "data", num_users=5)
    out = str(tmp_path / "b")
    assert "model.hidden (30) must be a multiple of model.heads (4)" in error_of(
        "--data", str(data), "--out", out, "model.hidden=30", "model.heads=4")
    assert "model.dropout must be in [0, 1)" in error_of("--data", str(data), "--out", out, "model.dropout=1.5")
    assert "learning_rate must be positive" in error_of("--data", str(data), "--out", out, "learning_rate=0")
    assert "did you mean 'epochs'" in error_of("--data", str(data), "--out", out, "epoch=3")
    short = tmp_path / "short"
    short.mkdir()
    (short / "items.tsv").write_text("item_id\tasin\n1\tA1\n2\tA2\n", encoding="utf-8")
    (short / "sequences.txt").write_text("1 1 2\n2 2\n", encoding="utf-8")  # no user has three items
    assert "no user has the three items" in error_of("--data", str(short), "--out", out)
    (tmp_path / "exists").mkdir()
    assert "already exists" in error_of("--data", str(data), "--out", str(tmp_path / "exists"))
