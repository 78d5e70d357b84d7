"""`neo-jax bench scale`: what the real train and decode steps of pod-sized models need per device.

For each model shape (the Hugging Face shapes of Llama-3.2-1B, Qwen3-0.6B and SmolLM2-135M by
default; random weights that are never made) and each mesh layout (`fsdp=8` and `fsdp=4,tensor=2`
by default, over this process's devices: on a CPU, emulate them with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`), it lowers and compiles, from abstract
shapes alone, the trainer's own train step (`neo_jax.train.step.make_steps`: forward, backward,
clipping and AdamW over the sharded state) and one KV-cached beam-search decode step
(`neo_jax.decode.generate.decoder_step` over a `SharedPromptCache`), and reports XLA's compiled
memory analysis per device (arguments, outputs, temporaries, aliased, and their peak estimate
arguments + outputs + temporaries - aliased), the lowering and compile seconds, and the bytes per
device of the train state's parameters and optimizer moments. A layout whose axes do not divide
a parameter reports the one-line error `neo-jax train` would stop with instead of figures.

How the step computes is set as in `neo-jax train`: `--remat`, `--attention`, `--attention-chunk`,
`--scan` and `--loss-chunk` (the defaults are the pod recipe's: full remat, XLA attention over 256
queries at a time, scanned layers, logits 512 positions at a time); run it again with one of them
off to see what it buys.
`--measure MODEL` also times a few real steps of that model on this machine (random weights, a
small batch) on the first layout: `steps_per_s` and `tokens_per_s`. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from neo_jax.bench.model import (PRESETS, memory_figures, our_train_step, random_batch, random_model_steps,
                                 time_steps)
from neo_jax.checkpoint import abstract_decoder
from neo_jax.config import MeshConfig
from neo_jax.decode.generate import decoder_step
from neo_jax.errors import UserError
from neo_jax.model import ModelConfig
from neo_jax.model.config import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES
from neo_jax.model.kv_cache import KVCache, SharedPromptCache
from neo_jax.sharding import batch_sharding, make_mesh, state_shardings
from neo_jax.train.shard_plan import state_bytes_per_device

DEFAULT_MODELS = "llama-3.2-1b,qwen3-0.6b,smollm2-135m"
DEFAULT_LAYOUTS = ("fsdp=8", "fsdp=4,tensor=2")
GIB = 2 ** 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--models", default=DEFAULT_MODELS,
                        help=f"comma-separated shapes from {sorted(PRESETS)} (default {DEFAULT_MODELS})")
    parser.add_argument("--layers", type=int, default=None,
                        help="override every shape's layer count (a depth sweep of compile time and memory)")
    parser.add_argument("--layouts", nargs="+", default=list(DEFAULT_LAYOUTS), metavar="AXIS=N[,AXIS=N]",
                        help="mesh layouts over data, fsdp and tensor (default: fsdp=8 fsdp=4,tensor=2)")
    parser.add_argument("--batch-per-device", type=int, default=8, help="train sequences per device (default 8)")
    parser.add_argument("--seq-len", type=int, default=2048, help="train tokens per sequence (default 2048)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                        help="compute dtype; weights and optimizer stay float32 (default bfloat16)")
    parser.add_argument("--remat", choices=REMAT_POLICIES, default="full", help="remat policy (default full)")
    parser.add_argument("--attention", choices=ATTENTION_IMPLEMENTATIONS, default="xla",
                        help="attention implementation (default xla: jax.nn.dot_product_attention)")
    parser.add_argument("--attention-chunk", type=int, default=256,
                        help="queries attended at a time in the train step; 0: all (default 256)")
    parser.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True,
                        help="run the layers as one lax.scan (default on)")
    parser.add_argument("--loss-chunk", type=int, default=512,
                        help="positions the output head runs on at a time in the loss; 0: all (default 512)")
    parser.add_argument("--decode-requests", type=int, default=64, help="prompts of the decode step (default 64)")
    parser.add_argument("--decode-beams", type=int, default=10, help="beams a prompt (default 10)")
    parser.add_argument("--prompt-len", type=int, default=1024, help="cached prompt tokens (default 1024)")
    parser.add_argument("--new-tokens", type=int, default=16, help="generated-token cache slots (default 16)")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode step")
    parser.add_argument("--measure", default=None, metavar="MODEL",
                        help="also time real train steps of this shape on the first layout")
    parser.add_argument("--measure-batch-per-device", type=int, default=1, help="(default 1)")
    parser.add_argument("--measure-seq-len", type=int, default=256, help="(default 256)")
    parser.add_argument("--measure-steps", type=int, default=2, help="timed steps after one warm-up (default 2)")
    parser.add_argument("--seed", type=int, default=0)


def parse_layout(text: str) -> MeshConfig:
    """`fsdp=4,tensor=2` -> MeshConfig(data=1, fsdp=4, tensor=2); unnamed axes are 1."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name not in sizes or not value.isdigit() or int(value) < 1:
            raise UserError(f"--layouts: {text!r} is not AXIS=N[,AXIS=N] over data, fsdp and tensor")
        sizes[name] = int(value)
    return MeshConfig(**sizes)


def _mesh(layout: MeshConfig) -> jax.sharding.Mesh:
    needed = layout.data * layout.fsdp * layout.tensor
    if needed > jax.device_count():
        raise UserError(f"layout data={layout.data},fsdp={layout.fsdp},tensor={layout.tensor} needs {needed} "
                        f"devices but {jax.device_count()} are available; on a CPU set "
                        f"XLA_FLAGS=--xla_force_host_platform_device_count={needed}")
    return make_mesh(layout, jax.devices()[:needed])


def _compile(jitted, *abstract_args) -> dict:
    start = time.perf_counter()
    lowered = jitted.lower(*abstract_args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return {**memory_figures(compiled), "lower_seconds": lowered_at - start, "compile_seconds": done - lowered_at}


def _abstract(tree, shardings):
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        tree, shardings)


def train_step_figures(config: ModelConfig, mesh: jax.sharding.Mesh, batch_per_device: int, seq_len: int,
                       loss_chunk: int, seed: int) -> dict:
    parts = random_model_steps(config, mesh, seed, 1000, (), loss_chunk)
    rows = batch_per_device * mesh.shape["data"] * mesh.shape["fsdp"]
    batch_in = parts.steps.batch_sharding
    batch = {name: jax.ShapeDtypeStruct((rows, seq_len), jnp.float32 if name == "loss_mask" else jnp.int32,
                                        sharding=batch_in)
             for name in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
    figures = _compile(parts.steps.train, _abstract(parts.abstract_state, parts.shardings), batch)
    state, shardings = parts.abstract_state, parts.shardings
    figures.update(global_batch=rows, tokens_per_device=batch_per_device * seq_len,
                   parameter_bytes=state_bytes_per_device(state["trainable"], shardings["trainable"]),
                   optimizer_bytes=state_bytes_per_device(state["opt"], shardings["opt"]))
    return figures


def decode_step_figures(config: ModelConfig, mesh: jax.sharding.Mesh, requests: int, beams: int, prompt_len: int,
                        new_tokens: int) -> dict:
    """One beam-search step: `requests * beams` sequences over a shared prompt cache."""
    graphdef, abstract_state = nnx.split(abstract_decoder(config))
    params = nnx.to_pure_dict(abstract_state)
    param_shardings = nnx.to_pure_dict(state_shardings(abstract_state, mesh))
    dtype = jnp.dtype(config.dtype)
    cache = jax.eval_shape(lambda: SharedPromptCache.after_prefill(
        KVCache.create(config.num_layers, requests, prompt_len, config.num_kv_heads, config.head_dim, dtype),
        new_tokens).repeat_sequences(beams))
    cache_shardings = jax.tree.map(lambda leaf: batch_sharding(mesh, leaf.ndim), cache)
    sequences = requests * beams
    tokens = jax.ShapeDtypeStruct((sequences, 1), jnp.int32, sharding=batch_sharding(mesh, 2))

    def step(params, tokens, cache, positions):
        return decoder_step(nnx.merge(graphdef, params))(tokens, cache, positions)

    jitted = jax.jit(step, out_shardings=(batch_sharding(mesh, 2), cache_shardings), donate_argnums=2)  # in place, as in the loop
    figures = _compile(jitted, _abstract(params, param_shardings), tokens, _abstract(cache, cache_shardings), tokens)
    figures.update(sequences=sequences, prompt_len=prompt_len, new_tokens=new_tokens,
                   cache_bytes=state_bytes_per_device(cache, cache_shardings))
    return figures


def layout_figures(config: ModelConfig, layout: MeshConfig, args: argparse.Namespace) -> dict:
    mesh = _mesh(layout)
    result: dict = {"mesh": dict(mesh.shape)}
    try:
        result["train_step"] = train_step_figures(config, mesh, args.batch_per_device, args.seq_len, args.loss_chunk,
                                                  args.seed)
        if not args.no_decode:
            result["decode_step"] = decode_step_figures(config, mesh, args.decode_requests, args.decode_beams,
                                                        args.prompt_len, args.new_tokens)
    except UserError as e:  # a mesh axis that does not divide a parameter
        result["error"] = str(e)
    return result


def measured_steps(config: ModelConfig, layout: MeshConfig, args: argparse.Namespace) -> dict:
    mesh = _mesh(layout)
    rows = args.measure_batch_per_device * mesh.shape["data"] * mesh.shape["fsdp"]
    batch = random_batch(config, rows, args.measure_seq_len, args.seed)
    step, _ = our_train_step(config, mesh, batch, args.seed, 1 + args.measure_steps, (), args.loss_chunk)
    warmup_seconds, step_seconds = time_steps(step, 1, args.measure_steps, "bench scale")
    return {"mesh": dict(mesh.shape), "global_batch": rows, "seq_len": args.measure_seq_len,
            "warmup_seconds": warmup_seconds, "step_seconds": step_seconds, "steps_per_s": 1.0 / step_seconds,
            "tokens_per_s": rows * args.measure_seq_len / step_seconds}


def _check_args(args: argparse.Namespace) -> list[str]:
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in names + ([args.measure] if args.measure else []) if name not in PRESETS]
    if unknown:
        raise UserError(f"unknown model shape {unknown[0]!r}; choose from {sorted(PRESETS)}")
    if args.layers is not None and args.layers < 1:
        raise UserError(f"--layers must be at least 1, got {args.layers}")
    for name in ("batch_per_device", "seq_len", "decode_requests", "decode_beams", "prompt_len", "new_tokens",
                 "measure_batch_per_device", "measure_seq_len", "measure_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("loss_chunk", "attention_chunk"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be non-negative, got {getattr(args, name)}")
    return names


def run(args: argparse.Namespace) -> int:
    names = _check_args(args)
    layouts = [parse_layout(text) for text in args.layouts]
    settings = dict(dtype=args.dtype, remat=args.remat, attention=args.attention,
                    attention_chunk=args.attention_chunk, scan_layers=args.scan)
    if args.layers is not None:
        settings["num_layers"] = args.layers
    models = {}
    for name in names:
        config = dataclasses.replace(PRESETS[name], **settings)
        params = jax.tree.leaves(nnx.to_pure_dict(nnx.state(abstract_decoder(config))))
        models[name] = {"params": sum(math.prod(leaf.shape) for leaf in params), "layouts": []}
        for layout, text in zip(layouts, args.layouts):
            print(f"bench scale: {name}, {text}: compiling", file=sys.stderr, flush=True)
            figures = layout_figures(config, layout, args)
            models[name]["layouts"].append({"layout": text, **figures})
            train = figures.get("train_step")
            print(f"bench scale: {name}, {text}: " + (figures.get("error") or
                  f"train step {train['peak_gib']:.2f} GiB/device, compiled in {train['compile_seconds']:.0f}s"),
                  file=sys.stderr, flush=True)
    measured = None
    if args.measure:
        print(f"bench scale: timing {args.measure} on {args.layouts[0]}", file=sys.stderr, flush=True)
        measured = {"model": args.measure, **measured_steps(dataclasses.replace(PRESETS[args.measure], **settings),
                                                            layouts[0], args)}
    devices = jax.devices()
    print(json.dumps({
        "benchmark": "scale", "settings": {**settings, "loss_chunk": args.loss_chunk},
        "batch_per_device": args.batch_per_device, "seq_len": args.seq_len,
        "decode": None if args.no_decode else {"requests": args.decode_requests, "beams": args.decode_beams,
                                               "prompt_len": args.prompt_len, "new_tokens": args.new_tokens},
        "device_count": len(devices), "device_kind": devices[0].device_kind, "cpu_cores": len(os.sched_getaffinity(0)),
        "jax_version": jax.__version__, "models": models, "measured": measured}))
    return 0
