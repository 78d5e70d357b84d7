"""`neo-jax import-hf SOURCE OUT_DIR`: a Hugging Face or GGUF checkpoint -> our checkpoint directory."""

from __future__ import annotations

import argparse
import jax
from flax import nnx

from neo_jax.hf.import_hf import import_checkpoint
from neo_jax.model.config import DTYPES
from neo_jax.sharding import add_mesh_arguments, mesh_from_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Writes OUT_DIR/{params/, model_config.json, hf_config.json, tokenizer/} all at once: "
                     "on any error nothing is left at OUT_DIR. Supported architectures: "
                     "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM.")
    parser.add_argument("source", help="a Hugging Face model directory (config.json plus model.safetensors "
                                       "or model.safetensors.index.json) or a llama .gguf file")
    parser.add_argument("out_dir", help="the checkpoint directory to create")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="compute dtype recorded in the checkpoint; parameters are stored in float32")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    add_mesh_arguments(parser)


def run(args: argparse.Namespace) -> int:
    mesh = mesh_from_arguments(args)
    model = import_checkpoint(args.source, args.out_dir, mesh, dtype=args.dtype, overwrite=args.overwrite,
                              allow_replicated=args.mesh_allow_replicated)
    num_params = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"imported {model.config.architecture} ({num_params:,} parameters, vocabulary "
          f"{model.config.vocab_size}) into {args.out_dir}")
    return 0
