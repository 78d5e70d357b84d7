"""The training loop: set up (all checks before compiling), resume, step, watch, save, stop.

    result = train(load_config(TrainConfig, "configs/train_tiny_grounding.yaml", ["steps=50"]))

Set-up order: settings and paths, joining the other processes, the mesh and the batch
layout, the Recall@K validation inputs (`eval.recall_*`), the model's vocabulary and shape,
where each parameter and optimizer value lives on the mesh (an axis that does not divide a
parameter stops the run here, unless `mesh.allow_replicated` names that dimension), the data
iterators, the latest checkpoint (and whether it may be resumed); only then is anything compiled.
A run directory with checkpoints resumes from the latest one (same data position, same
optimizer state, same learning-rate schedule). The schedule is built from `steps` and the
optimizer's learning rate, warm-up and end ratio; the run saves them in `RUN_DIR/train_config.json`,
and a resume whose settings differ is refused (`check_resume_schedule`) before anything is restored
or written: a 3,000-step run continued with steps=6000 would otherwise jump its learning rate at step
3,000. To train further, start a new run directory with `init.checkpoint=RUN_DIR/final`.
Process 0 writes `metrics.jsonl`, TensorBoard events and the progress line; every process takes
part in saves. A completed run writes its model (LoRA adapters merged) to `RUN_DIR/final`, the
`init.checkpoint` of the next stage. With `eval.select` set, `RUN_DIR/best` holds the model of the
evaluation where that metric was best (same format as `final`, plus `selection.json`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AbstractMesh, Mesh

from neo_jax.atomic import atomic_write_text
from neo_jax.catalog.item_ids import ItemIds, table_rows
from neo_jax.catalog.sid_output import load_sid_output
from neo_jax.checkpoint import (MODEL_CONFIG, TOKENIZER, abstract_decoder, load_hf_config, load_model,
                                load_model_config, load_vocab_layout, save_model)
from neo_jax.config import load_config, to_dict
from neo_jax.errors import UserError
from neo_jax.json_file import read_json_object
from neo_jax.model import Decoder, ModelConfig
from neo_jax.model.extend_vocab import extend_vocab
from neo_jax.model.loss import HistoryPenalty
from neo_jax.sharding import create_sharded, make_mesh, state_shardings
from neo_jax.tasks.builders import read_examples
from neo_jax.tokenizer import LAYOUT_FILE, MixedTokenizer
from neo_jax.train import distributed
from neo_jax.train.checkpointing import PreemptionWatch, TrainCheckpoints, abstract_like
from neo_jax.eval.recommend import recall_hook, sample_examples
from neo_jax.train.config import (SELECTABLE_METRICS, TrainConfig, check_against_mesh, check_resume_schedule,
                                  check_settings)
from neo_jax.train.flops import matmul_params, measure_peak_flops, measured_peak_flops, mfu, train_flops_per_token
from neo_jax.train.input import train_batches, validation_batches
from neo_jax.progress import Progress
from neo_jax.train.monitor import MetricsLog, progress_fields
from neo_jax.train.stages import Params, StagePlan, learning_rate_schedule, make_optimizer, make_plan
from neo_jax.train.step import (StepFunctions, TrainState, Unlikelihood, evaluated_weights, make_steps,
                                new_train_state, train_state_shardings)
from neo_jax.vocab import VocabLayout

FINAL_DIR = "final"
BEST_DIR = "best"
SELECTION_FILE = "selection.json"  # in BEST_DIR: {"metric", "value", "step"}
CONFIG_FILE = "train_config.json"

# A validation metric beyond the loss (e.g. Recall@10 of constrained decoding): model, step -> metrics.
ValidationHook = Callable[[Decoder, int], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class TrainResult:
    step: int  # steps completed (equals config.steps unless preempted)
    preempted: bool
    loss: float | None  # training loss of the last logged step
    valid_loss: float | None  # of the last evaluation
    tokens_per_s: float | None
    mfu: float | None
    final_dir: str | None  # the saved model of a completed run
    best_dir: str | None = None  # the model `eval.select` chose (None without selection)


def _run_settings(model_config: ModelConfig, config: TrainConfig) -> ModelConfig:
    """The model config with how this run computes: its dtype, attention, remat and scan."""
    return dataclasses.replace(model_config, dtype=config.compute_dtype, attention=config.attention,
                               attention_chunk=config.attention_chunk, remat=config.remat,
                               scan_layers=config.scan_layers)


def model_source(config: TrainConfig) -> tuple[ModelConfig, VocabLayout]:
    """The shape of the model to train (compute dtype from the train config) and its vocabulary.

    A checkpoint without a vocabulary layout (straight from `neo-jax import-hf`) is
    extended to the tokenizer's layout when training starts.
    """
    tokenizer_layout = (VocabLayout.load(Path(config.data.tokenizer) / LAYOUT_FILE)
                        if config.data.tokenizer is not None else None)
    if config.init.model_config is not None:
        model_config = _run_settings(load_config(ModelConfig, config.init.model_config), config)
        return dataclasses.replace(model_config, vocab_size=tokenizer_layout.padded_size,
                                   num_real_tokens=tokenizer_layout.size), tokenizer_layout
    model_config = _run_settings(load_model_config(config.init.checkpoint), config)
    layout = load_vocab_layout(config.init.checkpoint)
    if layout is None and tokenizer_layout is None:
        raise UserError(f"init.checkpoint: {config.init.checkpoint} has no SID vocabulary yet; set data.tokenizer "
                        "to the tokenizer whose vocabulary layout it should be extended to")
    if layout is None:
        if tokenizer_layout.text_size != model_config.vocab_size:
            raise UserError(f"data.tokenizer: its layout reserves {tokenizer_layout.text_size} text ids but "
                            f"init.checkpoint {config.init.checkpoint} has {model_config.vocab_size} embedding rows")
        return dataclasses.replace(model_config, vocab_size=tokenizer_layout.padded_size,
                                   num_real_tokens=tokenizer_layout.size), tokenizer_layout
    if tokenizer_layout is not None and tokenizer_layout != layout:
        raise UserError(f"data.tokenizer: the vocabulary layout of {config.data.tokenizer} differs from "
                        f"the one of init.checkpoint {config.init.checkpoint}")
    return model_config, layout


def item_identity(config: TrainConfig, model_config: ModelConfig,
                  layout: VocabLayout) -> tuple[ModelConfig, ItemIds | None]:
    """The model config with its item-identity table sized, and the batches' item ids, from `data.sids`:
    a random model gets a table of that catalog; a checkpoint's table must be that catalog's."""
    if config.data.sids is None:
        if model_config.num_item_ids:
            raise UserError(f"init.checkpoint {config.init.checkpoint} has an item-identity table; set data.sids "
                            "to the `neo-jax sids build` directory it was trained with")
        return model_config, None
    item_ids = ItemIds.build(load_sid_output(config.data.sids).trie, layout)
    if config.init.model_config is not None:
        return dataclasses.replace(model_config, num_item_ids=table_rows(item_ids.num_items)), item_ids
    if not model_config.num_item_ids:
        raise UserError(f"data.sids: init.checkpoint {config.init.checkpoint} has no item-identity table, and "
                        "one is added only to a random model (init.model_config); leave data.sids unset")
    item_ids.check_model(model_config.num_item_ids, f"init.checkpoint {config.init.checkpoint}")
    return model_config, item_ids


def _initial_params(config: TrainConfig, model_config: ModelConfig, layout: VocabLayout, mesh: Mesh) -> dict:
    allowed = config.mesh.allow_replicated
    if config.init.model_config is not None:
        model = create_sharded(lambda: Decoder(model_config, nnx.Rngs(config.seed)), mesh, allowed)
    else:
        model = load_model(config.init.checkpoint, mesh, dtype=config.compute_dtype, allow_replicated=allowed)
        if model.config.vocab_size != model_config.vocab_size:  # not extended yet (see `model_source`)
            model = extend_vocab(model, layout, mesh, seed=config.seed, allow_replicated=allowed)
    return nnx.to_pure_dict(nnx.state(model))


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """The train state of a config, abstract (shapes, dtypes and shardings; nothing on a device)."""

    graphdef: nnx.GraphDef  # of the decoder
    abstract_params: Params  # the decoder's parameters, as `jax.ShapeDtypeStruct`s
    plan: StagePlan
    masks: Params  # which trainable values may change
    tx: optax.GradientTransformation
    init_state: Callable[[Params], TrainState]  # the decoder's parameters -> the state at step 0
    abstract_state: TrainState
    shardings: TrainState  # a `NamedSharding` per leaf of `abstract_state`


def train_state_layout(config: TrainConfig, model_config: ModelConfig, layout: VocabLayout,
                       mesh: Mesh | AbstractMesh) -> StateLayout:
    """What the run's state holds and where it lives on `mesh`; a mesh axis that does not divide a
    parameter stops here (`neo_jax.sharding.logical_to_spec`), before anything is compiled."""
    graphdef, abstract_model_state = nnx.split(abstract_decoder(model_config))
    abstract_params = nnx.to_pure_dict(abstract_model_state)
    param_shardings = nnx.to_pure_dict(state_shardings(abstract_model_state, mesh, config.mesh.allow_replicated))
    plan = make_plan(config.stage, config.lora, layout)
    key = jax.random.key(config.seed)
    abstract_trainable, _ = jax.eval_shape(lambda p: plan.split(p, key), abstract_params)
    masks = plan.update_masks(abstract_trainable)
    tx = make_optimizer(config.optimizer, config.steps, masks)
    init_state = lambda params: new_train_state(params, plan, tx, key, ema=config.optimizer.ema_decay > 0)
    abstract_state = jax.eval_shape(init_state, abstract_params)
    shardings = train_state_shardings(abstract_state, param_shardings, plan, tx, mesh)
    return StateLayout(graphdef, abstract_params, plan, masks, tx, init_state, abstract_state, shardings)


class _Throughput:
    """Tokens/s and MFU over the steps since the last reset (compilation, evaluation and saves excluded).

    `peak_flops` is measured at start (`measured_peak_flops`, times `processes`); a start on a busy
    machine measures it low, so when the steps outrun it, it is measured again and the larger kept.
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float | None,
                 dtype_name: str = "float32", processes: int = 1):
        self.tokens_per_step, self.flops_per_token, self.peak_flops = tokens_per_step, flops_per_token, peak_flops
        self.dtype_name, self.processes = dtype_name, processes
        self.reset()

    def reset(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def measure(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        if not self.steps or elapsed <= 0:
            return {}
        tokens_per_s = self.tokens_per_step * self.steps / elapsed
        measured = {"tokens_per_s": tokens_per_s}
        if self.peak_flops:
            if mfu(tokens_per_s, self.flops_per_token, self.peak_flops) > 1.0:
                self.peak_flops = max(self.peak_flops, measure_peak_flops(self.dtype_name) * self.processes)
            measured["mfu"] = mfu(tokens_per_s, self.flops_per_token, self.peak_flops)
        return measured


@dataclasses.dataclass
class _Run:
    """What the loop works with, once set up."""

    config: TrainConfig
    mesh: Mesh
    graphdef: nnx.GraphDef
    plan: StagePlan
    layout: VocabLayout
    steps: StepFunctions
    state: TrainState
    start_step: int
    data: object  # grain DatasetIterator of this process's rows
    valid_batches: list[dict[str, np.ndarray]]  # this process's rows of the first `eval.batches` validation batches
    checkpoints: TrainCheckpoints
    throughput: _Throughput
    hooks: list[ValidationHook]  # the config's own validation metrics (Recall@K)
    merge_params: Callable  # jitted: (trainable, frozen) -> the model's params (adapters merged)


def _config_hooks(config: TrainConfig, mesh: Mesh) -> list[ValidationHook]:
    """Recall@5/@10 and NDCG@10 on a seeded sample of `eval.recall_users` examples, when
    `eval.recall_examples` is set."""
    evaluation = config.eval
    if evaluation.recall_examples is None:
        return []
    examples = sample_examples(read_examples(evaluation.recall_examples), evaluation.recall_users, config.seed)
    if not examples:
        raise UserError(f"eval.recall_examples: {evaluation.recall_examples} holds no examples")
    return [recall_hook(MixedTokenizer.load(config.data.tokenizer), load_sid_output(evaluation.recall_sids),
                        examples, evaluation.recall_beams, mesh)]


def _check_resume(config: TrainConfig, latest_step: int) -> None:
    """A run directory with checkpoints resumes only under the schedule settings it saved."""
    saved_path = Path(config.run_dir) / CONFIG_FILE
    if not saved_path.is_file():  # a run dir of an older version, or copied without it: nothing to compare
        if jax.process_index() == 0:
            print(f"neo_jax: {saved_path} is missing; resuming from step {latest_step} without checking that "
                  "steps and the learning-rate schedule are the run's own", file=sys.stderr, flush=True)
        return
    check_resume_schedule(read_json_object(saved_path), config, latest_step, Path(config.run_dir) / FINAL_DIR)


def _set_up(config: TrainConfig, devices: Sequence[jax.Device] | None) -> _Run:
    check_settings(config)
    distributed.initialize(config.distributed)
    mesh = make_mesh(config.mesh, devices)
    check_against_mesh(config, dict(mesh.shape), jax.process_count())
    hooks = _config_hooks(config, mesh)
    model_config, layout = model_source(config)
    model_config, item_ids = item_identity(config, model_config, layout)
    state_layout = train_state_layout(config, model_config, layout, mesh)
    shardings = state_layout.shardings

    data = train_batches(config, item_ids)
    valid_batches = []  # every evaluation reads the same validation batches: read them once
    if config.eval.every_steps:
        valid_batches = list(itertools.islice(validation_batches(config, item_ids), config.eval.batches))
    checkpoints = TrainCheckpoints(config.run_dir, config.checkpoint)
    start_step = checkpoints.latest_step()
    if start_step is not None:
        try:
            _check_resume(config, start_step)  # before restoring, compiling or writing anything
        except UserError:
            checkpoints.close()
            data.close()
            raise
        state = checkpoints.restore(start_step, abstract_like(state_layout.abstract_state, shardings), data)
    else:
        start_step = 0
        state = jax.jit(state_layout.init_state, out_shardings=shardings)(
            _initial_params(config, model_config, layout, mesh))

    unlikelihood = (Unlikelihood(config.unlikelihood,
                                 HistoryPenalty(layout.code_level_table(), config.unlikelihood_from_level,
                                                config.unlikelihood_avoided_from_level))
                    if config.unlikelihood else None)
    plan = state_layout.plan
    steps = make_steps(state_layout.graphdef, plan, state_layout.tx, state_layout.masks,
                       learning_rate_schedule(config.optimizer, config.steps), config.grad_accum_steps, shardings,
                       mesh, config.dropout, config.seed, unlikelihood, config.optimizer.ema_decay, config.loss_chunk,
                       config.preference if config.stage == "preference" else None, config.item_id_dropout)
    flops_per_token = train_flops_per_token(matmul_params(state_layout.abstract_params), model_config.num_layers,
                                            model_config.num_heads, model_config.head_dim, config.seq_len)
    peak = measured_peak_flops(config.compute_dtype) * jax.process_count() if config.mfu else None
    throughput = _Throughput(config.batch_size * config.seq_len, flops_per_token, peak, config.compute_dtype, jax.process_count())
    return _Run(config, mesh, state_layout.graphdef, plan, layout, steps, state, start_step, data, valid_batches, checkpoints,
                throughput, hooks, jax.jit(plan.params))


def _global_batch(run: _Run, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return distributed.global_batch(local, run.mesh)


def _host_value(replicated: jax.Array) -> float:
    """A replicated scalar on the host (this process's copy; works across processes)."""
    return float(np.asarray(replicated.addressable_data(0)))


def validation_loss(run: _Run) -> float:
    """Completion-token loss (the preference stage: softmax-DPO loss per group) over the first
    `eval.batches` validation batches (the same every time)."""
    loss_sum = weight = 0.0
    for batch in run.valid_batches:
        batch_loss_sum, batch_weight = run.steps.eval(run.state, _global_batch(run, batch))
        loss_sum, weight = loss_sum + _host_value(batch_loss_sum), weight + _host_value(batch_weight)
    return loss_sum / max(weight, 1.0)


def current_model(run: _Run) -> Decoder:
    """The model as trained so far (adapters merged; the weight average where `optimizer.ema_decay`
    keeps one), on the run's mesh."""
    params = run.merge_params(evaluated_weights(run.state), run.state["frozen"])
    return nnx.merge(run.graphdef, params)


def _evaluate(run: _Run, step: int, hooks: Sequence[ValidationHook]) -> dict[str, float]:
    metrics = {"valid_loss": validation_loss(run)}
    if hooks:
        model = current_model(run)
        for hook in hooks:
            metrics.update(hook(model, step))
    return metrics


def _save_final(run: _Run, trained: bool) -> str:
    """Write the trained model to `RUN_DIR/final`, replacing an older one (kept when nothing
    was trained)."""
    final_dir = Path(run.config.run_dir) / FINAL_DIR
    if (final_dir / MODEL_CONFIG).is_file() and not trained:
        return str(final_dir)
    return _write_model_dir(run, FINAL_DIR)


def _write_model_dir(run: _Run, name: str, extra_files: dict[str, str] | None = None) -> str:
    """Write the current model, with a copy of its tokenizer (`tokenizer/`) and `extra_files`
    (name -> text), to `RUN_DIR/name`, replacing an older one.

    The model is saved under `.NAME.tmp` and swapped in by two renames, so `NAME` is never
    half-written; a crash between the renames leaves the new model in `.NAME.tmp` and the
    old one in `.NAME.old`, and the next save writes `NAME` again."""
    run_dir = Path(run.config.run_dir)
    model_dir, tmp_dir, old_dir = run_dir / name, run_dir / f".{name}.tmp", run_dir / f".{name}.old"
    if jax.process_index() == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        shutil.rmtree(old_dir, ignore_errors=True)
    multihost_utils.sync_global_devices(f"neo_jax: {name} model staging cleared")
    hf_config = load_hf_config(run.config.init.checkpoint) if run.config.init.checkpoint else None
    save_model(tmp_dir, current_model(run), run.layout, hf_config)
    if jax.process_index() == 0:
        if run.config.data.tokenizer:  # the saved model carries its tokenizer
            shutil.copytree(run.config.data.tokenizer, tmp_dir / TOKENIZER, dirs_exist_ok=True)
        for file_name, text in (extra_files or {}).items():
            (tmp_dir / file_name).write_text(text, encoding="utf-8")
    multihost_utils.sync_global_devices(f"neo_jax: {name} model staged")
    if jax.process_index() == 0:
        if model_dir.exists():
            model_dir.rename(old_dir)
        tmp_dir.rename(model_dir)
        shutil.rmtree(old_dir, ignore_errors=True)
    multihost_utils.sync_global_devices(f"neo_jax: {name} model in place")
    return str(model_dir)


class _Selection:
    """`RUN_DIR/best`: the model of the evaluation where `eval.select` was best so far. A resumed
    run reads the best value back from `best/selection.json`."""

    def __init__(self, run: _Run):
        self.metric = run.config.eval.select
        self.higher_is_better = SELECTABLE_METRICS[self.metric]
        self.path = Path(run.config.run_dir) / BEST_DIR
        saved_path = self.path / SELECTION_FILE
        self.best = read_json_object(saved_path)["value"] if saved_path.is_file() else None

    def offer(self, run: _Run, step: int, metrics: dict[str, float]) -> None:
        """Save the current model as the best if this evaluation's metric beats every earlier one."""
        value = metrics[self.metric]
        if self.best is not None and (value <= self.best if self.higher_is_better else value >= self.best):
            return
        self.best = value
        selection = {"metric": self.metric, "value": value, "step": step}
        _write_model_dir(run, BEST_DIR, {SELECTION_FILE: json.dumps(selection, indent=2)})


class _Monitor:
    """Process 0's view of the run: metrics.jsonl + TensorBoard and the progress line."""

    def __init__(self, config: TrainConfig, start_step: int):
        self.is_main = jax.process_index() == 0
        self.log = MetricsLog(config.run_dir) if self.is_main else None
        self.progress = Progress(config.steps, label="train", start=start_step) if self.is_main else None
        self.total_steps = config.steps
        if self.is_main:
            atomic_write_text(Path(config.run_dir) / CONFIG_FILE, json.dumps(to_dict(config), indent=2))

    def record(self, step: int, metrics: dict[str, float]) -> None:
        if self.is_main:
            self.log.write(step, metrics)
            self.progress.update(step, progress_fields(metrics), force=step == self.total_steps)

    def close(self) -> None:
        if self.is_main:
            self.log.close()
            self.progress.close()


def _run_steps(run: _Run, monitor: _Monitor, preemption: PreemptionWatch,
               hooks: Sequence[ValidationHook]) -> TrainResult:
    """Step until `config.steps` or a preemption notice; save on schedule and when stopping."""
    config, step, preempted = run.config, run.start_step, False
    selection = _Selection(run) if config.eval.select else None
    latest: dict[str, float] = {}  # the newest value of every metric, for the result

    def step_record(metrics: dict[str, jax.Array]) -> dict[str, float]:
        return {**{key: _host_value(value) for key, value in metrics.items()}, **run.throughput.measure()}

    if config.eval.every_steps and step == 0:  # the baseline the validation curve starts from
        latest.update(_evaluate(run, 0, hooks))
        monitor.record(0, latest)
        if selection is not None:
            selection.offer(run, 0, latest)
    while step < config.steps and not preempted:
        run.state, metrics = run.steps.train(run.state, _global_batch(run, next(run.data)))
        step += 1
        run.throughput.steps += 1
        if step == run.start_step + 1:  # the first step compiled: time from here
            jax.block_until_ready(metrics)
            run.throughput.reset()
        logged = step % config.log_every == 0 or step == config.steps
        record = step_record(metrics) if logged else {}
        if config.eval.every_steps and (step % config.eval.every_steps == 0 or step == config.steps):
            record.update(_evaluate(run, step, hooks))
            if selection is not None:
                selection.offer(run, step, record)
        preempted = preemption.reached(step)  # after this step's evaluation: a notice during it counts
        if preempted and not logged:
            record.update(step_record(metrics))
        run.checkpoints.save(step, run.state, run.data, force=preempted or step == config.steps)
        if record:
            monitor.record(step, record)
            latest.update(record)
            run.throughput.reset()
    return TrainResult(step, preempted, latest.get("loss"), latest.get("valid_loss"), latest.get("tokens_per_s"),
                       latest.get("mfu"), final_dir=None,
                       best_dir=str(selection.path) if selection is not None and selection.best is not None else None)


def train(config: TrainConfig, devices: Sequence[jax.Device] | None = None,
          validation_hooks: Sequence[ValidationHook] = ()) -> TrainResult:
    """Run (or resume) the training `config` describes, on a mesh over `devices` (default: all)."""
    run = _set_up(config, devices)
    monitor = _Monitor(config, run.start_step)
    preemption = PreemptionWatch()
    try:
        result = _run_steps(run, monitor, preemption, [*run.hooks, *validation_hooks])
    finally:
        run.checkpoints.wait()
        run.checkpoints.close()
        preemption.close()
        monitor.close()
    if result.preempted:
        return result
    return dataclasses.replace(result, final_dir=_save_final(run, trained=result.step > run.start_step))
