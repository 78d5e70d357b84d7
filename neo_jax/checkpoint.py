"""A model checkpoint directory: orbax parameters plus the JSON that says what they are.

    CKPT_DIR/
      model_config.json   `ModelConfig` (architecture, vocab rows, compute dtype, ...)
      params/             orbax `StandardCheckpointer` tree of the float32 `nnx.Param`s, as
                          the pure dict of `nnx.state(model)` (e.g. params/layers/0/attn/q_kernel)
      vocab_layout.json   `VocabLayout`, present once the vocabulary is extended
      hf_config.json      the source Hugging Face config.json (kept for export), if any
      tokenizer/          the source tokenizer files, if any

`save_model` writes into a directory the caller usually obtains from
`neo_jax.atomic.atomic_output_dir`; `load_model` restores each parameter straight into
its sharding on the given mesh.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from neo_jax.atomic import atomic_write_text
from neo_jax.errors import UserError
from neo_jax.model.config import ModelConfig
from neo_jax.model.decoder import Decoder
from neo_jax.sharding import state_shardings
from neo_jax.vocab import VocabLayout
from neo_jax.json_file import read_json_object

MODEL_CONFIG = "model_config.json"
PARAMS = "params"
VOCAB_LAYOUT = "vocab_layout.json"
HF_CONFIG = "hf_config.json"
TOKENIZER = "tokenizer"


def save_model(directory: str | Path, model: Decoder, vocab_layout: VocabLayout | None = None,
               hf_config: dict[str, Any] | None = None) -> None:
    """Write `model` (and the optional layout and source config) into `directory`."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    atomic_write_text(directory / MODEL_CONFIG, model.config.to_json())
    if vocab_layout is not None:
        atomic_write_text(directory / VOCAB_LAYOUT, vocab_layout.to_json())
    if hf_config is not None:
        atomic_write_text(directory / HF_CONFIG, json.dumps(hf_config, indent=2))


def load_model_config(directory: str | Path) -> ModelConfig:
    return ModelConfig.load(_checkpoint_dir(directory) / MODEL_CONFIG)


def load_vocab_layout(directory: str | Path) -> VocabLayout | None:
    path = _checkpoint_dir(directory) / VOCAB_LAYOUT
    return VocabLayout.load(path) if path.exists() else None


def load_hf_config(directory: str | Path) -> dict[str, Any] | None:
    path = _checkpoint_dir(directory) / HF_CONFIG
    if not path.exists():
        return None
    return read_json_object(path)


def abstract_decoder(config: ModelConfig) -> Decoder:
    """A decoder of shape-and-dtype placeholders (no memory), to be filled by a restore or an import."""
    return nnx.eval_shape(lambda: Decoder(config, nnx.Rngs(0)))


def load_model(directory: str | Path, mesh: Mesh, dtype: str | None = None) -> Decoder:
    """Restore the decoder in `directory` onto `mesh`; `dtype` overrides the compute dtype."""
    directory = _checkpoint_dir(directory)
    config = load_model_config(directory)
    if dtype is not None:
        config = dataclasses.replace(config, dtype=dtype)
    graphdef, abstract_state = nnx.split(abstract_decoder(config))
    shardings = nnx.to_pure_dict(state_shardings(abstract_state, mesh))
    target = jax.tree.map(lambda value, sharding: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding),
                          nnx.to_pure_dict(abstract_state), shardings)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(directory / PARAMS, target)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise UserError(f"{directory / PARAMS}: cannot restore the parameters ({e})") from None
    nnx.replace_by_pure_dict(abstract_state, restored)
    return nnx.merge(graphdef, abstract_state)


def _checkpoint_dir(directory: str | Path) -> Path:
    directory = Path(directory).absolute()
    if not (directory / MODEL_CONFIG).is_file():
        raise UserError(f"{directory}: not a model checkpoint ({MODEL_CONFIG} is missing)")
    return directory
