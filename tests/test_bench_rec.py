"""`neo-jax bench rec` end to end on a small generated dataset: every phase runs, the JSON holds the
model's and every baseline's figures under both history protocols, every beam is a catalog item,
and the users are a seeded sample when `eval_users` limits them."""

import json

import pytest

from neo_jax.bench.rec import RecBenchConfig, run_bench, shared_data_dir
from neo_jax.cli import main
from neo_jax.config import load_config
from neo_jax.errors import UserError

SMALL = ["steps=4", "batch_size=8", "seq_len=128", "window=6", "beams=5", "ks=[1,5]", "eval_batch_size=8",
         "eval_users=12", "text_vocab_size=400", "model.hidden_size=32", "model.intermediate_size=64",
         "model.num_layers=1", "model.head_dim=8", "embedding.text_encoder=hashed_tfidf",
         "embedding.text.dim=32", "embedding.collab.epochs=1", "embedding.collab.dim=8",
         "sids.codebook_sizes=[8,8]", "sids.type_codebook_sizes={brand: [8], creator: [8]}",
         "sasrec.epochs=1", "sasrec.model.hidden=16", "sasrec.model.max_len=8"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    assert main(["data", "synth", str(root / "data"), "--num-items", "150", "--num-users", "50",
                 "--num-queries", "5"]) == 0
    result = run_bench(load_config(RecBenchConfig, None, [f"out={root / 'run'}", *SMALL]), root / "data")
    return root, result


def test_every_phase_reports_and_every_beam_is_an_item(bench):
    root, result = bench
    assert json.loads((root / "run" / "result.json").read_text()) == result
    assert result["test_users"] == 12
    for protocol in ("history_kept", "history_excluded"):
        figures = result["protocols"][protocol]
        assert set(figures) == {"model", "transition", "popularity", "sasrec"}
        for name, metrics in figures.items():
            assert set(metrics) >= {"recall@1", "ndcg@1", "recall@5", "ndcg@5"}, name
            assert 0.0 <= metrics["ndcg@5"] <= metrics["recall@5"] <= 1.0, name
        assert result["valid_item_rate"][protocol] == 1.0  # the constraint: every beam names a catalog item
    assert set(result["phase_seconds"]) >= {"sids", "tasks", "train", "eval model (history_kept)",
                                            "baseline sasrec", "baseline transition (history_excluded)"}
    assert len(result["sids"]["prefix_coherence"]["product"]) >= 1


def test_rerun_skips_finished_phases(bench, capsys):
    root, result = bench
    again = run_bench(load_config(RecBenchConfig, None, [f"out={root / 'run'}", *SMALL, "baselines=[popularity]"]),
                      root / "data")
    assert "exists, skipped" in capsys.readouterr().err
    assert again["protocols"]["history_kept"]["model"] == result["protocols"]["history_kept"]["model"]
    assert again["protocols"]["history_kept"]["popularity"] == result["protocols"]["history_kept"]["popularity"]


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(UserError, match="beams"):
        run_bench(load_config(RecBenchConfig, None, [f"out={tmp_path}", "beams=5", "ks=[10]"]), tmp_path)
    with pytest.raises(UserError, match="unknown baseline"):
        run_bench(load_config(RecBenchConfig, None, [f"out={tmp_path}", "baselines=[bpr]"]), tmp_path)


def test_named_datasets_are_found_beside_the_checkout():
    assert (shared_data_dir("beauty") / "sequences.txt").is_file()
