"""`neo-jax bench rec` end to end on a small generated dataset: every phase runs, the JSON holds the
model's and every baseline's figures under both history protocols, every beam is a catalog item,
and the users are a seeded sample when `eval_users` limits them."""

import json

import numpy as np
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
         "sasrec.epochs=1", "sasrec.model.hidden=16", "sasrec.model.max_len=8",
         "evaluations=2", "select=valid_ndcg@10", "select_users=8",
         "unlikelihood=1.0", "avoid_repeats=true", "avoided_from_level=1", "item_ids=true",
         "item_id_dropout=0.5"]


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
    # model selection: the evaluated model is the one of the best of the 3 validations (steps 0, 2, 4)
    assert result["checkpoint"] == str(root / "run" / "train" / "best")
    assert result["selected"]["metric"] == "valid_ndcg@10" and result["selected"]["step"] in (0, 2, 4)
    repeats = result["history_repeats"]  # history kept: how often the ranking names what the user has
    assert set(repeats) == {"history_first", "history_share@1", "history_share@5"}
    assert 0.0 <= repeats["history_share@5"] <= 1.0 and repeats["history_first"] == repeats["history_share@1"]


def test_avoided_spans_reach_the_records_and_the_training_run(bench):
    import yaml
    from neo_jax.tasks.builders import read_examples
    from neo_jax.tasks.records import TokenizedExample, record_paths
    import grain

    root, _ = bench
    windows = read_examples(root / "run" / "tasks" / "train.jsonl")
    assert windows and all(w.avoid and w.avoid in w.completion for w in windows)
    source = grain.sources.ArrayRecordDataSource(record_paths(root / "run" / "records", "train"))
    record = TokenizedExample.from_bytes(source[0])
    assert record.avoid.size > 0 and record.end.size == 1  # the avoided span, then the eos
    train = yaml.safe_load((root / "run" / "train.yaml").read_text())
    assert (train["unlikelihood"], train["unlikelihood_avoided_from_level"]) == (1.0, 1)
    logged = [json.loads(line) for line in (root / "run" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("unlikelihood", 0.0) > 0.0 for m in logged)


def test_item_identity_rows_learn_for_the_items_training_closes(bench):
    """`item_ids=true`: the random model gets a table of the catalog's rows (row 0 and the padding
    rows stay zero), and the rows of items closed in the training windows move from their zero start."""
    import yaml
    from neo_jax.catalog.item_ids import table_rows
    from neo_jax.catalog.sid_output import load_sid_output
    from neo_jax.checkpoint import load_model
    from neo_jax.config import MeshConfig
    from neo_jax.sharding import make_mesh

    root, _ = bench
    train = yaml.safe_load((root / "run" / "train.yaml").read_text())
    assert train["data"]["sids"] == str(root / "run" / "sids") and train["item_id_dropout"] == 0.5
    n_items = load_sid_output(root / "run" / "sids").trie.n_items
    model = load_model(root / "run" / "train" / "final", make_mesh(MeshConfig()))
    assert model.config.num_item_ids == table_rows(n_items)
    table = np.asarray(model.item_embed[...])  # [rows, embed]
    moved = np.any(table != 0, axis=1)  # [rows]
    assert not moved[0] and not moved[n_items + 1:].any() and moved[1:n_items + 1].any()


def test_rerun_skips_finished_phases_and_reads_back_unchanged_evaluations(bench, capsys, monkeypatch):
    """A rerun measures nothing again while the model and the evaluation settings are the same; a model
    saved anew is evaluated again."""
    import os

    root, result = bench
    config = load_config(RecBenchConfig, None, [f"out={root / 'run'}", *SMALL, "baselines=[popularity]"])

    def measured_again(*args, **kwargs):
        raise AssertionError("an unchanged evaluation was measured again")

    with monkeypatch.context() as patched:
        patched.setattr("neo_jax.eval.recommend.evaluate_recommendations", measured_again)
        patched.setattr("neo_jax.baselines.popularity.popularity_ranking_metrics", measured_again)
        again = run_bench(config, root / "data")
    assert "exists, skipped" in capsys.readouterr().err
    assert not any(phase.startswith(("eval", "baseline")) for phase in again["phase_seconds"])
    for protocol in ("history_kept", "history_excluded"):
        for name in ("model", "popularity"):
            assert again["protocols"][protocol][name] == result["protocols"][protocol][name]
    assert again["valid_item_rate"] == result["valid_item_rate"]

    params = root / "run" / "train" / "best" / "params"  # as if the selected model were saved again
    written = params.stat().st_mtime_ns
    os.utime(params, ns=(written + 1, written + 1))
    resaved = run_bench(config, root / "data")
    assert {"eval model (history_kept)", "eval model (history_excluded)"} <= set(resaved["phase_seconds"])
    assert not any(phase.startswith("baseline") for phase in resaved["phase_seconds"])
    assert resaved["protocols"]["history_kept"]["model"] == result["protocols"]["history_kept"]["model"]


def test_a_pretrained_backbone_is_grounded_then_tuned(tmp_path, tiny_hf_model):
    """`backbone=DIR`: the imported model's own tokenizer, a grounding stage that changes only the
    new rows, then a tuning stage from it; every beam still names a catalog item."""
    import shutil

    import numpy as np

    import jax

    from neo_jax.checkpoint import load_model
    from neo_jax.config import MeshConfig
    from neo_jax.sharding import make_mesh
    from neo_jax.tokenizer import train_sentencepiece

    def weights(directory):  # (embedding rows, the first layer's query kernel)
        model = load_model(directory, make_mesh(MeshConfig(), jax.devices()[:1]))
        return np.asarray(model.embed_tokens[...]), np.asarray(model.layers[0].attn.q_kernel[...])

    assert main(["data", "synth", str(tmp_path / "data"), "--num-items", "150", "--num-users", "50",
                 "--num-queries", "5"]) == 0
    hf_dir = tmp_path / "hf"
    shutil.copytree(tiny_hf_model("llama_tied_mqa"), hf_dir)  # vocabulary 300, context 64
    # the backbone's own tokenizer: at most its 300 rows (256 byte pieces and the header's few characters)
    train_sentencepiece(["task: recommend | type: product | format: ids"] * 20, 300, hf_dir / "tokenizer.model")
    assert main(["import-hf", str(hf_dir), str(tmp_path / "backbone")]) == 0
    settings = [f"out={tmp_path / 'run'}", *SMALL, "item_ids=false", f"backbone={tmp_path / 'backbone'}",
                "grounding_steps=2",
                "steps=2", "seq_len=60", "window=4", "baselines=[popularity]"]
    result = run_bench(load_config(RecBenchConfig, None, settings), tmp_path / "data")
    assert result["valid_item_rate"] == {"history_kept": 1.0, "history_excluded": 1.0}
    assert {"train grounding", "train"} <= set(result["phase_seconds"])
    (backbone_rows, backbone_q), (grounded_rows, grounded_q) = weights(tmp_path / "backbone"), weights(
        tmp_path / "run" / "train_grounding" / "final")
    text_rows = backbone_rows.shape[0]  # the pre-trained rows, before the SID rows were added
    assert grounded_rows.shape[0] > text_rows
    np.testing.assert_array_equal(grounded_rows[:text_rows], backbone_rows)
    np.testing.assert_array_equal(grounded_q, backbone_q)
    assert not np.array_equal(grounded_rows[text_rows:], np.zeros_like(grounded_rows[text_rows:]))
    tuned_q = weights(tmp_path / "run" / "train" / "final")[1]
    assert not np.array_equal(tuned_q, backbone_q)


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(UserError, match="beams"):
        run_bench(load_config(RecBenchConfig, None, [f"out={tmp_path}", "beams=5", "ks=[10]"]), tmp_path)
    with pytest.raises(UserError, match="avoid_repeats penalises its spans at the unlikelihood weight"):
        run_bench(load_config(RecBenchConfig, None, [f"out={tmp_path}", "avoid_repeats=true"]), tmp_path)
    with pytest.raises(UserError, match="unknown baseline"):
        run_bench(load_config(RecBenchConfig, None, [f"out={tmp_path}", "baselines=[bpr]"]), tmp_path)
    with pytest.raises(UserError, match=r"backbone .*nope: no model_config.json, params, tokenizer; import"):
        run_bench(load_config(RecBenchConfig, None, [f"out={tmp_path}", f"backbone={tmp_path / 'nope'}"]), tmp_path)


def test_named_datasets_are_found_beside_the_checkout():
    assert (shared_data_dir("beauty") / "sequences.txt").is_file()


@pytest.mark.parametrize("name", ["bench_rec_cpu.yaml", "bench_rec_accel.yaml"])
def test_the_shipped_recipes_load(name):
    from pathlib import Path

    config = load_config(RecBenchConfig, Path(__file__).resolve().parents[1] / "configs" / name)
    assert config.beams >= max(config.ks) and config.eval_users == 0  # every test user
    assert config.embedding.text_encoder == "minilm" and config.sids.codebook_sizes == (256, 256, 256)
