"""`neo-jax report`: a Markdown page with PNG plots of bench rec, train and quickstart run directories."""

import json
import re

import pytest

from neo_jax.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KS = (1, 5, 10, 20)
METHODS = {"model": 0.040, "transition": 0.070, "popularity": 0.010, "sasrec": 0.055}  # recall@1 per method


def ranking(base: float) -> dict[str, float]:
    out = {}
    for i, k in enumerate(KS):
        out[f"recall@{k}"] = round(base * (1 + i), 5)
        out[f"ndcg@{k}"] = round(base * (1 + 0.5 * i), 5)
    return out


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def train_records(steps=(0, 10, 20, 30)):
    records = []
    for step in steps:
        record = {"step": step, "time": 1.0 + step}
        if step:
            record.update(loss=5.0 / step, learning_rate=1e-3, tokens_per_s=1000.0 + step)
        if step % 20 == 0:
            record.update(valid_loss=6.0 / (step + 1), **{"valid_recall@10": 0.01 * step})
        records.append(record)
    return records


def fake_bench(root):
    protocols = {p: {m: ranking(base + shift) for m, base in METHODS.items()}
                 for p, shift in (("history_kept", 0.0), ("history_excluded", 0.001))}
    result = {"dataset": "/data/beauty", "out": str(root), "test_users": 400, "beams": 20, "protocols": protocols,
              "valid_item_rate": {"history_kept": 0.995, "history_excluded": 1.0},
              "sids": {"collision_rate_before": 0.0076, "collision_rate_after": 0.0,
                       "codebook_use": {"product": [1.0, 0.5, 0.25]}, "prefix_coherence": {"product": [0.38, 0.46]}},
              "phase_seconds": {"sids": 127.7, "train": 860.7, "eval model (history_kept)": 83.5},
              "checkpoint": str(root / "train" / "final")}
    root.mkdir(parents=True)
    (root / "result.json").write_text(json.dumps(result), encoding="utf-8")
    write_jsonl(root / "train" / "metrics.jsonl", train_records())
    history = [{"epoch": e, "loss": 8.0 / e, "valid": ranking(0.01 * e), "epoch_seconds": 1.0} for e in (1, 2, 3)]
    (root / "sasrec_result.json").write_text(json.dumps({"best_epoch": 3, "epochs_run": 3, "history": history,
                                                         "test_protocols": {p: m["sasrec"] for p, m in protocols.items()}}))
    return result


def pngs_of(report_dir, markdown):
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", markdown)
    assert linked, "the report links no figure"
    for name in linked:
        assert (report_dir / name).read_bytes()[:8] == PNG_SIGNATURE, name
    return linked


def run_report(argv, capsys):
    assert main(["report", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_rec_report(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run_dir = tmp_path / "bench"
    result = fake_bench(run_dir)
    printed = run_report([run_dir], capsys)
    report_dir = run_dir / "report"
    assert printed["report"] == str(report_dir / "report.md")
    markdown = (report_dir / "report.md").read_text(encoding="utf-8")
    linked = pngs_of(report_dir, markdown)
    assert sorted(printed["figures"]) == sorted(str(report_dir / n) for n in linked)
    assert {"loss_train.png", "ranking_history_kept.png", "ranking_history_excluded.png",
            "sasrec_training.png"} <= set(linked)
    for name in ("model (generative)", "SASRec", "transition", "popularity", "`history_kept`", "`history_excluded`"):
        assert name in markdown, name
    for protocol, methods in result["protocols"].items():
        section = markdown.split(f"### `{protocol}`")[1].split("###")[0]
        for method, metrics in methods.items():
            assert f"{metrics['recall@10']:.4f}" in section, (protocol, method)
            assert f"{metrics['ndcg@20']:.4f}" in section, (protocol, method)
    assert "0.9950 (99.50%)" in markdown  # valid-item rate
    assert "860.7" in markdown and "14:20" in markdown  # the train phase, in seconds and as a duration
    assert "1.0000, 0.5000, 0.2500" in markdown  # codebook use per level
    assert "`/data/beauty`" in markdown  # the rest of result.json
    assert "Per-task metrics" in markdown and "None present" in markdown
    assert "**missing**" not in markdown

    # A rerun replaces the earlier report; an --out that is not a report is refused.
    run_report([run_dir], capsys)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    assert main(["report", str(run_dir), "--out", str(tmp_path / "other")]) == 2
    assert "not an earlier report" in capsys.readouterr().err
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"


def test_bench_without_sasrec_says_so(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run_dir = tmp_path / "bench"
    fake_bench(run_dir)
    (run_dir / "sasrec_result.json").unlink()
    data = json.loads((run_dir / "result.json").read_text())
    for methods in data["protocols"].values():
        del methods["sasrec"]
    (run_dir / "result.json").write_text(json.dumps(data))
    printed = run_report([run_dir, "--out", tmp_path / "out"], capsys)
    markdown = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "sasrec_result.json" in printed["missing"]
    assert "| `sasrec_result.json` | **missing** |" in markdown
    assert "SASRec" in markdown.split("## Training")[0]  # named among the missing inputs
    pngs_of(tmp_path / "out", markdown)


def test_train_run_and_per_task_metrics(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run_dir = tmp_path / "train_run"
    records = train_records()
    for r in records[1:]:
        r.update(loss_recommend=r["loss"] * 1.1, loss_search=r["loss"] * 0.9)
    write_jsonl(run_dir / "metrics.jsonl", records)
    run_report([run_dir], capsys)
    markdown = (run_dir / "report" / "report.md").read_text(encoding="utf-8")
    linked = pngs_of(run_dir / "report", markdown)
    assert "loss_train_run.png" in linked and "per_task_train_run.png" in linked
    assert "| `result.json` | **missing** |" in markdown
    assert "| recommend | `loss_recommend` |" in markdown and "| search | `loss_search` |" in markdown
    assert "No test metrics" in markdown


def test_quickstart_report(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run_dir = tmp_path / "qs"
    run_dir.mkdir()
    model = {"recall@5": 0.12, "ndcg@5": 0.08, "recall@10": 0.2, "ndcg@10": 0.1, "users": 300,
             "beams_naming_an_item": 1.0}
    (run_dir / "result.json").write_text(json.dumps({"eval_split": "valid", "users": 300, "exclude_history": False,
                                                     "model": model, "popularity_baseline": ranking(0.01)}))
    write_jsonl(run_dir / "train_grounding" / "metrics.jsonl", train_records())
    write_jsonl(run_dir / "train_instruct" / "metrics.jsonl", train_records())
    run_report([run_dir], capsys)
    markdown = (run_dir / "report" / "report.md").read_text(encoding="utf-8")
    linked = pngs_of(run_dir / "report", markdown)
    assert {"loss_train_grounding.png", "loss_train_instruct.png", "ranking_history_kept.png"} <= set(linked)
    assert "0.2000" in markdown and "neo-jax quickstart" in markdown
    assert "| `result.json: history_excluded` | **missing** |" in markdown


def test_empty_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nothing to report" in err and "result.json" in err and "metrics.jsonl" in err
    assert not (tmp_path / "report").exists()
