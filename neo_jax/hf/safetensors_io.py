"""Hugging Face safetensors checkpoints, read and written one tensor (or one shard) at a time.

A model directory holds either `model.safetensors` or shards listed by
`model.safetensors.index.json` (`{"weight_map": {tensor name: shard file}}`).
Reading uses the `safetensors` library (its `flax` backend, on the host CPU device, so
bfloat16 tensors load too); a corrupt or truncated file fails when it is opened.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from neo_jax.errors import UserError
from neo_jax.json_file import read_json_object

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsReader:
    """The tensors of a Hugging Face model directory, by name. Use as a context manager."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._handles: dict[Path, object] = {}
        self._files = self._tensor_files()  # tensor name -> file

    def _tensor_files(self) -> dict[str, Path]:
        index, single = self.model_dir / INDEX_FILE, self.model_dir / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = read_json_object(index)["weight_map"]
                return {name: self.model_dir / file for name, file in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{index}: not a valid safetensors index ({e!r})") from None
        if single.is_file():
            return {name: single for name in self._open(single).keys()}
        raise UserError(f"{self.model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")

    def _open(self, path: Path):
        if path not in self._handles:
            if not path.is_file():
                raise UserError(f"{path}: safetensors file not found (listed in {INDEX_FILE})")
            try:
                self._handles[path] = safe_open(str(path), framework="flax")
            except (SafetensorError, OSError) as e:
                raise UserError(f"{path}: not a valid safetensors file, corrupt or truncated ({e})") from None
        return self._handles[path]

    def names(self) -> set[str]:
        return set(self._files)

    def where(self, name: str) -> Path:
        """The file holding tensor `name` (or would, for error messages about a missing tensor)."""
        return self._files.get(name, self.model_dir / (INDEX_FILE if (self.model_dir / INDEX_FILE).is_file()
                                                       else SINGLE_FILE))

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` as a host array in its stored dtype."""
        if name not in self._files:
            raise UserError(f"{self.where(name)}: tensor {name!r} is missing")
        path = self._files[name]
        handle = self._open(path)
        try:
            with jax.default_device(jax.local_devices(backend="cpu")[0]):
                return np.asarray(handle.get_tensor(name))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path}: cannot read tensor {name!r}, file corrupt or truncated ({e})") from None

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorToWrite(NamedTuple):
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[], np.ndarray]  # called once, when its shard is written

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def write_safetensors(model_dir: str | Path, tensors: list[TensorToWrite], max_shard_bytes: int) -> list[Path]:
    """Write `tensors` as `model.safetensors`, or as shards plus an index when they exceed `max_shard_bytes`.

    At most one shard's tensors are held on the host at a time. Returns the files written.
    """
    model_dir = Path(model_dir)
    shards: list[list[TensorToWrite]] = [[]]
    for tensor in tensors:
        if shards[-1] and sum(t.nbytes for t in shards[-1]) + tensor.nbytes > max_shard_bytes:
            shards.append([])
        shards[-1].append(tensor)
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file({t.name: np.ascontiguousarray(t.read(), dtype=t.dtype) for t in shard}, str(model_dir / name),
                  metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                 "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard}}
        (model_dir / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")
    return [model_dir / name for name in names]
