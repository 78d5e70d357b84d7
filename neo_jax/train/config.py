"""`TrainConfig`: everything one `neo-jax train` run needs, read from YAML plus `key=value` overrides.

The checks here run before any device work: `check_settings` needs only the config
and the file system; `check_against_mesh` needs the mesh shape and process count. Each
failure is one `UserError` line naming the setting.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import grain

from neo_jax.config import MeshConfig, to_dict
from neo_jax.errors import UserError
from neo_jax.tasks.pipeline import check_task_weights, record_tasks
from neo_jax.tasks.records import record_paths
from neo_jax.train.distributed import DistributedConfig

@dataclasses.dataclass(frozen=True)
class InitConfig:
    """Where the weights start: exactly one of a model checkpoint or a new random model.

    `checkpoint` is a previous stage's `RUN_DIR/final`, or what `neo-jax import-hf`
    wrote (extended to `data.tokenizer`'s vocabulary layout when training starts).
    `model_config` is a `ModelConfig` YAML (e.g. configs/model_tiny.yaml) for a random
    model seeded by `seed`; its `vocab_size` is replaced by the tokenizer's padded
    vocabulary. A run that finds its own checkpoints
    in `RUN_DIR/checkpoints` resumes from them instead, with the learning-rate schedule it
    started with (`check_resume_schedule`).
    """

    checkpoint: str | None = None
    model_config: str | None = None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """ArrayRecord shards written by `neo-jax data records`, and how they are read.

    The global batch is the concatenation of `num_shards` equal parts, part i packed from
    every num_shards-th record starting at i; each process reads `num_shards / processes`
    consecutive parts. So the batches depend on `num_shards`, never on the process count.
    `task_weights` (e.g. `{recommend: 3, text_to_sid: 1}`) sets the training mix of the
    records' `task` fields; tasks left out are not trained on, and empty keeps the mix the
    records were written with. Validation always reads the valid split as written.
    """

    records_dir: str = ""
    train_split: str = "train"
    valid_split: str = "valid"
    tokenizer: str | None = None  # MixedTokenizer directory; gives the vocabulary of a random model
    # The `neo-jax sids build` directory whose items a model with item identity (`num_item_ids`) names;
    # a random model's table is sized from it (`neo_jax.catalog.item_ids`).
    sids: str | None = None
    num_shards: int | None = None  # default: the number of processes
    shuffle: bool = True
    packing_bins: int = 0  # rows packed at once per shard; 0: the shard's rows per batch
    read_threads: int = 2
    prefetch_batches: int = 2
    task_weights: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW, linear warm-up then cosine decay to `end_lr_ratio * learning_rate`, global-norm clipping."""

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    end_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices only (not norm scales or biases)
    clip_norm: float = 1.0  # 0 turns clipping off
    # An exponential moving average of the weights at this decay (0: none): evaluation, Recall
    # hooks and the saved model use the average (`neo_jax.train.step.ema_update`).
    ema_decay: float = 0.0


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the named projections (instruct stage); rank 0 trains the full model."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_kernel", "k_kernel", "v_kernel", "o_kernel", "gate_kernel", "up_kernel",
                                "down_kernel")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 200
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The validation loss every `every_steps` steps and, with `recall_examples` and
    `recall_sids` set, Recall@5/@10 and NDCG@10 of constrained beam search in ID mode
    over a seeded sample of `recall_users` examples (`valid_recall@5`, ... in metrics.jsonl).

    `select` names one of those metrics (`valid_loss`, lower is better; `valid_recall@5`,
    `valid_recall@10`, `valid_ndcg@10`, higher is better): `RUN_DIR/best` then holds the model
    of the evaluation where it was best so far (early stopping's choice, without stopping),
    with `selection.json` saying the step and the value."""

    every_steps: int = 200  # 0 turns validation off
    batches: int = 4  # validation batches per evaluation
    recall_examples: str | None = None  # valid.jsonl written by `neo-jax data tasks`
    recall_sids: str | None = None  # the `neo-jax sids build` directory of the catalog
    recall_users: int = 64  # a sample drawn with the run's seed (all examples when there are fewer)
    recall_beams: int = 10
    select: str = ""  # "": no model selection


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """The `preference` stage's objective: softmax-DPO (`neo_jax.model.preference`) at `beta` over the
    groups of preference records (`neo_jax.tasks.preference`: a chosen completion, N rejected, the
    reference model's log-probabilities), plus `chosen_nll` times the chosen completion's summed
    negative log-likelihood, which keeps the chosen item likely while the margins grow."""

    beta: float = 1.0
    chosen_nll: float = 0.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_dir: str = ""
    # grounding: only the SID rows learn; instruct: every weight (or LoRA adapters); preference:
    # every weight, on preference records (`data.records_dir` written by `neo-jax align`).
    stage: Literal["grounding", "instruct", "preference"] = "instruct"
    init: InitConfig = InitConfig()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    lora: LoraConfig = LoraConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    steps: int = 1000
    batch_size: int = 8  # sequences per optimizer step, over all processes
    seq_len: int = 512
    grad_accum_steps: int = 1  # the batch is split into this many micro-batches
    compute_dtype: Literal["float32", "bfloat16"] = "float32"  # weights stay float32
    # How the model's forward pass runs (the model config's own settings of the same names):
    # attention "einsum" | "xla" | "cudnn", attention_chunk, remat "none" | "full" | "dots" | "dots_no_batch",
    # scan_layers (one `lax.scan` over the layers); see `neo_jax.model.config`.
    attention: Literal["einsum", "xla", "cudnn"] = "einsum"
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    scan_layers: bool = False
    attention_chunk: int = 0  # queries attended at a time; 0: all at once
    loss_chunk: int = 0  # positions the output head runs on at a time in the loss; 0: all at once
    dropout: float = 0.0  # on the embeddings and every residual branch, training only
    # Share of the batches' item ids (`data.sids`: a model with item identity) dropped to 0 at each
    # training step, so the model keeps reading an item's codes, not its identity alone; training only.
    item_id_dropout: float = 0.0
    # Weight of the history unlikelihood term (`neo_jax.model.loss.history_unlikelihood`): the
    # codes that would name an item already in the sequence are penalised, from SID level
    # `unlikelihood_from_level` (0-based) on; 0 turns it off. With 3 levels of 256 over Beauty's
    # 12k items a two-code prefix holds one or two items, so from level 1 a penalised code names
    # (nearly) only the earlier item; level 0 would push away clusters of ~50 similar items.
    # Avoided spans (records written with `neo-jax data tasks --avoid-repeats`) are penalised at the
    # same weight from `unlikelihood_avoided_from_level` on: from level 2 only the codes that name the
    # history item itself (a penalised level-1 code would push away its one or two siblings too).
    unlikelihood: float = 0.0
    unlikelihood_from_level: int = 1
    unlikelihood_avoided_from_level: int = 2
    preference: PreferenceConfig = PreferenceConfig()
    seed: int = 0
    log_every: int = 10
    mfu: bool = True  # measure this machine's matmul FLOP/s once and report MFU

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum_steps


def _positive(config: TrainConfig, names: tuple[str, ...]) -> None:
    for name in names:
        value = config
        for part in name.split("."):
            value = getattr(value, part)
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")


def check_settings(config: TrainConfig) -> None:
    """Checks that need only the config and the file system."""
    if not config.run_dir:
        raise UserError("run_dir is not set; give the directory for checkpoints and metrics")
    _positive(config, ("steps", "batch_size", "seq_len", "grad_accum_steps", "log_every",
                       "checkpoint.every_steps", "checkpoint.keep", "eval.batches"))
    if config.batch_size % config.grad_accum_steps:
        raise UserError(f"batch_size {config.batch_size} is not divisible by grad_accum_steps "
                        f"{config.grad_accum_steps}")
    if config.seq_len < 2:
        raise UserError(f"seq_len must be at least 2, got {config.seq_len}")
    if config.loss_chunk < 0:
        raise UserError(f"loss_chunk must be non-negative, got {config.loss_chunk}")
    if not 0.0 <= config.dropout < 1.0 or not 0.0 <= config.item_id_dropout < 1.0:
        raise UserError(f"dropout and item_id_dropout must be in [0, 1), got {config.dropout} and "
                        f"{config.item_id_dropout}")
    if config.unlikelihood < 0 or min(config.unlikelihood_from_level, config.unlikelihood_avoided_from_level) < 0:
        raise UserError(f"unlikelihood, unlikelihood_from_level and unlikelihood_avoided_from_level must be "
                        f"non-negative, got {config.unlikelihood}, {config.unlikelihood_from_level} and "
                        f"{config.unlikelihood_avoided_from_level}")
    if config.stage == "preference" and (config.unlikelihood or config.loss_chunk):
        raise UserError("the preference stage's objective is softmax-DPO alone: unlikelihood and loss_chunk "
                        f"must be 0, got {config.unlikelihood} and {config.loss_chunk}")
    if config.preference.beta <= 0 or config.preference.chosen_nll < 0:
        raise UserError(f"preference.beta must be positive and preference.chosen_nll non-negative, got "
                        f"{config.preference.beta} and {config.preference.chosen_nll}")
    opt = config.optimizer
    if opt.learning_rate <= 0 or opt.warmup_steps < 0 or not 0 <= opt.end_lr_ratio <= 1 or opt.clip_norm < 0:
        raise UserError("optimizer: learning_rate must be positive, warmup_steps and clip_norm non-negative, "
                        f"end_lr_ratio in [0, 1]; got {opt}")
    if not 0.0 <= opt.ema_decay < 1.0:
        raise UserError(f"optimizer.ema_decay must be in [0, 1) (0: no weight average), got {opt.ema_decay}")
    if config.data.num_shards is not None and config.data.num_shards < 1:
        raise UserError(f"data.num_shards must be at least 1, got {config.data.num_shards}")
    check_model_settings(config)
    if not config.data.records_dir:
        raise UserError("data.records_dir is not set; give the output directory of `neo-jax data records`")
    if not Path(config.data.records_dir).is_dir():
        raise UserError(f"data.records_dir: {config.data.records_dir} does not exist")
    splits = {"data.train_split": config.data.train_split}
    if config.eval.every_steps:
        splits["data.valid_split"] = config.data.valid_split
    for setting, split in splits.items():
        try:
            record_paths(config.data.records_dir, split)
        except UserError as e:
            raise UserError(f"{setting}: {e}") from None
    _check_task_weights(config.data)
    _check_recall(config)


def check_model_settings(config: TrainConfig) -> None:
    """Checks of what the model and its train state are made from (`lora`, `init`, `data.tokenizer`):
    the part of `check_settings` that `neo-jax shard-plan` needs."""
    if config.lora.rank < 0:
        raise UserError(f"lora.rank must be non-negative, got {config.lora.rank}")
    if config.lora.rank and config.stage != "instruct":
        raise UserError(f"lora.rank={config.lora.rank} needs stage=instruct: the {config.stage} stage "
                        "does not train adapters")
    init = config.init
    if (init.checkpoint is None) == (init.model_config is None):
        raise UserError("set exactly one of init.checkpoint (a model checkpoint directory) and init.model_config "
                        "(the model YAML of a new random model)")
    if init.checkpoint is not None and not Path(init.checkpoint).is_dir():
        raise UserError(f"init.checkpoint: {init.checkpoint} does not exist")
    if init.model_config is not None and not Path(init.model_config).is_file():
        raise UserError(f"init.model_config: {init.model_config} does not exist")
    if init.model_config is not None and config.data.tokenizer is None:
        raise UserError("data.tokenizer is not set; a random model takes its vocabulary from the tokenizer")
    if config.data.tokenizer is not None and not Path(config.data.tokenizer).is_dir():
        raise UserError(f"data.tokenizer: {config.data.tokenizer} does not exist")


def _check_task_weights(data: DataConfig) -> None:
    """Weights are valid and every weighted task has records in the train split (reads each record once)."""
    check_task_weights(data.task_weights, "data.task_weights")
    if not data.task_weights:
        return
    paths = record_paths(data.records_dir, data.train_split)
    source = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))
    present = set(record_tasks(source, data.read_threads))
    unknown = sorted(set(data.task_weights) - present)
    if unknown:
        raise UserError(f"data.task_weights: no {data.train_split} record has task {unknown[0]!r}; "
                        f"the records' tasks are {sorted(present)}")


# The metrics `eval.select` may name, and whether a larger value is better.
SELECTABLE_METRICS = {"valid_loss": False, "valid_recall@5": True, "valid_recall@10": True, "valid_ndcg@10": True}


def _check_recall(config: TrainConfig) -> None:
    evaluation = config.eval
    if evaluation.select:
        if evaluation.select not in SELECTABLE_METRICS:
            raise UserError(f"eval.select: unknown metric {evaluation.select!r}; choose one of "
                            f"{sorted(SELECTABLE_METRICS)} (or leave it empty)")
        if not evaluation.every_steps:
            raise UserError("eval.select needs evaluations; eval.every_steps=0 turns them off")
        if evaluation.select != "valid_loss" and evaluation.recall_examples is None:
            raise UserError(f"eval.select={evaluation.select} needs eval.recall_examples and eval.recall_sids")
    if (evaluation.recall_examples is None) != (evaluation.recall_sids is None):
        raise UserError("set both eval.recall_examples (a valid.jsonl) and eval.recall_sids (a sids build "
                        "directory), or neither")
    if evaluation.recall_examples is None:
        return
    _positive(config, ("eval.recall_users", "eval.recall_beams"))
    if evaluation.recall_beams < 10:
        raise UserError(f"eval.recall_beams must be at least 10 for Recall@10, got {evaluation.recall_beams}")
    if not config.eval.every_steps:
        raise UserError("eval.recall_examples is set but eval.every_steps=0 turns evaluation off")
    if not Path(evaluation.recall_examples).is_file():
        raise UserError(f"eval.recall_examples: {evaluation.recall_examples} does not exist")
    if not Path(evaluation.recall_sids).is_dir():
        raise UserError(f"eval.recall_sids: {evaluation.recall_sids} does not exist")
    if config.data.tokenizer is None:
        raise UserError("data.tokenizer is not set; the Recall evaluation encodes its prompts with it")


# The settings the learning-rate schedule is built from (`neo_jax.train.stages.learning_rate_schedule`:
# warm-up, then cosine decay over `steps`).
SCHEDULE_SETTINGS = ("steps", "optimizer.learning_rate", "optimizer.warmup_steps", "optimizer.end_lr_ratio",
                     "optimizer.ema_decay")
SETTING_DEFAULTS = {"optimizer.ema_decay": 0.0}  # for a run saved before the setting existed


def _setting(values: dict, name: str):
    for part in name.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return values


def schedule_settings(values: dict) -> dict[str, object]:
    """The `SCHEDULE_SETTINGS` of a config as a plain dict (`neo_jax.config.to_dict`), by dotted name."""
    settings = {name: _setting(values, name) for name in SCHEDULE_SETTINGS}
    return {name: SETTING_DEFAULTS.get(name) if value is None else value for name, value in settings.items()}


def check_resume_schedule(saved: dict, config: TrainConfig, latest_step: int, final: str | Path) -> None:
    """Refuse to resume a run whose checkpoints were written under other schedule settings.

    `saved` is the run's own config as saved in `RUN_DIR/train_config.json` (a plain dict);
    `final` is where the run writes its model (`RUN_DIR/final`).
    Resuming with another `steps` (or learning rate, warm-up, end ratio, weight-average decay) would rebuild the
    schedule mid-run and jump the learning rate at the restored step; instead, finish the run
    with its own settings, or train further in a new run_dir initialised from `RUN_DIR/final`.
    """
    from neo_jax.train.stages import learning_rate_schedule  # stages imports this module

    before, now = schedule_settings(saved), schedule_settings(to_dict(config))
    differ = [name for name in SCHEDULE_SETTINGS if before[name] != now[name]]
    if not differ:
        return
    changes = ", ".join(f"{name} {before[name]} -> {now[name]}" for name in differ)
    original = " ".join(f"{name}={before[name]}" for name in differ)
    jump = ""
    try:
        saved_optimizer = OptimizerConfig(**saved["optimizer"])
        lr_before = float(learning_rate_schedule(saved_optimizer, int(saved["steps"]))(latest_step))
        lr_now = float(learning_rate_schedule(config.optimizer, config.steps)(latest_step))
        jump = f" (the learning rate at step {latest_step} would go from {lr_before:.3g} to {lr_now:.3g})"
    except (KeyError, TypeError, ValueError):
        pass  # a saved config of another shape: the settings above still say what differs
    finished = isinstance(before["steps"], int) and latest_step >= before["steps"]
    how = (f"This run is complete (its model is {final}); to train further, start a new run_dir with "
           f"init.checkpoint={final} (and no init.model_config): a new optimizer and schedule. To reuse it "
           f"unchanged, pass its own settings ({original})." if finished else
           f"To continue it, pass its own settings ({original}); to train further with a new schedule, "
           f"finish it that way, then start a new run_dir with init.checkpoint={final} (and no init.model_config).")
    raise UserError(
        f"run_dir {config.run_dir} holds checkpoints up to step {latest_step} of a run whose learning-rate "
        f"schedule differs from this config's: {changes}. Resuming would rebuild the schedule mid-run{jump}, "
        f"so it is refused; nothing in the run_dir was changed. {how}")


def num_data_shards(config: TrainConfig, process_count: int) -> int:
    return config.data.num_shards or process_count


def check_against_mesh(config: TrainConfig, mesh_shape: dict[str, int], process_count: int) -> None:
    """Checks that need the mesh axis sizes and the process count (still before compiling)."""
    data_ways = mesh_shape["data"] * mesh_shape["fsdp"]
    if config.micro_batch_size % data_ways:
        raise UserError(f"batch_size {config.batch_size} (micro-batch {config.micro_batch_size} after "
                        f"grad_accum_steps {config.grad_accum_steps}) is not divisible by the data axes "
                        f"mesh.data x mesh.fsdp = {data_ways}")
    shards = num_data_shards(config, process_count)
    if shards % process_count:
        raise UserError(f"data.num_shards {shards} is not divisible by the {process_count} processes")
    if config.batch_size % shards:
        raise UserError(f"batch_size {config.batch_size} is not divisible by data.num_shards {shards}")
