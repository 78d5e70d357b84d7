"""`neo-jax align`: preference alignment of a fine-tuned recommender, Align3GR's progressive
softmax-DPO: self-play negatives easy, then medium, then hard, then real feedback (disliked, then
neutral), each stage's model the next one's reference.

    neo-jax align --config configs/align_beauty.yaml [KEY=VALUE ...]
    neo-jax align init=RUN/train/best data=DATA_DIR sids=SIDS_DIR out=runs/align [stages=[easy,hard]]

`init` is a model fine-tuned on window examples (`neo-jax bench rec`'s `OUT/train/best`, or a
`neo-jax train` run's `final`) with its tokenizer inside; `data` and `sids` are the dataset and
the `neo-jax sids build` directory it was trained on. Each stage, in `stages` order, works in
`OUT/<n>_<bin>/`:
1. negatives: the stage's reference model (the model before the stage) ranks a seeded sample of
   `users` training users by constrained beam search (`beams`). The prompt is the user's newest
   training item's: the evaluation layout (`neo_jax.tasks.builders.TaskBuilder.window_eval`) over the
   training items before it; the chosen completion is that item's SID. The beams other than the
   chosen one are binned by the SID prefix they share with it (`neo_jax.train.self_play`); the
   stage's bin gives up to `rejected` rejected items, and a user whose beams hold none of them is
   left out of the stage. The `disliked` stage takes instead the items of the asked type the user
   gave negative feedback (the data's feedback field) before the chosen item, newest first, and the
   `neutral` stage those they gave neutral feedback: real negatives, never mined. The same for
   `valid_users` validation users gives the validation loss.
2. reference: the reference model's log-probability of every completion, stored in the
   preference records (`neo_jax.tasks.preference`, `records/`, written by one rename).
3. train: a `neo-jax train` run of stage `preference` from the reference model, `epochs` passes
   over the groups (`train/`, resumable: checkpoints as in every stage).
4. evaluate: Recall/NDCG@1/5/10/20 of the trained model on `eval_users` seeded validation users
   (`result.json`) and, with `test`, on `test_users` seeded test users (`test.json`; history kept).
A stage with its `result.json` is skipped, so running the command again resumes where it stopped.
Prints one JSON object (also `OUT/result.json`): the validation (and test) metrics of the starting
model and after each stage, with each stage's groups, rejected items per group and last DPO loss and accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from neo_jax.atomic import atomic_write_text
from neo_jax.catalog.item_ids import ItemIds
from neo_jax.checkpoint import load_model_config
from neo_jax.config import MeshConfig, add_config_arguments, load_config, to_dict
from neo_jax.data.loaders import load_dataset
from neo_jax.data.schema import NEGATIVE, NEUTRAL, Dataset
from neo_jax.data.splits import LeaveOneOutSplit, SequenceExample, leave_one_out
from neo_jax.decode.commands import load_generator
from neo_jax.decode.generate import Generator
from neo_jax.errors import UserError
from neo_jax.eval.recommend import evaluate_recommendations, rank_examples, sample_examples, target_rows
from neo_jax.json_file import read_json_object
from neo_jax.model import Decoder
from neo_jax.model.preference import candidate_log_probs
from neo_jax.run_steps import StageSettings, say, train_stage
from neo_jax.sharding import make_mesh
from neo_jax.tasks.builders import (SidMap, TaskBuilder, TaskConfig, TaskExample, UserSids, build_eval_examples,
                                   load_sid_map, load_user_sids)
from neo_jax.tasks.preference import PREFERENCE_KEYS, PreferenceExample, example_features, write_preference_records
from neo_jax.train.self_play import DIFFICULTY_BINS, bin_negatives
from neo_jax.train.monitor import read_metrics

PREFIX = "align"
RESULT_FILE = "result.json"
FEEDBACK_STAGES = {"disliked": NEGATIVE, "neutral": NEUTRAL}  # real feedback after the self-play bins: its kind
STAGES = (*DIFFICULTY_BINS, *FEEDBACK_STAGES)


@dataclasses.dataclass(frozen=True)
class AlignConfig:
    init: str = ""  # the fine-tuned model (its tokenizer inside)
    data: str = ""  # the dataset directory it was trained on
    sids: str = ""  # its `neo-jax sids build` directory
    out: str = "runs/align"
    stages: tuple[str, ...] = DIFFICULTY_BINS  # of `STAGES`, in the order to train
    window: int = 20  # history items per prompt + 1, as the model was trained (`neo-jax data tasks --window`)
    user_sids: bool = False  # prompts name the user by their SID, as the model was trained (`--user-sids`)
    users: int = 4000  # training users mined per stage (0: all)
    valid_users: int = 500  # validation users mined per stage, for the validation DPO loss
    eval_users: int = 2000  # validation users of the Recall/NDCG evaluation after each stage (0: all)
    test: bool = True  # also evaluate every model on the test split
    test_users: int = 0  # a seeded sample of test users (0: all)
    beams: int = 20
    rejected: int = 4  # rejected items per group, at most
    epochs: float = 1.0  # passes over a stage's groups
    batch_size: int = 16  # groups per step
    seq_len: int = 256  # a group's row: its prompt and every completion (`neo_jax.tasks.preference`)
    learning_rate: float = 3e-5
    beta: float = 1.0
    chosen_nll: float = 1.0  # weight of the chosen completion's negative log-likelihood
    eval_batch_size: int = 64
    seed: int = 0
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise UserError(f"stages: {unknown or 'none'}; choose from {list(STAGES)}, in the order to train")
        for name in ("users", "valid_users", "eval_users", "test_users"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be 0 (all) or positive, got {getattr(self, name)}")
        if self.valid_users == 0:
            raise UserError("valid_users must be positive: the validation DPO loss needs groups")
        if self.rejected < 1 or self.beams < max(self.rejected + 1, 10) or self.window < 2:
            raise UserError(f"rejected must be >= 1, beams >= max(rejected + 1, 10) and window >= 2; got rejected "
                            f"{self.rejected}, beams {self.beams}, window {self.window}")
        if self.epochs <= 0 or self.batch_size < 1 or self.learning_rate <= 0:
            raise UserError(f"epochs, batch_size and learning_rate must be positive, got {self.epochs}, "
                            f"{self.batch_size} and {self.learning_rate}")


def newest_training_examples(split: LeaveOneOutSplit) -> list[SequenceExample]:
    """Per user with two training items or more: the newest training item after the ones before it."""
    return [SequenceExample(user, sequence[:-1], int(sequence[-1]), len(sequence) - 1)
            for user, sequence in enumerate(split.train_sequences) if len(sequence) >= 2]


def mine_groups(generator: Generator, examples: Sequence[TaskExample], sids: Sequence[str], difficulty: int,
                rejected: int, beams: int, batch_size: int) -> list[tuple[TaskExample, list[str]]]:
    """`(example, rejected SIDs)` for each example whose beams hold items of bin `difficulty` other
    than its target: the first `rejected` of them in beam order. `sids[row]` is a catalog row's SID."""
    targets = target_rows(examples, generator)  # [examples]
    ranked = rank_examples(generator, examples, beams, batch_size, show_progress=True)  # [examples, beams]
    binned = bin_negatives(ranked, targets, generator.sids.trie.codes)[:, difficulty, :rejected]  # [examples, rejected]
    return [(example, [sids[row] for row in rows if row >= 0])
            for example, rows in zip(examples, binned.tolist()) if rows[0] >= 0]


def preference_examples(groups: Sequence[tuple[TaskExample, list[str]]], generator: Generator, seq_len: int,
                        batch_size: int) -> list[PreferenceExample]:
    """The groups tokenized as the decoder sees them (`[bos] + prompt`, each SID's tokens), with the
    generator's model's log-probability of every completion as the reference."""
    tokenizer = generator.tokenizer
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    examples = [PreferenceExample(e.task, e.entity_type, e.output_format,
                                  np.asarray(bos + tokenizer.encode(e.prompt), np.int32),
                                  tuple(np.asarray(tokenizer.encode(c), np.int32) for c in [e.completion, *rejected]),
                                  np.zeros(1 + len(rejected), np.float32)) for e, rejected in groups]
    return scored_by(generator.model, examples, seq_len, batch_size, generator.item_ids)


def scored_by(model: Decoder, examples: Sequence[PreferenceExample], seq_len: int, batch_size: int,
              item_ids: ItemIds | None = None) -> list[PreferenceExample]:
    """`examples` with `model`'s log-probability of each completion as their reference (`item_ids`: the
    inputs of a model with item identity, as its training batches carry them)."""
    candidates = max(len(e.completions) for e in examples)
    graphdef, state = nnx.split(model)
    score = jax.jit(lambda state, batch: candidate_log_probs(nnx.merge(graphdef, state), batch))
    scored = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        features = [example_features(e, seq_len, candidates, item_ids) for e in chunk]
        features += [features[-1]] * (batch_size - len(chunk))  # one shape for every batch
        batch = {key: np.stack([f[key] for f in features]) for key in PREFERENCE_KEYS}
        log_probs = np.asarray(score(state, batch))[:len(chunk)]  # [groups, candidates]
        scored += [dataclasses.replace(e, reference=log_probs[i, :len(e.completions)].astype(np.float32))
                   for i, e in enumerate(chunk)]
    return scored


@dataclasses.dataclass
class _Users:
    """Seeded users of one split: their prompts (the chosen item the completion) and, per feedback
    stage, the catalog rows of the asked type they gave that feedback before the chosen item, newest first."""

    examples: list[TaskExample]
    feedback: dict[str, list[list[int]]]  # stage (`FEEDBACK_STAGES`) -> per example
    user_indices: list[int]  # into the interactions' user_ids


def _users(dataset: Dataset, picked: list[SequenceExample], sid_map: SidMap, tasks: TaskConfig,
           users: UserSids | None) -> _Users:
    cutoffs = np.zeros(dataset.interactions.num_users, np.int64)  # positives before each user's chosen item
    for e in picked:
        cutoffs[e.user] = e.position
    catalog = dataset.catalog
    feedback = {}
    for stage, kind in FEEDBACK_STAGES.items():
        given = dataset.interactions.negatives_before(cutoffs.tolist(), kind)  # per user, oldest first
        feedback[stage] = [[int(r) for r in given[e.user][::-1]
                            if r != e.target and catalog.item_types[r] == catalog.item_types[e.target]]
                           for e in picked]
    return _Users(build_eval_examples(dataset, picked, sid_map, tasks, users), feedback, [e.user for e in picked])


@dataclasses.dataclass
class _Inputs:
    """What every stage draws on: the mined and evaluated users, every catalog row's SID."""

    train: _Users  # training users (the prompt of their newest training item)
    valid: _Users  # validation users for the validation DPO loss
    evaluation: list[TaskExample]  # validation users for Recall/NDCG
    test: list[TaskExample]  # test users for Recall/NDCG (none without `AlignConfig.test`)
    sids: list[str]  # catalog row -> SID text


def _inputs(config: AlignConfig) -> _Inputs:
    dataset = load_dataset(config.data)
    sids_tsv = Path(config.sids) / "sids.tsv"
    sid_map = load_sid_map(sids_tsv, dataset.catalog)
    users = (load_user_sids(sids_tsv, dataset.catalog, dataset.interactions.user_ids) if config.user_sids
             else None)
    split = leave_one_out(dataset.interactions.sequences())
    tasks = TaskConfig(tasks=("recommend",), window=config.window, user_sids=config.user_sids, seed=config.seed)
    builder = TaskBuilder(dataset.catalog, sid_map, tasks, np.random.default_rng(config.seed), users)
    newest = newest_training_examples(split)
    if not newest or not split.valid:
        raise UserError(f"data: {config.data} has no user with two training items and a validation item")
    evaluated = lambda examples, count, seed: build_eval_examples(  # noqa: E731
        dataset, sample_examples(examples, count, seed), sid_map, tasks, users)
    return _Inputs(_users(dataset, sample_examples(newest, config.users, config.seed), sid_map, tasks, users),
                   _users(dataset, sample_examples(split.valid, config.valid_users, config.seed + 1), sid_map, tasks,
                          users),
                   evaluated(split.valid, config.eval_users, config.seed),
                   evaluated(split.test, config.test_users, config.seed) if config.test else [],
                   [builder.sid(r) for r in range(len(dataset.catalog))])


def _groups(config: AlignConfig, stage: str, users: _Users, generator: Generator,
            sids: list[str]) -> list[tuple[TaskExample, list[str]]]:
    """The stage's `(example, rejected SIDs)`: mined from the generator's beams (a self-play bin) or
    the users' feedback (`disliked`: negative, `neutral`)."""
    if stage in DIFFICULTY_BINS:
        return mine_groups(generator, users.examples, sids, DIFFICULTY_BINS.index(stage), config.rejected,
                           config.beams, config.eval_batch_size)
    return [(example, [sids[r] for r in rows[:config.rejected]])
            for example, rows in zip(users.examples, users.feedback[stage]) if rows]


def _write_records(config: AlignConfig, inputs: _Inputs, reference: Path, stage: str, stage_dir: Path) -> dict:
    """The stage's groups, scored by the reference model, written to `stage_dir/records`."""
    records = stage_dir / "records"
    summary_path = records / "summary.json"
    if summary_path.is_file():
        return read_json_object(summary_path)
    generator = load_generator(reference, config.sids, make_mesh(config.mesh))
    tmp = stage_dir / ".records.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    summary = {}
    for split, users in (("train", inputs.train), ("valid", inputs.valid)):
        groups = _groups(config, stage, users, generator, inputs.sids)
        if not groups:
            source = "beams" if stage in DIFFICULTY_BINS else "feedback"
            raise UserError(f"stage {stage}: none of the {len(users.examples)} {split} users has a {stage} negative "
                            f"(from the reference model's {source}); leave the stage out of `stages`")
        scored = preference_examples(groups, generator, config.seq_len, config.eval_batch_size)
        summary[split] = {"users": len(users.examples), **write_preference_records(scored, tmp, split)}
        say(PREFIX, f"{stage} {split}: {len(groups)} of {len(users.examples)} users have negatives; "
                    f"{summary[split]['rejected'] / len(groups):.2f} rejected a group")
    atomic_write_text(tmp / "summary.json", json.dumps(summary, indent=2))
    tmp.rename(records)
    return summary


def _evaluate(config: AlignConfig, model_dir: Path, examples: Sequence[TaskExample]) -> dict[str, float]:
    generator = load_generator(model_dir, config.sids, make_mesh(config.mesh))
    metrics = evaluate_recommendations(generator, examples, beams=config.beams, batch_size=config.eval_batch_size,
                                       ks=(1, 5, 10, 20), show_progress=False)
    return {key: value for key, value in metrics.items() if key.startswith(("recall@", "ndcg@"))}


def _test_metrics(config: AlignConfig, path: Path, model_dir: Path, examples: Sequence[TaskExample]) -> dict:
    """The test metrics of `model_dir`, computed once and kept in `path`; {} without test examples."""
    if not examples:
        return {}
    if not path.is_file():
        atomic_write_text(path, json.dumps(_evaluate(config, model_dir, examples)))
    return read_json_object(path)


def _last_training_metrics(run_dir: Path) -> dict[str, float]:
    """The last logged DPO loss and accuracy, and the last validation DPO loss, of a stage."""
    last: dict[str, float] = {}
    for record in read_metrics(run_dir):
        last.update({key: record[key] for key in ("loss", "accuracy", "chosen_nll", "valid_loss") if key in record})
    return last


def run_align(config: AlignConfig) -> dict:
    for name in ("init", "data", "sids"):
        if not getattr(config, name) or not Path(getattr(config, name)).is_dir():
            raise UserError(f"{name}: {getattr(config, name)!r} is not a directory")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "align_config.json", json.dumps(to_dict(config), indent=2))
    inputs = _inputs(config)
    start_path = out / "start.json"
    if not start_path.is_file():
        atomic_write_text(start_path, json.dumps(_evaluate(config, Path(config.init), inputs.evaluation)))
    rows = [{"stage": "fine-tuned", "model": config.init, "valid": read_json_object(start_path),
             "test": _test_metrics(config, out / "start_test.json", Path(config.init), inputs.test)}]
    say(PREFIX, f"fine-tuned: valid {rows[0]['valid']}, test {rows[0]['test']}")
    reference = Path(config.init)
    for index, stage in enumerate(config.stages, start=1):
        stage_dir = out / f"{index}_{stage}"
        result_path = stage_dir / RESULT_FILE
        if not result_path.is_file():
            stage_dir.mkdir(exist_ok=True)
            records = _write_records(config, inputs, reference, stage, stage_dir)
            steps = max(1, math.ceil(config.epochs * records["train"]["examples"] / config.batch_size))
            settings = StageSettings(stage="preference", steps=steps, learning_rate=config.learning_rate,
                                     batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed,
                                     mesh=config.mesh, warmup_steps=max(1, steps // 10), evaluations=2,
                                     eval_batches=max(1, records["valid"]["examples"] // config.batch_size),
                                     preference={"beta": config.beta, "chosen_nll": config.chosen_nll})
            identity = load_model_config(reference).num_item_ids > 0  # its table names the SIDs' rows
            model = train_stage(PREFIX, stage_dir / "train", settings, {"checkpoint": str(reference)},
                                stage_dir / "records", reference / "tokenizer", Path(config.sids) if identity else None)
            result = {"stage": stage, "model": str(model), "reference": str(reference), "steps": steps,
                      "groups": records["train"]["examples"],
                      "rejected_per_group": records["train"]["rejected"] / records["train"]["examples"],
                      "training": _last_training_metrics(stage_dir / "train"),
                      "valid": _evaluate(config, model, inputs.evaluation)}
            atomic_write_text(result_path, json.dumps(result, indent=2))
        row = {**read_json_object(result_path),
               "test": _test_metrics(config, stage_dir / "test.json", Path(read_json_object(result_path)["model"]),
                                     inputs.test)}
        say(PREFIX, f"{stage}: valid {row['valid']}, test {row['test']}")
        rows.append(row)
        reference = Path(row["model"])
    summary = {"init": config.init, "eval_users": len(inputs.evaluation), "test_users": len(inputs.test),
               "beams": config.beams, "stages": rows}
    atomic_write_text(out / RESULT_FILE, json.dumps(summary, indent=2))
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, __doc__, "a YAML file of settings (e.g. configs/align_beauty.yaml)",
                         "settings, e.g. init=runs/bench_rec/beauty/train/best stages=[easy] users=2000")


def run(args: argparse.Namespace) -> int:
    print(json.dumps(run_align(load_config(AlignConfig, args.config, args.overrides))))
    return 0
