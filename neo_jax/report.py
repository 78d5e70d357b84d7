"""`neo-jax report RUN_DIR [--out DIR]`: a Markdown page with PNG plots of a run directory.

RUN_DIR is the output of `neo-jax bench rec` (result.json, train/metrics.jsonl and, when SASRec
ran, sasrec_result.json), of `neo-jax quickstart` (result.json, train_grounding/ and
train_instruct/metrics.jsonl), of `neo-jax baseline sasrec` (result.json with the epoch history)
or a plain `neo-jax train` run directory (metrics.jsonl). Whatever of these is present is read;
the page says what was missing.

The page (DIR/report.md, default RUN_DIR/report) holds: per training stage, train loss and
validation loss against step on one axis; per history protocol, test Recall@K and NDCG@K against
K for the model and every baseline; tables of every figure in result.json (by method and
protocol, the valid-item rate, the SID figures, phase wall times); and per-task metrics where
the run has any. DIR is written atomically and replaced on a rerun (only if it holds a report).
Prints one JSON line with the written paths.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neo_jax.atomic import atomic_output_dir
from neo_jax.errors import UserError
from neo_jax.json_file import read_json_object
from neo_jax.plot import (TRAIN_LOSS, VALID_LOSS, Series, collect_series, draw_curve, draw_loss_curves, pyplot,
                          save_figure)
from neo_jax.tasks.builders import TASKS
from neo_jax.train.monitor import METRICS_FILE, format_duration, read_metrics

REPORT_FILE = "report.md"
RESULT_FILE = "result.json"
SASREC_FILE = "sasrec_result.json"
PROTOCOLS = {"history_kept": "history items kept in the ranking",
             "history_excluded": "history items excluded from the ranking"}
METHOD_ORDER = ("model", "sasrec", "transition", "popularity")
METHOD_NAMES = {"model": "model (generative)", "sasrec": "SASRec", "transition": "transition",
                "popularity": "popularity"}
METHOD_COLORS = {"model": "tab:red", "sasrec": "tab:blue", "transition": "tab:green", "popularity": "tab:gray"}
BENCH_BASELINES = ("sasrec", "transition", "popularity")
RANKING_KEY = re.compile(r"^(recall|ndcg)@(\d+)$")
TASK_KEY = re.compile(r"(?:^|[^a-z])(" + "|".join(sorted(TASKS, key=len, reverse=True)) + r")(?:$|[^a-z])")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("run_dir", type=Path, help="a `bench rec`, `quickstart`, `baseline sasrec` or `train` output")
    parser.add_argument("--out", type=Path, default=None, help="the report directory (default RUN_DIR/report)")


# ---------------------------------------------------------------- reading the run directory


@dataclass
class Stage:
    name: str  # the directory holding metrics.jsonl, relative to RUN_DIR ('.' for RUN_DIR itself)
    records: int
    series: Series


@dataclass
class Inputs:
    run_dir: Path
    kind: str
    result: dict[str, Any] | None
    stages: list[Stage]
    protocols: dict[str, dict[str, dict[str, float]]]  # protocol -> method -> {"recall@10": ...}
    valid_item_rate: dict[str, float]
    sasrec: dict[str, Any] | None  # a SASRec result with its per-evaluation `history`
    sasrec_source: str | None
    consumed: set[str] = field(default_factory=set)  # result.json paths a section already shows
    found: list[tuple[str, str]] = field(default_factory=list)  # (input, what it holds)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (input, what that leaves out)


def ranking_metrics(metrics: Any) -> dict[str, float]:
    """The `recall@K` / `ndcg@K` entries of a metrics dict."""
    if not isinstance(metrics, dict):
        return {}
    return {k: float(v) for k, v in metrics.items() if RANKING_KEY.match(k) and _is_number(v)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _stages(run_dir: Path) -> list[Stage]:
    dirs = [run_dir] + sorted(p for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    stages = []
    for directory in dirs:
        if (directory / METRICS_FILE).is_file():
            records = [r for r in read_metrics(directory) if isinstance(r, dict) and "step" in r]
            name = "." if directory == run_dir else directory.name
            stages.append(Stage(name, len(records), collect_series(records)))
    return stages


def _metrics_path(stage: Stage) -> str:
    return METRICS_FILE if stage.name == "." else f"{stage.name}/{METRICS_FILE}"


def read_inputs(run_dir: Path) -> Inputs:
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory")
    result = read_json_object(run_dir / RESULT_FILE) if (run_dir / RESULT_FILE).is_file() else None
    sasrec_file = read_json_object(run_dir / SASREC_FILE) if (run_dir / SASREC_FILE).is_file() else None
    stages = _stages(run_dir)
    if result is None and sasrec_file is None and not stages:
        raise UserError(f"{run_dir}: nothing to report: no {RESULT_FILE}, {METRICS_FILE}, */{METRICS_FILE} or "
                        f"{SASREC_FILE} (expected the output of `neo-jax bench rec`, `neo-jax quickstart`, "
                        "`neo-jax baseline sasrec` or `neo-jax train`)")
    inputs = Inputs(run_dir, "training run", result, stages, {}, {}, None, None)
    if result is not None:
        _read_result(inputs, result)
    if sasrec_file is not None:
        inputs.sasrec, inputs.sasrec_source = sasrec_file, SASREC_FILE
        inputs.found.append((SASREC_FILE, f"SASRec: {len(sasrec_file.get('history', []))} evaluations"))
        for protocol, metrics in (sasrec_file.get("test_protocols") or {}).items():
            methods = inputs.protocols.setdefault(protocol, {})
            if "sasrec" not in methods and ranking_metrics(metrics):
                methods["sasrec"] = ranking_metrics(metrics)
                inputs.found.append((SASREC_FILE, f"SASRec test metrics ({protocol}), absent from {RESULT_FILE}"))
    for stage in stages:
        steps = sorted({s for steps, _ in stage.series.values() for s in steps})
        span = f"steps {steps[0]}-{steps[-1]}" if steps else "no numeric metrics yet"
        inputs.found.append((_metrics_path(stage), f"{stage.records} records, {span}"))
    _note_missing(inputs)
    return inputs


def _read_result(inputs: Inputs, result: dict[str, Any]) -> None:
    if isinstance(result.get("protocols"), dict):
        inputs.kind = "neo-jax bench rec"
        for protocol, methods in result["protocols"].items():
            if isinstance(methods, dict):
                inputs.protocols[protocol] = {m: ranking_metrics(v) for m, v in methods.items() if ranking_metrics(v)}
                inputs.consumed.update(f"protocols.{protocol}.{m}.{k}" for m in inputs.protocols[protocol]
                                       for k in inputs.protocols[protocol][m])
        rates = result.get("valid_item_rate")
        if isinstance(rates, dict):
            inputs.valid_item_rate = {p: float(v) for p, v in rates.items() if _is_number(v)}
            inputs.consumed.update(f"valid_item_rate.{p}" for p in inputs.valid_item_rate)
    elif isinstance(result.get("model"), dict):
        inputs.kind = "neo-jax quickstart"
        protocol = "history_excluded" if result.get("exclude_history") else "history_kept"
        methods = {"model": ranking_metrics(result["model"]),
                   "popularity": ranking_metrics(result.get("popularity_baseline"))}
        inputs.protocols[protocol] = {m: v for m, v in methods.items() if v}
        inputs.consumed.update(f"model.{k}" for k in methods["model"])
        inputs.consumed.update(f"popularity_baseline.{k}" for k in methods["popularity"])
        if _is_number(result["model"].get("beams_naming_an_item")):
            inputs.valid_item_rate[protocol] = float(result["model"]["beams_naming_an_item"])
            inputs.consumed.add("model.beams_naming_an_item")
    elif isinstance(result.get("test_protocols"), dict):
        inputs.kind = "neo-jax baseline sasrec"
        for protocol, metrics in result["test_protocols"].items():
            if ranking_metrics(metrics):
                inputs.protocols[protocol] = {"sasrec": ranking_metrics(metrics)}
                inputs.consumed.update(f"test_protocols.{protocol}.{k}" for k in ranking_metrics(metrics))
        if isinstance(result.get("history"), list):
            inputs.sasrec, inputs.sasrec_source = result, RESULT_FILE
            inputs.consumed.add("history")
    else:
        inputs.kind = "unrecognised result.json"
    methods = sorted({m for ms in inputs.protocols.values() for m in ms})
    what = (f"{inputs.kind} result: protocols {', '.join(inputs.protocols)}; methods {', '.join(methods)}"
            if inputs.protocols else f"{inputs.kind}: no Recall/NDCG figures found")
    inputs.found.append((RESULT_FILE, what))


def _note_missing(inputs: Inputs) -> None:
    names = {s.name for s in inputs.stages}
    if inputs.result is None:
        inputs.missing.append((RESULT_FILE, "no test Recall/NDCG, valid-item rate, SID figures or phase times "
                                            "(a `neo-jax train` run directory has none; `bench rec` and "
                                            "`quickstart` write it at the end)"))
    if inputs.kind == "neo-jax bench rec":
        if "train" not in names:
            inputs.missing.append((f"train/{METRICS_FILE}", "no training curve of the model"))
        if inputs.sasrec is None:
            inputs.missing.append((SASREC_FILE, "no SASRec training curve (the bench ran without SASRec)"))
        for name in BENCH_BASELINES:
            absent = [p for p in inputs.protocols if name not in inputs.protocols[p]]
            if absent:
                inputs.missing.append((f"{RESULT_FILE}: {METHOD_NAMES[name]}",
                                       f"this baseline was not run ({', '.join(absent)}), so it is in no figure "
                                       "or table"))
    if inputs.kind == "neo-jax quickstart":
        for name in ("train_grounding", "train_instruct"):
            if name not in names:
                inputs.missing.append((f"{name}/{METRICS_FILE}", f"no training curve of the {name[6:]} stage"))
    if inputs.protocols:
        for protocol in PROTOCOLS:
            if protocol not in inputs.protocols:
                inputs.missing.append((f"{RESULT_FILE}: {protocol}",
                                       f"the run did not evaluate with {PROTOCOLS[protocol]}"))
    if not inputs.stages and inputs.result is not None and inputs.kind != "neo-jax baseline sasrec":
        inputs.missing.append((f"*/{METRICS_FILE}", "no training curves"))
    for stage in inputs.stages:
        if stage.series and VALID_LOSS not in stage.series:
            inputs.missing.append((f"{_metrics_path(stage)}: valid_loss", "no validation loss in this stage"))


# ---------------------------------------------------------------- formatting


def fmt(value: Any) -> str:
    """A figure as a table cell: floats to 4 decimals, lists and small dicts inline."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4f}"
    if isinstance(value, list):
        return ", ".join(fmt(v) for v in value) if len(value) <= 16 else f"[{len(value)} values]"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {fmt(v)}" for k, v in value.items())
    if value is None:
        return "–"
    return f"`{value}`" if isinstance(value, str) else str(value)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    escape = lambda cell: str(cell).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]


def _metric_sort_key(name: str) -> tuple[int, int]:
    kind, k = RANKING_KEY.match(name).groups()
    return int(k), 0 if kind == "recall" else 1


def _metric_title(name: str) -> str:
    kind, k = RANKING_KEY.match(name).groups()
    return f"{'Recall' if kind == 'recall' else 'NDCG'}@{k}"


def _ordered_methods(methods: dict[str, Any]) -> list[str]:
    known = [m for m in METHOD_ORDER if m in methods]
    return known + sorted(m for m in methods if m not in METHOD_ORDER)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "run"


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """`dotted.path -> leaf` of nested dicts; lists of scalars stay one leaf, lists of dicts get indices."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        out = {}
        for i, item in enumerate(value):
            out.update(flatten(item, f"{prefix}.{i}"))
        return out
    return {prefix: value}


# ---------------------------------------------------------------- the page


class Report:
    def __init__(self, inputs: Inputs, out_dir: Path):
        self.inputs, self.out_dir, self.plt = inputs, out_dir, pyplot()
        self.lines: list[str] = []
        self.figures: list[str] = []

    def figure(self, fig, name: str, alt: str) -> None:
        save_figure(fig, self.out_dir / name)
        self.figures.append(name)
        self.lines += [f"![{alt}]({name})", ""]

    def write(self) -> str:
        inputs = self.inputs
        self.lines += [f"# Report: `{inputs.run_dir.name}`", "",
                       f"Run directory `{inputs.run_dir}`, read as **{inputs.kind}** output.", ""]
        self.inputs_section()
        self.training_section()
        self.sasrec_section()
        self.ranking_section()
        self.result_tables()
        self.per_task_section()
        self.other_figures()
        return "\n".join(self.lines).rstrip() + "\n"

    def inputs_section(self) -> None:
        self.lines += ["## Inputs", ""]
        rows = [[f"`{name}`", "found", what] for name, what in self.inputs.found]
        rows += [[f"`{name}`", "**missing**", what] for name, what in self.inputs.missing]
        self.lines += table(["input", "status", "what it holds / what is missing without it"], rows) + [""]

    # -- 1. training curves

    def training_section(self) -> None:
        self.lines += ["## Training", ""]
        if not self.inputs.stages:
            self.lines += [f"No training stage found (no `{METRICS_FILE}` in the run directory or a subdirectory).",
                           ""]
            return
        summary = []
        for stage in self.inputs.stages:
            label = self.inputs.run_dir.name if stage.name == "." else stage.name
            self.lines += [f"### Stage `{label}` (`{_metrics_path(stage)}`)", ""]
            series = stage.series
            if TRAIN_LOSS in series or VALID_LOSS in series:
                fig, ax = self.plt.subplots(figsize=(8, 4.5))
                draw_loss_curves(ax, series, f"{label}: train and validation loss")
                self.figure(fig, f"loss_{_safe(label)}.png", f"{label}: train and validation loss against step")
            else:
                self.lines += ["No `loss` or `valid_loss` in this stage.", ""]
            valid_metrics = sorted(k for k in series if k.startswith("valid_") and k != VALID_LOSS
                                   and not TASK_KEY.search(k))
            if valid_metrics:
                fig, ax = self.plt.subplots(figsize=(8, 4))
                for key in valid_metrics:
                    draw_curve(ax, *series[key], label=key[len("valid_"):], marker="o")
                ax.set_ylabel("validation metric")
                ax.set_title(f"{label}: validation metrics")
                ax.legend()
                self.figure(fig, f"valid_metrics_{_safe(label)}.png", f"{label}: validation metrics against step")
            summary.append(self._stage_row(label, series, valid_metrics))
        self.lines += ["Stage summary (last logged values; tokens/s is the median over logged steps):", ""]
        self.lines += table(["stage", "last step", "train loss", "valid loss", "best valid loss (step)",
                             "tokens/s", "learning rate", "validation metrics"], summary) + [""]

    @staticmethod
    def _stage_row(label: str, series: Series, valid_metrics: list[str]) -> list[str]:
        def last(key: str) -> str:
            return fmt(series[key][1][-1]) if key in series else "–"

        steps = sorted({s for stage_steps, _ in series.values() for s in stage_steps})
        best = "–"
        if VALID_LOSS in series:
            value, step = min(zip(series[VALID_LOSS][1], series[VALID_LOSS][0]))
            best = f"{fmt(value)} ({step})"
        speed = fmt(statistics.median(series["tokens_per_s"][1])) if "tokens_per_s" in series else "–"
        lr = f"{series['learning_rate'][1][-1]:.3g}" if "learning_rate" in series else "–"
        valid = "; ".join(f"{k[len('valid_'):]} {fmt(series[k][1][-1])}" for k in valid_metrics) or "–"
        return [f"`{label}`", str(steps[-1]) if steps else "–", last(TRAIN_LOSS), last(VALID_LOSS), best, speed, lr,
                valid]

    def sasrec_section(self) -> None:
        sasrec = self.inputs.sasrec
        if sasrec is None:
            return
        history = [h for h in sasrec.get("history", []) if isinstance(h, dict) and "epoch" in h]
        self.lines += [f"### SASRec baseline (`{self.inputs.sasrec_source}`)", ""]
        if not history:
            self.lines += ["Its `history` holds no evaluations.", ""]
            return
        epochs = [h["epoch"] for h in history]
        keys = sorted({k for h in history for k in ranking_metrics(h.get("valid"))}, key=_metric_sort_key)
        fig, (loss_ax, valid_ax) = self.plt.subplots(1, 2, figsize=(11, 4))
        if all(_is_number(h.get("loss")) for h in history):
            draw_curve(loss_ax, epochs, [h["loss"] for h in history], label="train loss", xlabel="epoch",
                       ylabel="loss", marker="o")
        loss_ax.set_title("SASRec: training loss")
        colors = {k: f"C{i}" for i, k in enumerate(sorted({_metric_sort_key(key)[0] for key in keys}))}
        for key in keys:  # one colour per K; Recall solid, NDCG dashed
            k, is_ndcg = _metric_sort_key(key)
            draw_curve(valid_ax, epochs, [ranking_metrics(h.get("valid")).get(key) for h in history],
                       label=_metric_title(key), xlabel="epoch", marker="o", color=colors[k],
                       linestyle="--" if is_ndcg else "-")
        from matplotlib.ticker import MaxNLocator

        for ax in (loss_ax, valid_ax):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        best = sasrec.get("best_epoch")
        if best is not None:
            for ax in (loss_ax, valid_ax):
                ax.axvline(best, color="gray", linestyle=":", label=f"best epoch {best}" if ax is valid_ax else None)
        valid_ax.set_ylabel("validation metric")
        valid_ax.set_title("SASRec: validation metrics")
        if keys:
            valid_ax.legend(fontsize=8)
        self.figure(fig, "sasrec_training.png", "SASRec: training loss and validation metrics against epoch")
        rows = [[str(h["epoch"]), fmt(h.get("loss"))] + [fmt(ranking_metrics(h.get("valid")).get(k)) for k in keys]
                for h in history]
        self.lines += table(["epoch", "loss"] + [f"valid {_metric_title(k)}" for k in keys], rows) + [""]
        facts = {k: sasrec[k] for k in ("best_epoch", "epochs_run", "train_seconds_per_epoch", "items")
                 if k in sasrec}
        if facts:
            self.lines += [", ".join(f"{k.replace('_', ' ')}: {fmt(v)}" for k, v in facts.items()), ""]

    # -- 2. Recall/NDCG against K, and 3. the tables

    def ranking_section(self) -> None:
        self.lines += ["## Test Recall@K and NDCG@K", ""]
        if not self.inputs.protocols:
            self.lines += [f"No test metrics (no `{RESULT_FILE}` with Recall/NDCG figures).", ""]
            return
        result = self.inputs.result or {}
        users = result.get("test_users", result.get("users"))
        details = [f"{fmt(users)} users" if users is not None else None,
                   f"{result['beams']} beams" if "beams" in result else None,
                   f"split `{result['eval_split']}`" if "eval_split" in result else None]
        details = [d for d in details if d]
        if details:
            self.lines += ["Scored over " + ", ".join(details) + ".", ""]
        ordered = [p for p in PROTOCOLS if p in self.inputs.protocols]
        ordered += [p for p in self.inputs.protocols if p not in PROTOCOLS]
        for protocol in ordered:
            methods = self.inputs.protocols[protocol]
            title = PROTOCOLS.get(protocol, protocol)
            self.lines += [f"### `{protocol}`: {title}", ""]
            if not methods:
                self.lines += ["No Recall/NDCG figures under this protocol.", ""]
                continue
            fig, axes = self.plt.subplots(1, 2, figsize=(11, 4.2))
            all_ks = sorted({int(RANKING_KEY.match(k).group(2)) for m in methods.values() for k in m})
            for ax, kind, name in zip(axes, ("recall", "ndcg"), ("Recall@K", "NDCG@K")):
                for method in _ordered_methods(methods):
                    points = sorted((int(RANKING_KEY.match(k).group(2)), v) for k, v in methods[method].items()
                                    if k.startswith(kind + "@"))
                    if points:
                        draw_curve(ax, [k for k, _ in points], [v for _, v in points],
                                   label=METHOD_NAMES.get(method, method), xlabel="K", ylabel=name, marker="o",
                                   color=METHOD_COLORS.get(method), linewidth=2.4 if method == "model" else 1.4)
                ax.set_xticks(all_ks)
                ax.set_ylim(bottom=0)
                ax.set_title(name)
            axes[0].legend()
            fig.suptitle(f"test, {title}" + (f" ({', '.join(details)})" if details else ""))
            self.figure(fig, f"ranking_{_safe(protocol)}.png", f"Recall@K and NDCG@K against K, {protocol}")
            self.lines += self._method_table(methods) + [""]
            self.lines += self._model_vs_baselines(methods)

    @staticmethod
    def _method_table(methods: dict[str, dict[str, float]]) -> list[str]:
        keys = sorted({k for m in methods.values() for k in m}, key=_metric_sort_key)
        best = {k: max(m[k] for m in methods.values() if k in m) for k in keys}
        rows = []
        for method in _ordered_methods(methods):
            cells = []
            for key in keys:
                value = methods[method].get(key)
                cell = "–" if value is None else f"{value:.4f}"
                cells.append(f"**{cell}**" if value is not None and value == best[key] and len(methods) > 1 else cell)
            rows.append([METHOD_NAMES.get(method, method)] + cells)
        return table(["method"] + [_metric_title(k) for k in keys], rows) + ["", "(best of each column in bold)"]

    @staticmethod
    def _model_vs_baselines(methods: dict[str, dict[str, float]]) -> list[str]:
        model = methods.get("model", {})
        others = {m: v for m, v in methods.items() if m != "model"}
        key = "recall@10" if "recall@10" in model else max(model, key=_metric_sort_key, default=None)
        if key is None or not others:
            return []
        rivals = {m: v[key] for m, v in others.items() if key in v}
        if not rivals:
            return []
        rival = max(rivals, key=rivals.get)
        ratio = f", {model[key] / rivals[rival]:.2f}x" if rivals[rival] > 0 else ""
        return [f"Model {_metric_title(key)} {model[key]:.4f} against the best baseline, "
                f"{METHOD_NAMES.get(rival, rival)}, {rivals[rival]:.4f}{ratio}.", ""]

    def result_tables(self) -> None:
        result = self.inputs.result
        if result is None:
            return
        consumed = self.inputs.consumed
        if self.inputs.valid_item_rate:
            self.lines += ["## Valid-item rate", "",
                           "The share of beams that name a real catalog item (constrained decoding should give 1).", ""]
            self.lines += table(["protocol", "valid-item rate"],
                                [[f"`{p}`", f"{v:.4f} ({v:.2%})"] for p, v in self.inputs.valid_item_rate.items()])
            self.lines += [""]
        sids = result.get("sids")
        if isinstance(sids, dict):
            self.lines += ["## Semantic IDs", ""]
            rows = []
            for key, value in sids.items():
                name = key.replace("_", " ")
                if isinstance(value, dict) and all(isinstance(v, list) for v in value.values()):
                    rows += [[f"{name} (`{t}`), per level", fmt(v)] for t, v in value.items()]
                elif isinstance(key, str) and key.startswith("collision_rate") and _is_number(value):
                    rows.append([name, f"{value:.4f} ({value:.2%})"])
                else:
                    rows.append([name, fmt(value)])
            consumed.update(k for k in flatten(result) if k.startswith("sids."))
            self.lines += table(["figure", "value"], rows) + [""]
        phases = result.get("phase_seconds")
        if isinstance(phases, dict) and phases:
            numbers = {k: float(v) for k, v in phases.items() if _is_number(v)}
            total = sum(numbers.values())
            self.lines += ["## Phase wall times", ""]
            rows = [[name, f"{s:.1f}", format_duration(s), f"{s / total:.1%}" if total else "–"]
                    for name, s in numbers.items()]
            rows.append(["**total**", f"**{total:.1f}**", f"**{format_duration(total)}**", "100%"])
            self.lines += table(["phase", "seconds", "duration", "share"], rows) + [""]
            consumed.update(f"phase_seconds.{k}" for k in numbers)

    # -- 4. per-task metrics

    def per_task_section(self) -> None:
        self.lines += ["## Per-task metrics", ""]
        found = False
        for stage in self.inputs.stages:
            keys = sorted(k for k in stage.series if TASK_KEY.search(k))
            if not keys:
                continue
            found = True
            label = self.inputs.run_dir.name if stage.name == "." else stage.name
            self.lines += [f"### Stage `{label}`", ""]
            loss_keys = [k for k in keys if "loss" in k]
            if loss_keys:
                fig, ax = self.plt.subplots(figsize=(8, 4.5))
                for key in loss_keys:
                    draw_curve(ax, *stage.series[key], label=key)
                ax.set_ylabel("loss")
                ax.set_title(f"{label}: per-task loss")
                ax.legend(fontsize=8)
                self.figure(fig, f"per_task_{_safe(label)}.png", f"{label}: per-task loss against step")
            rows = [[TASK_KEY.search(k).group(1), f"`{k}`", str(stage.series[k][0][-1]), fmt(stage.series[k][1][-1])]
                    for k in keys]
            self.lines += table(["task", "metric", "last step", "last value"], rows) + [""]
        if self.inputs.result is not None:
            leaves = {p: v for p, v in flatten(self.inputs.result).items()
                      if p not in self.inputs.consumed and any(part in TASKS for part in p.split("."))}
            if leaves:
                found = True
                self.lines += [f"### Per-task sections of `{RESULT_FILE}`", ""]
                rows = [[next(part for part in p.split(".") if part in TASKS), f"`{p}`", fmt(v)]
                        for p, v in leaves.items()]
                self.lines += table(["task", "figure", "value"], rows) + [""]
                self.inputs.consumed.update(leaves)
        if not found:
            self.lines += [f"None present: no metric in {METRICS_FILE} names a task ({', '.join(TASKS)}), and "
                           f"{RESULT_FILE} has no per-task section. The trainer logs one loss over the task mix, "
                           "and the test figures above are of the recommend task only.", ""]

    def other_figures(self) -> None:
        result = self.inputs.result
        if result is None:
            return
        rest = {p: v for p, v in flatten(result).items() if p not in self.inputs.consumed}
        if rest:
            self.lines += [f"## Run settings and other figures in `{RESULT_FILE}`", ""]
            self.lines += table(["key", "value"], [[f"`{p}`", fmt(v)] for p, v in rest.items()]) + [""]


# ---------------------------------------------------------------- the command


def _check_out_dir(out_dir: Path, run_dir: Path) -> None:
    if out_dir.resolve() == run_dir.resolve():
        raise UserError(f"--out {out_dir} is the run directory itself; choose a directory of its own")
    if out_dir.exists():
        if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / REPORT_FILE).is_file()):
            raise UserError(f"{out_dir} exists and is not an earlier report (no {REPORT_FILE}); "
                            "remove it or choose another --out")


def write_report(run_dir: Path, out_dir: Path | None = None) -> dict[str, Any]:
    """Write `out_dir/report.md` and its PNGs (atomically, replacing an earlier report); the paths written."""
    out_dir = out_dir if out_dir is not None else run_dir / "report"
    inputs = read_inputs(run_dir)
    pyplot()  # a clear error without matplotlib before anything is written
    _check_out_dir(out_dir, run_dir)
    try:
        with atomic_output_dir(out_dir, overwrite=True) as tmp:
            report = Report(inputs, tmp)
            (tmp / REPORT_FILE).write_text(report.write(), encoding="utf-8")
    except PermissionError as e:
        raise UserError(f"cannot write the report to {out_dir} ({e.strerror}); choose a writable --out") from None
    return {"report": str(out_dir / REPORT_FILE), "figures": [str(out_dir / name) for name in report.figures],
            "kind": inputs.kind, "missing": [name for name, _ in inputs.missing]}


def run(args: argparse.Namespace) -> int:
    print(json.dumps(write_report(args.run_dir, args.out)))
    return 0
