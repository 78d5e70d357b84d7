"""Our checkpoint -> a Hugging Face model directory (`config.json` + safetensors) transformers loads.

The exported vocabulary is the checkpoint's embedding rows (`vocab_size` = the padded
size after an extension). Hugging Face cannot mask rows, so the padding rows (all zero)
score logit 0 there; only `num_real_tokens` rows are real tokens. Parameters are written
in float32, one shard at a time from the sharded model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from neo_jax.atomic import atomic_output_dir, atomic_write_text
from neo_jax.checkpoint import load_hf_config, load_model
from neo_jax.errors import UserError
from neo_jax.hf.key_map import hf_tensor
from neo_jax.hf.safetensors_io import TensorToWrite, write_safetensors
from neo_jax.model.decoder import Decoder

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


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, mesh: Mesh, overwrite: bool = False,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Write `checkpoint_dir` as a Hugging Face directory at `out_dir`; returns the safetensors files."""
    if max_shard_bytes < 1:
        raise UserError(f"the largest safetensors shard must be positive, got {max_shard_bytes} bytes")
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        model = load_model(checkpoint_dir, mesh)
        files = write_safetensors(tmp, tensors_to_write(model), max_shard_bytes)
        config = hf_config_for(model, load_hf_config(checkpoint_dir))
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2))
    return [Path(out_dir) / f.name for f in files]
