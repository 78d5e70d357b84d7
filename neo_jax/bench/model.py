"""`neo-jax bench model`: train-step tokens/s and MFU of our decoder, against transformers + torch.

Our step is the trainer's own (`neo_jax.train.step.make_steps`: forward, backward,
global-norm clipping and AdamW, jitted over the mesh) on random weights and random
tokens; it is warmed up (the first step compiles), then timed step by step with
`block_until_ready`. MFU is model FLOP/s over the FLOP/s of a large `jnp.dot`
measured in the same run (`neo_jax.train.flops`). The reference trains the same
architecture as a transformers model (built from `ModelConfig.to_hf()`) with torch
AdamW and the same clipping, batch, sequence length and step counts, with as many
torch threads as this process may use cores. torch and transformers are test-only
dependencies, imported only when the reference runs (`--no-torch` skips it).

Speed does not depend on the weights' values, so every source gives only a shape:
a preset, a model YAML (`ModelConfig` fields), a checkpoint directory
(`model_config.json`) or a Hugging Face model directory (`config.json`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import nnx, traverse_util

from neo_jax.checkpoint import MODEL_CONFIG, abstract_decoder, load_model_config
from neo_jax.config import load_config
from neo_jax.errors import UserError
from neo_jax.hf.import_hf import HF_CONFIG_FILE, read_hf_config
from neo_jax.model import Decoder, Llama3RopeScaling, ModelConfig
from neo_jax.sharding import add_mesh_arguments, load_sharded, mesh_from_arguments, state_shardings
from neo_jax.train.config import LoraConfig, OptimizerConfig
from neo_jax.train.flops import matmul_params, measured_peak_flops, mfu, train_flops_per_token
from neo_jax.train.stages import LORA_INPUT_AXES, StagePlan, learning_rate_schedule, make_optimizer, make_plan
from neo_jax.train.step import Batch, StepFunctions, make_steps, new_train_state, train_state_shardings


# Architecture shapes only (weights are random).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(architecture="LlamaForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=128,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16),
    "small": ModelConfig(architecture="LlamaForCausalLM", vocab_size=8192, hidden_size=256,
                         intermediate_size=768, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64),
    # HuggingFaceTB/SmolLM2-135M: the backbone of our demos.
    "smollm2-135m": ModelConfig(architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576,
                                intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                                rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                                tie_word_embeddings=True),
    # meta-llama/Llama-3.2-1B and Qwen/Qwen3-0.6B: NEO's starting points (`neo-jax bench scale`).
    "llama-3.2-1b": ModelConfig(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=2048,
                                intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                                rms_norm_eps=1e-5, rope_theta=500000.0,
                                rope_scaling=Llama3RopeScaling(32.0, 1.0, 4.0, 8192), max_position_embeddings=131072,
                                tie_word_embeddings=True),
    "qwen3-0.6b": ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=151936, hidden_size=1024,
                              intermediate_size=3072, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                              rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                              tie_word_embeddings=True),
}
DEFAULT_PRESET = "small"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help=f"a model shape with random weights (default {DEFAULT_PRESET})")
    source.add_argument("--config", default=None,
                        help="a model YAML (ModelConfig fields), a checkpoint directory or a Hugging Face "
                             "model directory; only its shape is used, the weights are random")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (default 4)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed steps first; our first one compiles (default 1)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype of both models; weights and optimizer stay float32 (default float32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens")
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers + torch reference")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="also time the LoRA step of this rank (frozen kernels, x@W + s*(x@A)@B) against "
                             "the full step, the two in turns for --steps rounds (the ratio is the median of the "
                             "rounds'), with both steps' compiled memory (default 0: no LoRA step)")
    parser.add_argument("--lora-targets", default=",".join(LORA_INPUT_AXES),
                        help="comma-separated kernels the adapters adapt (default: all projections)")
    add_mesh_arguments(parser)


def model_config_from(args: argparse.Namespace) -> ModelConfig:
    """The benchmarked shape, in `args.dtype`."""
    if args.config is None:
        config = PRESETS[args.preset or DEFAULT_PRESET]
    else:
        path = Path(args.config)
        if path.is_dir() and (path / MODEL_CONFIG).is_file():
            config = load_model_config(path)
        elif path.is_dir():
            config = ModelConfig.from_hf(read_hf_config(path), source=str(path / HF_CONFIG_FILE))
        elif path.is_file():
            config = load_config(ModelConfig, path)
        else:
            raise UserError(f"--config: {path} does not exist")
    return dataclasses.replace(config, dtype=args.dtype)


def random_batch(config: ModelConfig, batch: int, seq_len: int, seed: int) -> dict[str, np.ndarray]:
    """Random next-token examples, every position a loss position: each array `[batch, seq_len]`."""
    rng = np.random.default_rng(seed)
    sequences = rng.integers(0, config.predictable_tokens, (batch, seq_len + 1), dtype=np.int32)
    ones = np.ones((batch, seq_len), np.int32)
    return {"tokens": sequences[:, :-1], "targets": sequences[:, 1:], "loss_mask": ones, "segment_ids": ones,
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy()}


def time_steps(step: Callable[[], None], warmup: int, steps: int, label: str) -> tuple[float, float]:
    """`(seconds of the warm-up steps, seconds per timed step)`; `step()` returns once its step is done."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_seconds = time.perf_counter() - start
    print(f"bench model: {label}: {warmup} warm-up steps in {warmup_seconds:.1f}s", file=sys.stderr, flush=True)
    start = time.perf_counter()
    for i in range(steps):
        step()
        print(f"bench model: {label}: step {i + 1}/{steps}, {time.perf_counter() - start:.1f}s",
              file=sys.stderr, flush=True)
    return warmup_seconds, (time.perf_counter() - start) / steps


def alternate_steps(first: Callable[[], None], second: Callable[[], None], rounds: int
                    ) -> tuple[list[float], list[float]]:
    """Seconds of each step of `first` and of `second`, run in turns for `rounds` rounds (warmed up
    already), so a shared machine's slow spells hit both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(rounds):
        for step, seconds in zip((first, second), times):
            start = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - start)
        print(f"bench model: full / LoRA round {i + 1}/{rounds}: {times[0][-1]:.2f}s / {times[1][-1]:.2f}s",
              file=sys.stderr, flush=True)
    return times


def random_weights(config: ModelConfig, seed: int) -> Callable[[tuple, tuple[int, ...]], np.ndarray]:
    """`read_param` of `load_sharded` drawing on the host (much quicker than compiling the initialisers):
    norm scales 1, every other weight normal with the config's `initializer_range`."""
    rng = np.random.default_rng(seed)

    def draw(path: tuple, shape: tuple[int, ...]) -> np.ndarray:
        if path[-1] == "scale":
            return np.ones(shape, np.float32)
        return rng.normal(0.0, config.initializer_range, shape).astype(np.float32)
    return draw


@dataclasses.dataclass(frozen=True)
class RandomModelSteps:
    """The trainer's instruct stage for a shape (every weight, or LoRA adapters and the token
    tables), nothing placed on a device yet."""

    abstract_model: Decoder
    init_state: Callable  # the decoder's parameters -> the train state at step 0
    abstract_state: dict  # `jax.ShapeDtypeStruct` leaves
    shardings: dict  # a `NamedSharding` per leaf of `abstract_state`
    steps: StepFunctions


def random_model_steps(config: ModelConfig, mesh: jax.sharding.Mesh, seed: int, total_steps: int,
                       allow_replicated: tuple[str, ...], loss_chunk: int = 0,
                       lora: LoraConfig = LoraConfig()) -> RandomModelSteps:
    """The state layout and jitted steps of the trainer's instruct stage (`make_steps`); with
    `lora.rank`, its targeted kernels frozen and adapted (every row of the token tables trains)."""
    abstract_model = abstract_decoder(config)
    graphdef, abstract_model_state = nnx.split(abstract_model)
    abstract_params = nnx.to_pure_dict(abstract_model_state)
    param_shardings = nnx.to_pure_dict(state_shardings(abstract_model_state, mesh, allow_replicated))
    plan = StagePlan("instruct", None, lora) if lora.rank else make_plan("instruct", lora, None)
    key = jax.random.key(seed)
    abstract_trainable, _ = jax.eval_shape(lambda p: plan.split(p, key), abstract_params)
    masks = plan.update_masks(abstract_trainable)
    optimizer = OptimizerConfig()
    tx = make_optimizer(optimizer, total_steps, masks)
    init_state = lambda params: new_train_state(params, plan, tx, key)
    abstract_state = jax.eval_shape(init_state, abstract_params)
    shardings = train_state_shardings(abstract_state, param_shardings, plan, tx, mesh)
    steps = make_steps(graphdef, plan, tx, masks, learning_rate_schedule(optimizer, total_steps), 1, shardings, mesh,
                       loss_chunk=loss_chunk)
    return RandomModelSteps(abstract_model, init_state, abstract_state, shardings, steps)


def memory_figures(compiled) -> dict:
    """XLA's per-device memory analysis of a compiled SPMD step, in bytes: arguments, outputs,
    temporaries, aliased (donated), and the peak estimate arguments + outputs + temporaries - aliased."""
    stats = compiled.memory_analysis()
    figures = {"argument_bytes": stats.argument_size_in_bytes, "output_bytes": stats.output_size_in_bytes,
               "temp_bytes": stats.temp_size_in_bytes, "alias_bytes": stats.alias_size_in_bytes,
               "generated_code_bytes": stats.generated_code_size_in_bytes}
    figures["peak_bytes"] = (figures["argument_bytes"] + figures["output_bytes"] + figures["temp_bytes"]
                             - figures["alias_bytes"])
    figures["peak_gib"] = figures["peak_bytes"] / 2 ** 30
    return figures


def our_train_step(config: ModelConfig, mesh: jax.sharding.Mesh, batch: dict[str, np.ndarray], seed: int,
                   total_steps: int, allow_replicated: tuple[str, ...], loss_chunk: int = 0,
                   lora: LoraConfig = LoraConfig()) -> tuple[Callable[[], None], dict]:
    """The trainer's instruct step on a random model (all weights, or `lora`'s adapters): a callable
    that runs one step, and the compiled step's memory figures (`memory_figures`) with XLA's count
    of its floating-point operations (`xla_flops`)."""
    parts = random_model_steps(config, mesh, seed, total_steps, allow_replicated, loss_chunk, lora)
    model = load_sharded(parts.abstract_model, random_weights(config, seed), mesh, allow_replicated=allow_replicated)
    state = jax.jit(parts.init_state, out_shardings=parts.shardings)(nnx.to_pure_dict(nnx.state(model)))
    global_batch: Batch = jax.device_put(batch, parts.steps.batch_sharding)
    compiled = parts.steps.train.lower(state, global_batch).compile()

    def step() -> None:
        nonlocal state
        state, metrics = compiled(state, global_batch)
        jax.block_until_ready((state, metrics))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # one entry per device program in older JAX
    return step, {**memory_figures(compiled), "xla_flops": float(cost.get("flops", 0.0))}


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def torch_reference(config: ModelConfig, batch: dict[str, np.ndarray], warmup: int, steps: int,
                    seed: int) -> dict[str, object]:
    """Train `config` as a transformers model with torch AdamW; its speed and versions."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise UserError(f"the reference needs torch and transformers ({e}); install them with "
                        "`pip install -e .[test]` or pass --no-torch") from None
    threads = usable_cores()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    hf = config.to_hf()
    hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).train()
    optimizer_config = OptimizerConfig()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(  # weight decay on matrices only, as ours
        [{"params": [p for p in params if p.ndim >= 2]},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=optimizer_config.learning_rate, betas=(optimizer_config.b1, optimizer_config.b2), eps=optimizer_config.eps,
        weight_decay=optimizer_config.weight_decay)
    tokens = torch.as_tensor(batch["tokens"], dtype=torch.long)  # [batch, len]
    targets = torch.as_tensor(batch["targets"], dtype=torch.long)  # [batch, len]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.dtype == "bfloat16"):
            logits = model(input_ids=tokens).logits  # [batch, len, vocab]
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        if optimizer_config.clip_norm:
            torch.nn.utils.clip_grad_norm_(params, optimizer_config.clip_norm)
        optimizer.step()

    warmup_seconds, step_seconds = time_steps(step, warmup, steps, "transformers + torch")
    return {"tokens_per_s": batch["tokens"].size / step_seconds, "step_seconds": step_seconds,
            "warmup_seconds": warmup_seconds, "params": model.num_parameters(), "threads": threads,
            "torch_version": torch.__version__, "transformers_version": transformers.__version__}


def _check_args(args: argparse.Namespace) -> None:
    for name in ("batch", "seq_len", "steps", "warmup"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.lora_rank < 0:
        raise UserError(f"--lora-rank must be non-negative, got {args.lora_rank}")
    unknown = [t for t in args.lora_targets.split(",") if t.strip() not in LORA_INPUT_AXES]
    if args.lora_rank and unknown:
        raise UserError(f"--lora-targets: {unknown} are not projection kernels; choose from {list(LORA_INPUT_AXES)}")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    config = model_config_from(args)
    mesh = mesh_from_arguments(args)
    data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if args.batch % data_ways:
        raise UserError(f"--batch {args.batch} is not divisible by the data axes mesh.data x mesh.fsdp = {data_ways}")
    batch = random_batch(config, args.batch, args.seq_len, args.seed)
    abstract_params = nnx.to_pure_dict(nnx.state(abstract_decoder(config)))
    flops_per_token = train_flops_per_token(matmul_params(abstract_params), config.num_layers, config.num_heads,
                                            config.head_dim, args.seq_len)
    load_before = os.getloadavg()[0]

    print("bench model: measuring peak jnp.dot FLOP/s", file=sys.stderr, flush=True)
    peak_flops = measured_peak_flops(config.dtype)
    print("bench model: building and compiling our train step", file=sys.stderr, flush=True)
    total_steps = args.warmup + args.steps
    step, memory = our_train_step(config, mesh, batch, args.seed, total_steps, args.mesh_allow_replicated)
    warmup_seconds, step_seconds = time_steps(step, args.warmup, args.steps, "neo_jax")
    tokens_per_s = args.batch * args.seq_len / step_seconds
    lora = None
    if args.lora_rank:
        adapters = LoraConfig(rank=args.lora_rank, targets=tuple(t.strip() for t in args.lora_targets.split(",")))
        print(f"bench model: building and compiling the LoRA step (rank {adapters.rank})", file=sys.stderr, flush=True)
        lora_step, lora_memory = our_train_step(config, mesh, batch, args.seed, 2 * total_steps,
                                                args.mesh_allow_replicated, lora=adapters)
        start = time.perf_counter()
        for _ in range(args.warmup):
            lora_step()
        lora_warmup = time.perf_counter() - start
        full_seconds, lora_seconds = alternate_steps(step, lora_step, args.steps)
        lora = {"rank": adapters.rank, "alpha": adapters.alpha, "targets": list(adapters.targets),
                "step_seconds": statistics.median(lora_seconds), "warmup_seconds": lora_warmup,
                "tokens_per_s": args.batch * args.seq_len / statistics.median(lora_seconds), "memory": lora_memory,
                "full_step_seconds_alternated": statistics.median(full_seconds),
                "step_time_ratio_vs_full": statistics.median(l / f for l, f in zip(lora_seconds, full_seconds)),
                "peak_memory_ratio_vs_full": lora_memory["peak_bytes"] / memory["peak_bytes"],
                "xla_flops_ratio_vs_full": lora_memory["xla_flops"] / memory["xla_flops"]}
    reference = None if args.no_torch else torch_reference(config, batch, args.warmup, args.steps, args.seed)

    devices = mesh.devices.flatten()
    result = {
        "benchmark": "model",
        "model": {"architecture": config.architecture, "layers": config.num_layers, "hidden": config.hidden_size,
                  "intermediate": config.intermediate_size, "heads": config.num_heads,
                  "kv_heads": config.num_kv_heads, "head_dim": config.head_dim, "vocab": config.vocab_size,
                  "tied_embeddings": config.tie_word_embeddings,
                  "params": sum(int(np.prod(p.shape)) for p in traverse_util.flatten_dict(abstract_params).values())},
        "dtype": config.dtype,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "mesh": dict(mesh.shape),
        "device_count": len(devices),
        "device_kind": devices[0].device_kind,
        "cpu_cores": usable_cores(),
        "jax_version": jax.__version__,
        "load_average_1m": {"start": load_before, "end": os.getloadavg()[0]},
        "tokens_per_s": tokens_per_s,
        "step_seconds": step_seconds,
        "memory": memory,
        "lora": lora,
        "warmup_seconds": warmup_seconds,
        "model_flops_per_token": flops_per_token,
        "model_flops_per_s": tokens_per_s * flops_per_token,
        "peak_flops_per_s": peak_flops,
        "mfu": mfu(tokens_per_s, flops_per_token, peak_flops),
        "torch": reference,
        "ratio_vs_torch": None if reference is None else tokens_per_s / reference["tokens_per_s"],
    }
    json.dump(result, sys.stdout)
    print()
    return 0
