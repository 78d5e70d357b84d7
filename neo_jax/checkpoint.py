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

import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Iterable

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


def model_allow_replicated(config: ModelConfig, allow_replicated: Iterable[str]) -> tuple[str, ...]:
    """The logical axes whose dimension may stay whole on a mesh axis that does not divide it, for
    `config`'s parameters: `allow_replicated`, plus `vocab` where the vocabulary is a pre-trained one
    (`num_real_tokens` unset: not extended to a `VocabLayout`), whose size was never padded for a mesh.
    An extended vocabulary is padded for one (`VocabLayout.pad_multiple`) and must divide."""
    return (*allow_replicated, "vocab") if config.num_real_tokens is None else tuple(allow_replicated)


def load_model(directory: str | Path, mesh: Mesh, dtype: str | None = None,
               allow_replicated: Iterable[str] = ()) -> Decoder:
    """Restore the decoder in `directory` onto `mesh`; `dtype` overrides the compute dtype
    (`allow_replicated`: see `neo_jax.sharding.logical_to_spec` and `model_allow_replicated`)."""
    directory = _checkpoint_dir(directory)
    config = load_model_config(directory)
    if dtype is not None:
        config = dataclasses.replace(config, dtype=dtype)
    graphdef, abstract_state = nnx.split(abstract_decoder(config))
    shardings = nnx.to_pure_dict(state_shardings(abstract_state, mesh, model_allow_replicated(config, allow_replicated)))
    target = jax.tree.map(lambda value, sharding: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding),
                          nnx.to_pure_dict(abstract_state), shardings)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            # A foreign model is refused from the metadata: a restore into the wrong shapes fails
            # inside the library's threads, which then print tracebacks at interpreter exit.
            with _library_warnings_silenced():  # an unreadable metadata file is reported below, in one line
                stored = checkpointer.metadata(directory / PARAMS).item_metadata
            _check_stored_shapes(directory, stored, target)
            restored = checkpointer.restore(directory / PARAMS, target)
    except UserError:
        raise
    except Exception as e:  # the checkpoint and storage libraries raise many types for a damaged or foreign checkpoint
        raise UserError(f"{directory / PARAMS}: cannot restore the parameters of the model in {MODEL_CONFIG} "
                        f"({restore_failure(e)})") from None
    nnx.replace_by_pure_dict(abstract_state, restored)
    return nnx.merge(graphdef, abstract_state)


def _check_stored_shapes(directory: Path, stored: Any, target: Any) -> None:
    """Refuse a `params/` whose arrays (names and shapes) are not those of `model_config.json`'s model."""
    if stored is None:
        raise UserError(f"{directory / PARAMS}: its array metadata cannot be read (a damaged or partial checkpoint)")
    def shapes(tree) -> dict[str, tuple[int, ...]]:
        return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
                for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}

    have, want = shapes(stored), shapes(target)
    problem = next((f"{name!r} is {list(have[name])} there but {list(want[name])} in {MODEL_CONFIG}"
                    for name in want if name in have and have[name] != want[name]), None)
    if problem is None and have.keys() != want.keys():
        missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
        problem = (f"it lacks {missing[0]!r} ({len(missing)} array(s) missing)" if missing
                   else f"it has {extra[0]!r} that {MODEL_CONFIG}'s model does not ({len(extra)} extra)")
    if problem is not None:
        raise UserError(f"{directory / PARAMS}: not the parameters of the model in {MODEL_CONFIG}: {problem}")


@contextlib.contextmanager
def _library_warnings_silenced():
    """Hold back the checkpoint library's absl warnings (it logs, then returns None, for unreadable metadata)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def restore_failure(error: Exception, limit: int = 160) -> str:
    """One short line of what a failed restore raised (the libraries' messages run to pages)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _checkpoint_dir(directory: str | Path) -> Path:
    directory = Path(directory).absolute()
    if not (directory / MODEL_CONFIG).is_file():
        raise UserError(f"{directory}: not a model checkpoint ({MODEL_CONFIG} is missing)")
    return directory
