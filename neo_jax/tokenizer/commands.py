"""`neo-jax tokenizer build`: a mixed text + SID tokenizer directory for training and decoding.

The directory holds the text model (a given sentencepiece / tokenizer.json / GGUF tokenizer, or a
sentencepiece model trained here on the task examples for from-scratch models) and the vocabulary
layout: the text ids, then the specials `[SID]`, `[/SID]`, `[PAD]`, then one block of SID code
tokens per (entity type, level) with the codebook sizes of a `sids build` output.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from neo_jax.atomic import atomic_output_dir, atomic_write_text
from neo_jax.catalog.sid_output import load_sid_output
from neo_jax.errors import UserError
from neo_jax.model.config import ModelConfig
from neo_jax.tasks.builders import read_examples
from neo_jax.tokenizer.mixed import SOURCES_FILE, MixedTokenizer
from neo_jax.tokenizer.text import load_text_tokenizer, train_sentencepiece
from neo_jax.vocab import DEFAULT_SPECIALS, SID_CODE_PATTERN, VocabLayout

TRAINED_MODEL = "trained_text.model"
_NON_TEXT = re.compile("|".join([re.escape(s) for s in DEFAULT_SPECIALS] + [SID_CODE_PATTERN.pattern]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", required=True)
    build = commands.add_parser("build", help="write a tokenizer directory (text model + vocabulary layout)",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("out_dir", type=Path, help="the tokenizer directory to write")
    build.add_argument("--sids", type=Path, required=True, help="output directory of `neo-jax sids build`")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", type=Path, help="a text tokenizer: sentencepiece .model, tokenizer.json "
                                                  "(or its directory), .gguf, or a saved tokenizer directory")
    source.add_argument("--train", type=Path, metavar="TASKS_DIR",
                        help="train a sentencepiece model on TASKS_DIR/train.jsonl (output of `neo-jax data tasks`)")
    build.add_argument("--vocab-size", type=int, default=512, help="text vocabulary size with --train (default 512)")
    build.add_argument("--model", type=Path, default=None,
                       help="a checkpoint directory whose model the tokenizer serves: its text vocabulary "
                            "size (embedding rows before extension) becomes the layout's text_size")
    build.add_argument("--pad-multiple", type=int, default=128,
                       help="pad the vocabulary to a multiple of this, so it shards evenly (default 128)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def _training_texts(tasks_dir: Path) -> list[str]:
    """The natural-language parts of every training prompt and completion (SID and special tokens cut out)."""
    texts = []
    for example in read_examples(tasks_dir / "train.jsonl"):
        for field in (example.prompt, example.completion):
            texts.extend(piece for piece in _NON_TEXT.split(field) if piece and not piece.isspace())
    return texts


def build_tokenizer(out_dir: Path, sids_dir: Path, text: Path | None = None, train: Path | None = None,
                    vocab_size: int = 512, model_dir: Path | None = None, pad_multiple: int = 128,
                    overwrite: bool = False) -> dict:
    entity_types = load_sid_output(sids_dir).entity_types
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        if train is not None:
            print(f"training a {vocab_size}-token sentencepiece model on {train / 'train.jsonl'}",
                  file=sys.stderr, flush=True)
            text_tokenizer = train_sentencepiece(_training_texts(train), vocab_size, tmp / TRAINED_MODEL)
        else:
            text_tokenizer = load_text_tokenizer(text)
        text_size = text_tokenizer.vocab_size
        if model_dir is not None:
            text_size = ModelConfig.load(model_dir / "model_config.json").vocab_size
            if text_size < text_tokenizer.vocab_size:
                raise UserError(f"{model_dir}: the model has {text_size} text rows but the tokenizer "
                                f"has {text_tokenizer.vocab_size} tokens")
        layout = VocabLayout(text_size=text_size, entity_types=entity_types, pad_multiple=pad_multiple)
        MixedTokenizer(text_tokenizer, layout).save(tmp)
        atomic_write_text(tmp / SOURCES_FILE, json.dumps({"sids": str(Path(sids_dir).resolve())}, indent=2))
        (tmp / TRAINED_MODEL).unlink(missing_ok=True)  # saved again under the tokenizer's own file name
    return {"out_dir": str(out_dir), "text_size": layout.text_size, "specials": list(layout.specials),
            "entity_types": [{"name": t.name, "codebook_sizes": list(t.codebook_sizes)} for t in entity_types],
            "vocab_size": layout.size, "padded_vocab_size": layout.padded_size}


def run(args: argparse.Namespace) -> int:
    summary = build_tokenizer(args.out_dir, args.sids, args.text, args.train, args.vocab_size, args.model,
                              args.pad_multiple, args.overwrite)
    print(json.dumps(summary, indent=2))
    return 0
