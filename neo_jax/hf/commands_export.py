"""`neo-jax export-hf CKPT_DIR OUT_DIR`: our checkpoint -> a Hugging Face model directory."""

from __future__ import annotations

import argparse

from neo_jax.hf.export_hf import DEFAULT_MAX_SHARD_BYTES, export_checkpoint
from neo_jax.sharding import add_mesh_arguments, mesh_from_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Writes config.json and model.safetensors (or shards plus model.safetensors.index.json) "
                     "that transformers.AutoModelForCausalLM.from_pretrained loads, with the extended "
                     "vocabulary (vocab_size = padded rows); tokenizer.json and tokenizer_config.json that "
                     "transformers.AutoTokenizer loads, which encode text and SIDs to our ids; and sid_catalog.json, "
                     "every item's SID as token ids, for neo_jax.hf.sid_logits to constrain transformers' generate "
                     "to catalog items. Nothing is left at OUT_DIR on error.")
    parser.add_argument("checkpoint", help="a checkpoint directory written by import-hf or training")
    parser.add_argument("out_dir", help="the Hugging Face model directory to create")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory, with vocab_layout.json for SID tokens (default: CKPT/tokenizer "
                             "with CKPT's vocabulary layout)")
    parser.add_argument("--sids", default=None, help="output directory of `neo-jax sids build` (default: the one "
                                                     "the tokenizer was built from)")
    parser.add_argument("--max-shard-mb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 2**20, metavar="MB",
                        help="largest safetensors file, in MiB; larger models are split into shards "
                             f"(default {DEFAULT_MAX_SHARD_BYTES / 2**20:g})")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    add_mesh_arguments(parser)


def run(args: argparse.Namespace) -> int:
    export = export_checkpoint(args.checkpoint, args.out_dir, mesh_from_arguments(args), overwrite=args.overwrite,
                               max_shard_bytes=int(args.max_shard_mb * 2**20), tokenizer_dir=args.tokenizer,
                               sids_dir=args.sids, allow_replicated=args.mesh_allow_replicated)
    shards = [f for f in export.files if f.suffix == ".safetensors"]
    others = [f.name for f in export.files if f.suffix != ".safetensors"]
    print(f"exported {args.checkpoint} to {args.out_dir} ({len(shards)} safetensors file(s), {', '.join(others)})"
          + "".join(f"; {reason}" for reason in export.left_out))
    return 0
