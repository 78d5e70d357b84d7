"""Our checkpoint -> a Hugging Face model directory (`config.json` + safetensors) transformers loads.

The exported vocabulary is the checkpoint's embedding rows (`vocab_size` = the padded
size after an extension). Hugging Face cannot mask rows, so the padding rows (all zero)
score logit 0 there; only `num_real_tokens` rows are real tokens. Parameters are written
in float32, one shard at a time from the sharded model.

With the checkpoint's tokenizer (or a given one) the directory also gets `tokenizer.json` and
`tokenizer_config.json` (`neo_jax.tokenizer.hf_files`), which `AutoTokenizer` loads and which
encode mixed text and SIDs to our ids; and, when the tokenizer has SID blocks and its SID catalog
is known, `sid_catalog.json`: every item's SID as token ids, which `neo_jax.hf.sid_logits` reads
to constrain transformers' `generate` to real catalog items.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable

import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from neo_jax.atomic import atomic_output_dir, atomic_write_text
from neo_jax.catalog.sid_output import SidOutput, load_sid_output
from neo_jax.checkpoint import TOKENIZER, VOCAB_LAYOUT, load_hf_config, load_model, load_model_config
from neo_jax.decode.commands import resolve_sids_dir
from neo_jax.decode.generate import eos_token_id
from neo_jax.errors import UserError
from neo_jax.export.bundle import check_sid_blocks
from neo_jax.hf.key_map import hf_tensor
from neo_jax.hf.safetensors_io import TensorToWrite, write_safetensors
from neo_jax.hf.sid_logits import FORMAT, FORMAT_VERSION, SID_CATALOG
from neo_jax.model.config import ModelConfig
from neo_jax.model.decoder import Decoder
from neo_jax.tokenizer import LAYOUT_FILE, MixedTokenizer, load_text_tokenizer, sids_source
from neo_jax.tokenizer.hf_files import write_hf_tokenizer
from neo_jax.vocab import VocabLayout

DEFAULT_MAX_SHARD_BYTES = 2 << 30
# Settings of the source config.json that our config restates in another spelling.
_SUPERSEDED_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "torch_dtype", "dtype")


def hf_config_for(model: Decoder, source_hf_config: dict | None) -> dict:
    """The source `config.json` (keeping e.g. token ids and chat settings) updated with our architecture."""
    kept = {k: v for k, v in (source_hf_config or {}).items() if k not in _SUPERSEDED_KEYS}
    return {**kept, **model.config.to_hf()}


def tensors_to_write(model: Decoder) -> list[TensorToWrite]:
    """Every parameter under its Hugging Face name, fetched from the devices when written."""
    tensors = []
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, value = hf_tensor(path), variable.get_value()

        def read(key=key, value=value) -> np.ndarray:
            return key.to_hf(np.asarray(multihost_utils.process_allgather(value, tiled=True)))

        tensors.append(TensorToWrite(key.name, key.hf_shape(value.shape), np.dtype(np.float32), read))
    return tensors


@dataclasses.dataclass(frozen=True)
class HFExport:
    files: list[Path]  # every file written, in the output directory
    left_out: list[str]  # what was not written, and why (e.g. no tokenizer in the checkpoint)


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, mesh: Mesh, overwrite: bool = False,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer_dir: str | Path | None = None,
                      sids_dir: str | Path | None = None, allow_replicated: Iterable[str] = ()) -> HFExport:
    """Write `checkpoint_dir` as a Hugging Face directory at `out_dir`, with its tokenizer and SID catalog:
    the checkpoint's, unless `tokenizer_dir` (a tokenizer directory; with `vocab_layout.json`, its SID
    tokens too) and `sids_dir` are given (`allow_replicated`: see `neo_jax.sharding.logical_to_spec`)."""
    if max_shard_bytes < 1:
        raise UserError(f"the largest safetensors shard must be positive, got {max_shard_bytes} bytes")
    model_config = load_model_config(checkpoint_dir)
    if model_config.num_item_ids:
        raise UserError(f"{checkpoint_dir}: the model has an item-identity table ({model_config.num_item_ids} rows), "
                        "which no Hugging Face architecture has; serve it with `neo-jax export` instead")
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        left_out = write_tokenizer_and_sids(tmp, Path(checkpoint_dir), model_config, tokenizer_dir, sids_dir)
        model = load_model(checkpoint_dir, mesh, allow_replicated=allow_replicated)
        write_safetensors(tmp, tensors_to_write(model), max_shard_bytes)
        config = hf_config_for(model, load_hf_config(checkpoint_dir))
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2))
        names = sorted(path.name for path in tmp.iterdir())
    return HFExport([Path(out_dir) / name for name in names], left_out)


def write_tokenizer_and_sids(directory: Path, checkpoint_dir: Path, config: ModelConfig,
                             tokenizer_dir: str | Path | None, sids_dir: str | Path | None) -> list[str]:
    """Write the tokenizer files and `sid_catalog.json` into `directory`; returns what was left out, and why."""
    given = tokenizer_dir is not None
    tokenizer_dir = Path(tokenizer_dir) if given else checkpoint_dir / TOKENIZER
    if not tokenizer_dir.is_dir():
        if given:
            raise UserError(f"{tokenizer_dir}: not a tokenizer directory")
        return [f"no tokenizer: {tokenizer_dir} is not a directory (pass --tokenizer)"]
    text = load_text_tokenizer(tokenizer_dir)
    layout_file = tokenizer_dir / LAYOUT_FILE if given else checkpoint_dir / VOCAB_LAYOUT  # the checkpoint's own
    layout = VocabLayout.load(layout_file) if layout_file.is_file() else None
    mixed = None if layout is None else MixedTokenizer(text, layout)
    tokens = text.vocab_size if layout is None else layout.size
    if tokens > config.vocab_size:
        raise UserError(f"{tokenizer_dir}: the tokenizer has {tokens} tokens but the model only {config.vocab_size} "
                        "vocabulary rows; use the tokenizer the model was trained with")
    write_hf_tokenizer(directory, text, mixed, config.max_position_embeddings)
    if layout is None or not layout.entity_types:
        return []
    if sids_dir is None and sids_source(tokenizer_dir) is None:
        return [f"no {SID_CATALOG}: {tokenizer_dir} names no SID directory (pass --sids)"]
    sids_dir = resolve_sids_dir(checkpoint_dir, sids_dir, tokenizer_dir)
    sids = load_sid_output(sids_dir)
    check_sid_blocks(layout, sids, layout_file, sids_dir)
    catalog = sid_catalog(layout, sids, eos_token_id(mixed, config))
    atomic_write_text(directory / SID_CATALOG, json.dumps(catalog))
    return []


def sid_catalog(layout: VocabLayout, sids: SidOutput, eos_id: int) -> dict:
    """What `neo_jax.hf.sid_logits.SidCatalog` reads: the layout's ids and every item's SID as token ids."""
    trie = sids.trie
    codes = trie.codes  # [n_items, max_levels], -1 past a type's depth
    tokens = np.where(codes >= 0, layout.block_offset_table()[trie.item_types] + codes, -1)  # [n_items, max_levels]
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "text_size": layout.text_size,
            "vocab_size": layout.size, "sid_open_id": layout.sid_open_id, "sid_close_id": layout.sid_close_id,
            "eos_id": eos_id, "entity_types": [t.name for t in layout.entity_types], "item_ids": sids.item_ids,
            "item_types": trie.item_types.tolist(),
            "item_tokens": [[t for t in row if t >= 0] for row in tokens.tolist()]}
