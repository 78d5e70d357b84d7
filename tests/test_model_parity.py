"""Import parity with transformers (float32 logits within 1e-4), and export back, also after vocab extension."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from conftest import TINY_HF_MODELS

from neo_jax import cli
from neo_jax.checkpoint import load_hf_config, load_model, load_vocab_layout, save_model
from neo_jax.config import MeshConfig
from neo_jax.model.config import ModelConfig
from neo_jax.model.decoder import MASKED_LOGIT
from neo_jax.model.extend_vocab import extend_vocab
from neo_jax.sharding import make_mesh
from neo_jax.vocab import EntityType, VocabLayout

ONE_DEVICE = make_mesh(MeshConfig(), jax.devices()[:1])
TOKENS = np.random.default_rng(0).integers(0, 300, (2, 20)).astype(np.int32)  # longer than llama3's original 16


@nnx.jit
def our_logits(model, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = model(tokens, positions)
    return logits


def import_hf(source, out_dir, *options):
    assert cli.main(["import-hf", str(source), str(out_dir), *options]) == 0


def export_hf(checkpoint, out_dir, *options):
    assert cli.main(["export-hf", str(checkpoint), str(out_dir), *options]) == 0


@pytest.mark.parametrize("name", list(TINY_HF_MODELS))
def test_import_matches_transformers_and_export_round_trips(name, tiny_hf_model, hf_logits, tmp_path):
    hf_dir = tiny_hf_model(name)
    import_hf(hf_dir, tmp_path / "ckpt", "--mesh.fsdp=2", "--mesh.tensor=4", "--mesh.allow_replicated=kv_heads")
    model = load_model(tmp_path / "ckpt", ONE_DEVICE)  # a checkpoint restores onto any mesh
    ours = np.asarray(our_logits(model, TOKENS))
    np.testing.assert_allclose(ours, hf_logits(hf_dir, TOKENS), rtol=0, atol=1e-4)

    export_hf(tmp_path / "ckpt", tmp_path / "exported", "--max-shard-mb=0.1")
    assert len(list((tmp_path / "exported").glob("model-*-of-*.safetensors"))) > 1  # sharded, with an index
    np.testing.assert_allclose(hf_logits(tmp_path / "exported", TOKENS), ours, rtol=0, atol=1e-4)
    exported_config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert ModelConfig.from_hf(exported_config) == model.config


@pytest.mark.parametrize("name", ["llama_llama3_rope", "qwen2_tied_mqa"])
def test_extended_vocabulary_exports_to_transformers(name, tiny_hf_model, hf_logits, tmp_path):
    import_hf(tiny_hf_model(name), tmp_path / "ckpt")
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=4))
    layout = VocabLayout(text_size=300, entity_types=(EntityType("item", (16, 16)),), pad_multiple=64)
    one_or_two_kv_heads = ("kv_heads",)  # on a 4-way tensor axis
    extended = extend_vocab(load_model(tmp_path / "ckpt", mesh, allow_replicated=one_or_two_kv_heads), layout, mesh,
                            allow_replicated=one_or_two_kv_heads)
    save_model(tmp_path / "extended", extended, layout, hf_config=load_hf_config(tmp_path / "ckpt"))
    assert load_vocab_layout(tmp_path / "extended") == layout

    tokens = TOKENS.copy()
    tokens[:, ::3] = np.arange(layout.text_size, layout.size)[: tokens[:, ::3].size].reshape(2, -1)  # new tokens
    ours = np.asarray(our_logits(extended, tokens))
    assert ours.shape[-1] == layout.padded_size
    assert np.all(ours[..., layout.size:] == MASKED_LOGIT)

    export_hf(tmp_path / "extended", tmp_path / "exported")
    theirs = hf_logits(tmp_path / "exported", tokens)
    assert theirs.shape[-1] == layout.padded_size
    np.testing.assert_allclose(theirs[..., : layout.size], ours[..., : layout.size], rtol=0, atol=1e-4)
