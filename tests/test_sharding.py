"""One program on many mesh shapes: same logits, loss and gradients; parameters sharded as declared; a mesh
axis that does not divide a parameter is an error unless `mesh.allow_replicated` names that dimension."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from neo_jax.config import MeshConfig, load_config
from neo_jax.errors import UserError
from neo_jax.model.config import ModelConfig
from neo_jax.model.decoder import Decoder
from neo_jax.model.loss import masked_cross_entropy
from neo_jax.checkpoint import abstract_decoder
from neo_jax.sharding import batch_sharding, create_sharded, make_mesh, state_shardings

# A pre-trained-like vocabulary of 300 (not padded) and one KV head: on the meshes below some
# axes do not divide them, so the tests that place it say that those dimensions may stay whole.
CONFIG = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=300, hidden_size=64, intermediate_size=96,
                     num_layers=2, num_heads=4, num_kv_heads=1, head_dim=16)
KEPT_WHOLE = ("vocab", "kv_heads")
TINY_CONFIG = Path(__file__).parent.parent / "configs" / "model_tiny.yaml"
MESH_SHAPES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 2, 4)]


def mesh_of(shape):
    data, fsdp, tensor = shape
    return make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), jax.devices()[: data * fsdp * tensor])


def training_batch():
    """8 left-padded rows: tokens, positions, segment ids, next-token targets and loss weights."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 300, (8, 12)).astype(np.int32)
    lengths = rng.integers(4, 13, 8)
    valid = np.arange(12)[None, :] >= 12 - lengths[:, None]  # [batch, len]
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    targets = np.roll(tokens, -1, axis=1)
    weights = (valid & np.roll(valid, -1, axis=1)).astype(np.float32)
    weights[:, -1] = 0
    return tokens, positions, valid.astype(np.int32), targets, weights


def loss_fn(model, tokens, positions, segments, targets, weights):
    logits, _ = model(tokens, positions, segments)
    loss, _ = masked_cross_entropy(logits, targets, weights)
    return loss, logits


@nnx.jit
def train_step(model, tokens, positions, segments, targets, weights):
    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, tokens, positions, segments,
                                                                       targets, weights)
    return loss, logits, grads


def run_on_mesh(shape, random_decoder):
    mesh = mesh_of(shape)
    model = random_decoder(CONFIG, mesh, seed=7, allow_replicated=KEPT_WHOLE)  # same host values on every mesh
    batch = [jax.device_put(x, batch_sharding(mesh, x.ndim)) for x in training_batch()]
    loss, logits, grads = train_step(model, *batch)
    return float(loss), np.asarray(logits), jax.tree.map(np.asarray, nnx.to_pure_dict(grads))


def test_logits_loss_and_gradients_agree_across_meshes(random_decoder):
    reference_loss, reference_logits, reference_grads = run_on_mesh(MESH_SHAPES[0], random_decoder)
    assert np.isfinite(reference_loss) and reference_loss > 0
    for shape in MESH_SHAPES[1:]:
        loss, logits, grads = run_on_mesh(shape, random_decoder)
        np.testing.assert_allclose(loss, reference_loss, rtol=0, atol=1e-5, err_msg=str(shape))
        np.testing.assert_allclose(logits, reference_logits, rtol=0, atol=1e-5, err_msg=str(shape))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=str(shape)),
                     grads, reference_grads)


def test_created_parameters_carry_their_declared_shardings(capsys):
    overrides = ["architecture=Qwen3ForCausalLM", "tie_word_embeddings=false", "num_kv_heads=1", "num_layers=1"]
    small = load_config(ModelConfig, TINY_CONFIG, overrides)
    mesh = mesh_of((1, 2, 4))
    model = create_sharded(lambda: Decoder(small, nnx.Rngs(0)), mesh, allow_replicated=("kv_heads",))
    logged = capsys.readouterr().err.strip().splitlines()
    assert logged == ["neo_jax: layers.0.attn.k_kernel and 1 more: its kv_heads dimension (1) is not divisible by "
                      "mesh axis tensor = 4; kept whole on tensor (allow_replicated)"]
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    expected = [
        (model.embed_tokens, P(("tensor", "fsdp"), None)),  # vocabulary rows over both model axes
        (model.lm_head, P(("tensor", "fsdp"), None)),
        (attn.q_kernel, P("fsdp", "tensor", None)),
        (attn.k_kernel, P("fsdp", None, None)),  # one KV head cannot split 4 ways: whole, as allowed
        (attn.o_kernel, P("tensor", None, "fsdp")),
        (mlp.down_kernel, P("tensor", "fsdp")),
        (attn.q_norm.scale, P(None)),
    ]
    for param, spec in expected:
        value = param.get_value()
        assert value.sharding.spec == spec
        assert value.sharding.mesh.shape == mesh.shape
        shard_shape = value.addressable_shards[0].data.shape
        assert shard_shape == value.sharding.shard_shape(value.shape)  # each device holds only its slice
    assert model.embed_tokens.get_value().addressable_shards[0].data.shape == (512 // 8, 64)
    declared = nnx.to_pure_dict(state_shardings(nnx.state(model), mesh, allow_replicated=("kv_heads",)))
    actual = nnx.to_pure_dict(jax.tree.map(lambda x: x.sharding, nnx.state(model)))
    assert jax.tree.map(lambda s: s.spec, declared) == jax.tree.map(lambda s: s.spec, actual)


@pytest.mark.parametrize("shape, config, message", [
    ((1, 2, 4), CONFIG, "embed_tokens: its vocab dimension (300) is not divisible by mesh axis tensor x fsdp = 8; "
                        "choose a mesh whose axes divide it (or pad it: tokenizer build --pad-multiple), or add vocab "
                        "to mesh.allow_replicated to keep it whole on fsdp"),
    ((1, 1, 2), CONFIG, "layers.0.attn.k_bias: its kv_heads dimension (1) is not divisible by mesh axis tensor = 2; "
                        "choose a mesh whose axes divide it, or add kv_heads to mesh.allow_replicated to keep it "
                        "whole on tensor"),
    ((1, 8, 1), dataclasses.replace(CONFIG, vocab_size=320, hidden_size=60, num_heads=2, head_dim=30),
     "final_norm.scale: its embed dimension (60) is not divisible by mesh axis fsdp = 8"),
])
def test_an_axis_that_does_not_divide_a_parameter_is_an_error_naming_both(shape, config, message):
    abstract_state = nnx.state(abstract_decoder(config))
    with pytest.raises(UserError) as error:
        state_shardings(abstract_state, mesh_of(shape))
    assert str(error.value).startswith(message)


def test_allow_replicated_names_logical_axes():
    with pytest.raises(UserError, match=r"mesh.allow_replicated: 'kv_head' is not a logical axis; choose from \["):
        make_mesh(MeshConfig(allow_replicated=("kv_head",)))


@pytest.mark.parametrize("mesh_config, message", [
    (MeshConfig(data=3, fsdp=1, tensor=1), "needs 3 devices but 8"),
    (MeshConfig(data=3, fsdp=-1, tensor=1), "8 devices cannot be split"),
    (MeshConfig(data=-1, fsdp=-1, tensor=1), "at most one -1"),
])
def test_bad_mesh_is_a_clear_error(mesh_config, message):
    with pytest.raises(UserError, match=message):
        make_mesh(mesh_config)


def test_default_mesh_uses_every_device_on_fsdp():
    mesh = make_mesh(MeshConfig())
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert jnp.zeros(8, device=batch_sharding(mesh, 1)).sharding.spec == P(("data", "fsdp"))
