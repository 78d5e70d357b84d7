"""Hugging Face checkpoints (safetensors directory or llama.cpp GGUF) -> a sharded `Decoder` -> our checkpoint.

Both sources reach `decoder_from_hf_tensors`, which reads one tensor at a time by its
Hugging Face name, checks its shape against `config.json`, converts it to our layout
(`neo_jax.hf.key_map`) and places it straight into its sharding on the mesh.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol

import numpy as np
from jax.sharding import Mesh

from neo_jax.atomic import atomic_output_dir
from neo_jax.checkpoint import TOKENIZER, abstract_decoder, model_allow_replicated, save_model
from neo_jax.errors import UserError
from neo_jax.hf.key_map import hf_tensor
from neo_jax.hf.safetensors_io import SafetensorsReader
from neo_jax.model.config import ModelConfig
from neo_jax.model.decoder import Decoder
from neo_jax.sharding import load_sharded
from neo_jax.tokenizer.text import TextTokenizer, load_text_tokenizer
from neo_jax.json_file import read_json_object

HF_CONFIG_FILE = "config.json"
# Tokenizer files of a Hugging Face directory, in order of preference.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class TensorSource(Protocol):
    def get(self, name: str) -> np.ndarray:
        """Tensor `name` in Hugging Face layout; a `UserError` naming the file if it is missing."""

    def where(self, name: str) -> Path | str:
        """The file holding tensor `name`, for error messages."""


class MappingTensorSource:
    """Tensors already in memory (a dequantised GGUF), named as in Hugging Face."""

    def __init__(self, tensors: Mapping[str, np.ndarray], origin: Path | str):
        self.tensors, self.origin = tensors, origin

    def get(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise UserError(f"{self.origin}: tensor {name!r} is missing")
        return self.tensors[name]

    def where(self, name: str) -> Path | str:
        return self.origin


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    return read_json_object(Path(model_dir) / HF_CONFIG_FILE, f"is {model_dir} a Hugging Face model directory?")


def decoder_from_hf_tensors(hf_config: dict[str, Any], source: TensorSource, mesh: Mesh, dtype: str = "float32",
                            config_origin: Path | str = HF_CONFIG_FILE, allow_replicated: Iterable[str] = ()) -> Decoder:
    """A `Decoder` on `mesh` whose parameters come from `source`, one tensor at a time
    (`allow_replicated`: see `neo_jax.checkpoint.model_allow_replicated`)."""
    config = ModelConfig.from_hf(hf_config, dtype=dtype, source=str(config_origin))

    def read_param(path: tuple, shape: tuple[int, ...]) -> np.ndarray:
        key = hf_tensor(path)
        tensor = source.get(key.name)
        expected = key.hf_shape(shape)
        if tuple(tensor.shape) != expected:
            raise UserError(f"{source.where(key.name)}: tensor {key.name!r} has shape {tuple(tensor.shape)}, "
                            f"expected {expected} from {config_origin}")
        return key.to_ours(tensor, shape)

    return load_sharded(abstract_decoder(config), read_param, mesh, progress_label="import",
                        allow_replicated=model_allow_replicated(config, allow_replicated))


def _read_source(source: Path, mesh: Mesh, dtype: str, allow_replicated: Iterable[str]
                 ) -> tuple[Decoder, dict[str, Any], TextTokenizer | None]:
    """`(decoder, Hugging Face config, tokenizer or None)` of a GGUF file or a Hugging Face directory."""
    if source.suffix == ".gguf":
        from neo_jax.hf.gguf import load_gguf

        hf_config, tensors, tokenizer = load_gguf(source)
        return decoder_from_hf_tensors(hf_config, MappingTensorSource(tensors, source), mesh, dtype, source,
                                       allow_replicated), hf_config, tokenizer
    if not source.is_dir():
        raise UserError(f"{source}: not found (expected a Hugging Face model directory or a .gguf file)")
    hf_config = read_hf_config(source)
    with SafetensorsReader(source) as reader:
        model = decoder_from_hf_tensors(hf_config, reader, mesh, dtype, source / HF_CONFIG_FILE, allow_replicated)
    tokenizer_files = [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
    tokenizer = load_text_tokenizer(tokenizer_files[0]) if tokenizer_files else None
    return model, hf_config, tokenizer


def import_checkpoint(source: str | Path, out_dir: str | Path, mesh: Mesh, dtype: str = "float32",
                      overwrite: bool = False, allow_replicated: Iterable[str] = ()) -> Decoder:
    """Import `source` into the checkpoint directory `out_dir` (see `neo_jax.checkpoint`); all or nothing
    (`allow_replicated`: see `neo_jax.sharding.logical_to_spec`)."""
    source = Path(source)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        model, hf_config, tokenizer = _read_source(source, mesh, dtype, allow_replicated)
        save_model(tmp, model, hf_config=hf_config)
        if tokenizer is not None:
            (tmp / TOKENIZER).mkdir()
            tokenizer.save(tmp / TOKENIZER)
    return model
