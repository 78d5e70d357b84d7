"""The main job end to end on a small generated catalog: every step runs, the results are real
ranking figures over catalog items, and a second run resumes by skipping finished steps."""

import json

import pytest

from neo_jax.cli import main
from neo_jax.config import load_config
from neo_jax.quickstart import QuickstartConfig, run_quickstart

SMALL = ["synthetic.num_items=200", "synthetic.num_users=60", "synthetic.num_queries=20",
         "grounding_steps=2", "instruct_steps=3", "batch_size=8", "seq_len=256", "eval_users=6", "beams=5",
         "text_vocab_size=400", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1",
         "model.head_dim=8", "sids.type_codebook_sizes={brand: [8], creator: [8]}", "sids.codebook_sizes=[8,8]",
         "embedding.collab.epochs=1"]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "run"
    result = run_quickstart(load_config(QuickstartConfig, None, [f"out={out}", *SMALL]))
    return out, result


def test_every_step_writes_its_output_and_metrics_are_ranking_figures(quickstart):
    out, result = quickstart
    for step in ("data", "sids", "tasks", "tasks_grounding", "tokenizer", "records_tasks", "train_grounding",
                 "train_instruct"):
        assert (out / step).is_dir(), step
    assert json.loads((out / "result.json").read_text()) == result
    model = result["model"]
    assert result["users"] == 6 and result["eval_split"] == "valid" and model["users"] == 6
    for name in ("recall@5", "ndcg@5"):
        assert 0.0 <= model[name] <= 1.0 and 0.0 <= result["popularity_baseline"][name] <= 1.0
    assert model["ndcg@5"] <= model["recall@5"]
    assert model["beams_naming_an_item"] == 1.0  # ID mode under the constraint: every beam is a catalog item
    # the quickstart's own embedding (text fused with collaborative, 128 + 32 dimensions), which
    # the override of one of its settings (embedding.collab.epochs) keeps
    assert json.loads((out / "sids" / "summary.json").read_text())["embedding"] == {"source": "fused", "dim": 160}


def test_language_figures_are_shares_and_perplexities(quickstart):
    _, result = quickstart
    language = result["language"]
    assert language["sid_to_text"]["items"] == 100  # language_items, of 200 generated items
    assert 0.0 <= language["sid_to_text"]["exact_match"] <= language["sid_to_text"]["word_f1"] <= 1.0
    unconstrained = language["unconstrained"]
    assert unconstrained["prompts"] == 50 and unconstrained["beams"] == 5
    for name in ("asked_type", "asked_format", "valid_sid_rate", "asked_format.ids", "asked_format.text",
                 "asked_format.mixed"):
        assert 0.0 <= unconstrained[name] <= 1.0, name
    for name in ("perplexity", "perplexity_before"):
        assert language[name]["texts"] == 40 and language[name]["perplexity"] > 1.0


def test_eval_language_command_reproduces_the_quickstart_figures(quickstart, capsys):
    out, result = quickstart
    code = main(["eval", "language", "--ckpt", result["checkpoint"], "--base-ckpt", str(out / "train_grounding" / "final"),
                 "--sids", str(out / "sids"), "--tokenizer", str(out / "tokenizer"), "--data", str(out / "data"),
                 "--examples", str(out / "tasks" / "valid.jsonl"), "--items", "100", "--users", "50"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name in ("sid_to_text", "unconstrained", "perplexity_before"):
        assert printed[name] == pytest.approx(result["language"][name]), name
    assert printed["perplexity"]["perplexity"] == pytest.approx(result["language"]["perplexity"]["perplexity"])


def test_second_run_skips_finished_steps(quickstart, capsys):
    out, result = quickstart
    assert main(["quickstart", f"out={out}", *SMALL]) == 0
    log = capsys.readouterr()
    assert "data: " in log.err and "exists, skipped" in log.err
    assert json.loads(log.out.strip().splitlines()[-1])["model"] == result["model"]


def test_unknown_setting_is_named():
    assert main(["quickstart", "instruct_stesp=3"]) == 2


def test_the_printed_generate_command_runs_with_only_the_checkpoint_and_names_titled_items(quickstart, capsys):
    import shlex
    import subprocess
    import sys

    out, result = quickstart
    assert main(["quickstart", f"out={out}", *SMALL]) == 0
    err = capsys.readouterr().err
    examples = [line for line in err.splitlines() if "] example: " in line]
    assert len(examples) == 3 and all('"' in line and "held out: " in line for line in examples)
    scale = [line for line in err.splitlines() if "] scale: " in line]  # honest about what it is
    assert len(scale) == 1 and "M-parameter decoder from random weights, 2 + 3 training steps, 6 evaluated" in scale[0]
    printed = [line.split("next: ", 1)[1] for line in err.splitlines() if "] next: neo-jax generate " in line]
    assert len(printed) == 1
    # The words bash makes of the printed line, the program name replaced by a printer of its arguments.
    printer = shlex.quote(sys.executable) + " -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"
    words = subprocess.run(["bash", "-c", printer + printed[0][len("neo-jax"):]], capture_output=True, text=True,
                           check=True).stdout
    argv = json.loads(words)
    assert argv[:2] == ["generate", "--ckpt"] and "--sids" not in argv and "--data" not in argv
    assert main(argv) == 0, capsys.readouterr().err
    beams = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["beams"]
    items = [item for beam in beams for item in beam["items"]]
    assert items and all(item is not None and item["title"] for item in items)
