"""`neo-jax bench rec`: the generative recommender and its baselines on one dataset, end to end.

    neo-jax bench rec --dataset beauty [--config configs/bench_rec_cpu.yaml] [KEY=VALUE ...]
    neo-jax bench rec --data DIR [--config FILE] [KEY=VALUE ...]

Phases, each timed: item embeddings and SIDs (`sids build`), window task examples (`data tasks
--window`), the tokenizer and records, training the decoder on the window examples (from random
weights, or with `backbone=DIR` a pre-trained model: SID grounding, then every weight),
constrained beam search over the test users under both protocols (history items kept in the
ranking, and excluded from it through the constraint), then the baselines on the same users and
split: a first-order transition model, popularity and SASRec. Prints one JSON object (also
written to OUT/result.json): test Recall/NDCG@K of each, the valid-item rate of the model's
beams and the wall seconds of every phase.

Protocol: leave-one-out (the last item of each user is the test target, the one before it the
validation target, the rest trains; users with fewer than 3 items only train), full ranking
over the catalog, K in `ks`, `beams` >= max K beams (each beam is one distinct catalog item),
every test user unless `eval_users` asks for a seeded random sample. Rerunning with the same
OUT skips finished phases, resumes training and reads back every evaluation whose model and settings
are unchanged (`OUT/evaluations/`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from neo_jax.atomic import atomic_write_text
from neo_jax.baselines.train import SasRecTrainConfig
from neo_jax.catalog.commands import SidsBuildConfig, build_sids
from neo_jax.catalog.dual import UserSidConfig
from neo_jax.catalog.embeddings import EmbeddingConfig
from neo_jax.catalog.sids import QuantiserConfig, SidConfig
from neo_jax.config import MeshConfig, load_config, to_dict
from neo_jax.data.loaders import load_dataset
from neo_jax.data.splits import leave_one_out
from neo_jax.errors import UserError
from neo_jax.eval.recommend import sample_indices
from neo_jax.json_file import read_json_object
from neo_jax.run_steps import DEFAULT_MODEL, StageSettings, cli_step, say, train_stage
from neo_jax.train.trainer import SELECTION_FILE
from neo_jax.tasks.builders import USER_TASKS, read_examples

DATASETS = ("beauty", "sports")
BASELINES = ("transition", "popularity", "sasrec")
PREFIX = "bench rec"
EVALUATIONS = "evaluations"  # in OUT: each test evaluation's result, with the inputs it was measured on

@dataclasses.dataclass(frozen=True)
class RecBenchConfig:
    out: str = ""  # default runs/bench_rec/<dataset directory name>
    seed: int = 0
    embedding: EmbeddingConfig = EmbeddingConfig(source="fused", text_encoder="minilm")
    sids: SidConfig = SidConfig(codebook_sizes=(256, 256, 256), quantiser=QuantiserConfig(method="residual_kmeans"))
    window: int = 20  # history items per training window (and the prompt holds window - 1)
    window_sampling: str = "tile"  # or random (`neo-jax data tasks --window-sampling`)
    # Each window also carries one of its items as an avoided span, penalised at the unlikelihood
    # weight from SID level `avoided_from_level` on (`neo-jax data tasks --avoid-repeats`,
    # `neo-jax train`'s `unlikelihood_avoided_from_level`).
    avoid_repeats: bool = False
    avoided_from_level: int = 2
    text_vocab_size: int = 512  # at most this many sentencepiece pieces (the header text needs ~350)
    model: dict[str, Any] = dataclasses.field(default_factory=dict)  # ModelConfig fields replacing DEFAULT_MODEL's
    # A learned vector per catalog item joins the input at each `[/SID]` that closes it (the random
    # model's item-identity table, `neo-jax train`'s `data.sids`; `neo_jax.catalog.item_ids`).
    item_ids: bool = False
    item_id_dropout: float = 0.0  # share of the item ids dropped at each training step (`neo-jax train`'s)
    # Align3GR's token and behaviour levels: users get SIDs of their own (`sids build`'s `users`
    # section, `users.enabled`); with `user_sids` every next-item prompt names its user by their SID;
    # `behaviour_tasks` adds the profile_to_user and user_to_profile examples to training.
    users: UserSidConfig = UserSidConfig()
    user_sids: bool = False
    user_sid_share: float = 1.0  # with user_sids: the share of training prompts naming the user (`data tasks`)
    behaviour_tasks: bool = False
    # A pre-trained backbone (a `neo-jax import-hf` output, its tokenizer/ inside) instead of random
    # weights: its own tokenizer and model (`model` and `text_vocab_size` unused), SID rows alone for
    # `grounding_steps` (stage 2), then every weight for `steps`.
    backbone: str | None = None
    grounding_steps: int = 500
    grounding_learning_rate: float = 1e-3
    compute_dtype: str = "float32"  # bfloat16 on an accelerator
    mesh: MeshConfig = MeshConfig()
    steps: int = 3000
    # The (instruct) training mix by records, e.g. {recommend: 0.8, profile_to_user: 0.1, user_to_profile: 0.1}
    # (`neo-jax train`'s `data.task_weights`: each task shuffled and repeated on its own); {}: as written.
    task_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    dropout: float = 0.0  # on the decoder's embeddings and residual branches, training only
    unlikelihood: float = 0.0  # weight of the history unlikelihood term (`neo-jax train`'s `unlikelihood`)
    history_from_level: int = 1  # its first penalised SID level (`neo-jax train`'s `unlikelihood_from_level`)
    ema_decay: float = 0.0  # an exponential moving average of the weights is evaluated (`optimizer.ema_decay`)
    batch_size: int = 16
    seq_len: int = 256
    evaluations: int = 4  # validation evaluations (and checkpoints) over the training run
    # Model selection (`neo-jax train`'s `eval.select`): "" evaluates the last model; a metric
    # (valid_ndcg@10, valid_recall@10, valid_loss) evaluates the model of the evaluation where it
    # was best, Recall/NDCG measured on a seeded sample of `select_users` validation users at `beams`
    # (at least 10).
    select: str = ""
    select_users: int = 2000
    beams: int = 20
    ks: tuple[int, ...] = (1, 5, 10, 20)
    eval_batch_size: int = 64
    eval_users: int = 0  # 0: every test user; N: a seeded random sample of N
    baselines: tuple[str, ...] = BASELINES
    sasrec: SasRecTrainConfig = SasRecTrainConfig()


def shared_data_dir(name: str) -> Path:
    """`shared/data/amazon2014/NAME` beside the checkout (or under $NEO_JAX_SHARED)."""
    candidates = [Path(os.environ["NEO_JAX_SHARED"])] if "NEO_JAX_SHARED" in os.environ else []
    candidates += [Path(__file__).resolve().parents[2].parent / "shared", Path.cwd().parent / "shared"]
    for root in candidates:
        if (root / "data" / "amazon2014" / name).is_dir():
            return root / "data" / "amazon2014" / name
    raise UserError(f"dataset {name!r}: no data/amazon2014/{name} under {[str(c) for c in candidates]}; "
                    f"set NEO_JAX_SHARED to the shared/ directory or pass --data DIR")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--dataset", choices=DATASETS, help="an Amazon 2014 dataset from shared/data/amazon2014")
    where.add_argument("--data", type=Path, help="any dataset directory `neo-jax data check` reads")
    parser.add_argument("--config", default=None, help="YAML settings (e.g. configs/bench_rec_cpu.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings, e.g. steps=500 eval_users=2000")


class PhaseClock:
    """Wall seconds of each named phase, in order."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - started, 1)
        say(PREFIX, f"{name}: {self.seconds[name]} s")
        return result


def _model_metrics(config: RecBenchConfig, root: Path, checkpoint: Path, chosen: np.ndarray,
                   clock: PhaseClock) -> dict[str, dict]:
    from neo_jax.decode.commands import load_generator
    from neo_jax.eval.recommend import evaluate_recommendations
    from neo_jax.sharding import make_mesh

    @functools.cache  # loaded once for both protocols, and not at all when both are kept
    def generator_and_examples():
        examples = read_examples(root / "tasks" / "test.jsonl")
        generator = load_generator(checkpoint, root / "sids", make_mesh(config.mesh), root / "tokenizer",
                                   allow_replicated=config.mesh.allow_replicated)
        return generator, [examples[i] for i in chosen.tolist()]

    def evaluate(exclude_history: bool) -> dict:
        return evaluate_recommendations(*generator_and_examples(), beams=config.beams,
                                        batch_size=config.eval_batch_size, ks=config.ks,
                                        exclude_history=exclude_history)

    # the saved model's identity: its params directory is written anew by every save
    saved = {"checkpoint": str(checkpoint), "params_written_ns": (checkpoint / "params").stat().st_mtime_ns}
    return {protocol: _kept(root / EVALUATIONS / f"model_{protocol}.json",
                            {**saved, **_users_key(config, chosen), "beams": config.beams, "ks": config.ks,
                             "exclude_history": exclude},
                            clock, f"eval model ({protocol})", evaluate, exclude)
            for protocol, exclude in (("history_kept", False), ("history_excluded", True))}


def _baseline_metrics(config: RecBenchConfig, data_dir: Path, root: Path, chosen: np.ndarray,
                      clock: PhaseClock) -> dict[str, dict[str, dict]]:
    from neo_jax.baselines.popularity import popularity_ranking_metrics
    from neo_jax.baselines.train import train_sasrec
    from neo_jax.baselines.transition import transition_ranking_metrics

    dataset = load_dataset(data_dir)
    split = leave_one_out(dataset.interactions.sequences())
    split = dataclasses.replace(split, test=[split.test[i] for i in chosen.tolist()])
    n_items = len(dataset.catalog)
    out: dict[str, dict[str, dict]] = {}
    inputs = {"data": str(data_dir), **_users_key(config, chosen), "ks": config.ks}
    for name in config.baselines:
        if name == "sasrec":
            result = _kept(root / EVALUATIONS / "sasrec.json", {**inputs, "sasrec": to_dict(config.sasrec)},
                           clock, "baseline sasrec", train_sasrec, split, n_items, config.sasrec,
                           lambda message: say(PREFIX, f"sasrec: {message}"), ks=config.ks)
            atomic_write_text(root / "sasrec_result.json", json.dumps(result, indent=2))
            out[name] = result["test_protocols"]
            continue
        metric = {"transition": transition_ranking_metrics, "popularity": popularity_ranking_metrics}[name]
        out[name] = {protocol: _kept(root / EVALUATIONS / f"{name}_{protocol}.json",
                                     {**inputs, "exclude_history": exclude}, clock, f"baseline {name} ({protocol})",
                                     metric, split, dataset.catalog, config.ks, exclude)
                     for protocol, exclude in (("history_kept", False), ("history_excluded", True))}
    return out


def _users_key(config: RecBenchConfig, chosen: np.ndarray) -> dict:
    """What picks the evaluated test users (`sample_indices`), for `_kept`'s inputs."""
    return {"eval_users": config.eval_users, "seed": config.seed, "test_users": int(chosen.size)}


def _kept(path: Path, inputs: dict, clock: PhaseClock, name: str, fn, *args, **kwargs):
    """`clock.run(name, fn, ...)`'s result, kept in `path` with the `inputs` it was measured on: a rerun
    on the same inputs reads it there instead of measuring again."""
    inputs = json.loads(json.dumps(inputs))  # as read back (tuples become lists)
    if path.is_file():
        saved = read_json_object(path)
        if saved.get("inputs") == inputs:
            say(PREFIX, f"{name}: {path} exists, skipped")
            return saved["result"]
    result = clock.run(name, fn, *args, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"inputs": inputs, "result": result}, indent=2))
    return result


def _selection_settings(config: RecBenchConfig, root: Path) -> dict:
    """The training stage's eval settings for `select` (none without it)."""
    if not config.select:
        return {}
    recall = ({} if config.select == "valid_loss" else
              {"recall_examples": str(root / "tasks" / "valid.jsonl"), "recall_sids": str(root / "sids"),
               "recall_users": config.select_users, "recall_beams": max(config.beams, 10)})
    return {"select": config.select, **recall}


def _checked_backbone(path: str | None) -> Path | None:
    """The backbone checkpoint directory, refused early unless it holds weights and a tokenizer."""
    if path is None:
        return None
    backbone = Path(path)
    missing = [name for name in ("model_config.json", "params", "tokenizer") if not (backbone / name).exists()]
    if missing:
        raise UserError(f"backbone {backbone}: no {', '.join(missing)}; import the model first with "
                        f"`neo-jax import-hf SOURCE {backbone}`")
    return backbone


def run_bench(config: RecBenchConfig, data_dir: Path) -> dict:
    unknown = [b for b in config.baselines if b not in BASELINES]
    if unknown:
        raise UserError(f"unknown baseline(s) {unknown}; baselines are {list(BASELINES)}")
    if config.avoid_repeats and not config.unlikelihood > 0:
        raise UserError("avoid_repeats penalises its spans at the unlikelihood weight: set unlikelihood > 0 "
                        f"(got {config.unlikelihood})")
    if config.beams < max(config.ks):
        raise UserError(f"beams ({config.beams}) must be at least the largest K ({max(config.ks)})")
    if (config.user_sids or config.behaviour_tasks) and not config.users.enabled:
        raise UserError("user_sids and behaviour_tasks need the users' SIDs: set users.enabled=true")
    if config.item_ids and config.backbone:
        raise UserError("item_ids gives a random model its item-identity table; a backbone has none (unset one)")
    backbone = _checked_backbone(config.backbone)
    root = Path(config.out or f"runs/bench_rec/{data_dir.name}")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "bench_config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
    clock = PhaseClock()
    if not (root / "sids").exists():
        say(PREFIX, f"sids: neo-jax sids build --config {root / 'bench_config.yaml'} (its embedding and sids)")
        clock.run("sids", build_sids, SidsBuildConfig(data=str(data_dir), output=str(root / "sids"), seed=config.seed,
                                                      embedding=config.embedding, sids=config.sids,
                                                      users=config.users))
    sids_summary = read_json_object(root / "sids" / "summary.json")
    clock.run("tasks", cli_step, PREFIX, "tasks", root / "tasks",
              ["data", "tasks", str(data_dir), str(root / "sids" / "sids.tsv"), str(root / "tasks"),
               "--tasks", ",".join(["recommend", *(USER_TASKS if config.behaviour_tasks else ())]),
               "--window", str(config.window), "--window-sampling", config.window_sampling, "--seed", str(config.seed),
               *(["--avoid-repeats"] if config.avoid_repeats else []), *(["--user-sids"] if config.user_sids else []),
               *(["--user-sid-share", str(config.user_sid_share)]
                 if config.user_sids and config.user_sid_share < 1.0 else [])])
    text_source = (["--train", str(root / "tasks"), "--vocab-size", str(config.text_vocab_size)] if backbone is None
                   else ["--text", str(backbone / "tokenizer"), "--model", str(backbone)])
    clock.run("tokenizer", cli_step, PREFIX, "tokenizer", root / "tokenizer",
              ["tokenizer", "build", str(root / "tokenizer"), "--sids", str(root / "sids"), *text_source])
    clock.run("records", cli_step, PREFIX, "records", root / "records",
              ["data", "records", str(root / "tasks"), str(root / "tokenizer"), str(root / "records"),
               "--shards", "1", "--splits", "train,valid", "--max-length", str(config.seq_len + 1)])
    stage = StageSettings(stage="instruct", steps=config.steps, learning_rate=config.learning_rate,
                          batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed, mesh=config.mesh,
                          warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
                          dropout=config.dropout, item_id_dropout=config.item_id_dropout,
                          unlikelihood=config.unlikelihood,
                          unlikelihood_from_level=config.history_from_level,
                          unlikelihood_avoided_from_level=config.avoided_from_level, ema_decay=config.ema_decay,
                          compute_dtype=config.compute_dtype, log_every=50, evaluations=config.evaluations,
                          eval_extra=_selection_settings(config, root), task_weights=config.task_weights)
    if backbone is None:
        model_path = root / "model.yaml"
        atomic_write_text(model_path, yaml.safe_dump({**DEFAULT_MODEL, **config.model,
                                                      "vocab_size": config.text_vocab_size}))
        init = {"model_config": str(model_path)}
    else:  # stage 2 (the SID rows learn, every pre-trained weight stays), then stage 3 from it
        grounding = dataclasses.replace(stage, stage="grounding", steps=config.grounding_steps,
                                        learning_rate=config.grounding_learning_rate, warmup_steps=None,
                                        weight_decay=None, dropout=0.0, unlikelihood=0.0, ema_decay=0.0,
                                        evaluations=4, eval_extra={}, task_weights={})
        grounded = clock.run("train grounding", train_stage, PREFIX, root / "train_grounding", grounding,
                             {"checkpoint": str(backbone)}, root / "records", root / "tokenizer")
        init = {"checkpoint": str(grounded)}
    checkpoint = clock.run("train", train_stage, PREFIX, root / "train", stage, init, root / "records",
                           root / "tokenizer", root / "sids" if config.item_ids else None)
    n_test = sum(1 for _ in (root / "tasks" / "test.jsonl").open(encoding="utf-8"))
    chosen = sample_indices(n_test, config.eval_users, config.seed)
    model = _model_metrics(config, root, checkpoint, chosen, clock)
    baselines = _baseline_metrics(config, data_dir, root, chosen, clock)
    result = {
        "dataset": str(data_dir), "out": str(root), "test_users": int(chosen.size), "beams": config.beams,
        "protocols": {protocol: {"model": {k: v for k, v in model[protocol].items()
                                           if k.startswith(("recall", "ndcg"))},
                                 **{name: metrics[protocol] for name, metrics in baselines.items()}}
                      for protocol in ("history_kept", "history_excluded")},
        "valid_item_rate": {protocol: model[protocol]["beams_naming_an_item"] for protocol in model},
        "history_repeats": {k: v for k, v in model["history_kept"].items() if k.startswith("history_")},
        "sids": {k: sids_summary.get(k) for k in ("collision_rate_before", "collision_rate_after", "codebook_use",
                                                 "prefix_coherence")},
        "phase_seconds": clock.seconds,
        "checkpoint": str(checkpoint),
        "selected": (read_json_object(checkpoint / SELECTION_FILE) if (checkpoint / SELECTION_FILE).is_file()
                     else None),
    }
    atomic_write_text(root / "result.json", json.dumps(result, indent=2))
    return result


def run(args: argparse.Namespace) -> int:
    data_dir = shared_data_dir(args.dataset) if args.dataset else args.data
    if not data_dir.is_dir():
        raise UserError(f"--data: {data_dir} is not a directory")
    result = run_bench(load_config(RecBenchConfig, args.config, args.overrides), data_dir)
    print(json.dumps(result))
    return 0
