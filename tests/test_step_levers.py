"""How the step computes, not what: chunked loss-position logits, `jax.nn.dot_product_attention`,
remat and the scanned layers each give today's loss and gradients (float32, within 1e-5) on the
tiny models and mesh shapes, through a whole training run as well; cached decoding is unchanged."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neo_jax.config import MeshConfig
from neo_jax.errors import UserError
from neo_jax.model import Decoder, ModelConfig
from neo_jax.model.layers import Dropout
from neo_jax.model.loss import HistoryPenalty
from neo_jax.sharding import batch_sharding, create_sharded, make_mesh
from neo_jax.train.config import LoraConfig
from neo_jax.train.stages import make_plan
from neo_jax.train.step import Unlikelihood, completion_objective
from neo_jax.train.trainer import train
from test_train_mesh import SETTINGS, losses
from train_fixtures import tiny_config, write_dataset

VOCAB = 64
CONFIG = ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                     num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, num_real_tokens=60)
CODE_LEVELS = np.where(np.arange(VOCAB) >= 40, (np.arange(VOCAB) - 40) // 8, -1).astype(np.int32)  # 3 levels of 8
LEVERS = {
    "attention": dict(attention="xla"),
    "attention in chunks": dict(attention_chunk=7),
    "xla attention in chunks": dict(attention="xla", attention_chunk=8),
    "remat full": dict(remat="full"),
    "remat dots": dict(remat="dots_no_batch"),
    "scan": dict(scan_layers=True),
    "scan + remat + attention": dict(scan_layers=True, remat="full", attention="xla", attention_chunk=5),
}
MESHES = {"one device": MeshConfig(fsdp=1), "fsdp 8": MeshConfig(fsdp=8),
          "data 2 fsdp 2 tensor 2": MeshConfig(data=2, fsdp=2, tensor=2)}


ITEMS = np.array([(40, 48, 56), (40, 48, 57), (40, 49, 58), (41, 50, 59)], np.int32)  # prefixes shared


def packed_batch(rows: int = 8, length: int = 24, seed: int = 0) -> dict[str, np.ndarray]:
    """Two packed examples a row (a text token, then the SIDs of three items of a small pool, so
    later items share prefixes with earlier ones), then padding; loss from each example's 4th token."""
    rng = np.random.default_rng(seed)
    example = lambda: np.concatenate([rng.integers(0, 40, 1), ITEMS[rng.integers(0, len(ITEMS), 3)].ravel()])
    tokens = np.zeros((rows, length + 1), np.int32)
    for row in tokens:
        row[:10], row[10:20] = example(), example()
    segments = np.zeros((rows, length), np.int32)
    segments[:, :10], segments[:, 10:20] = 1, 2
    positions = np.where(segments == 2, np.arange(length) - 10, np.arange(length)).astype(np.int32)
    loss_mask = ((segments > 0) & (positions >= 3) & (positions < 9)).astype(np.float32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": loss_mask, "segment_ids": segments,
            "positions": positions}


def loss_and_grads(model_config: ModelConfig, mesh_config: MeshConfig, loss_chunk: int = 0, dropout: float = 0.0):
    """`(objective, loss sum, tokens, penalty, gradients)` of one batch, jitted over the mesh."""
    devices = jax.devices()[:int(np.prod([mesh_config.data, mesh_config.fsdp, mesh_config.tensor]))]
    mesh = make_mesh(mesh_config, devices)
    model = create_sharded(lambda: Decoder(model_config, nnx.Rngs(0)), mesh)
    graphdef, state = nnx.split(model)
    plan = make_plan("instruct", LoraConfig(), None)
    trainable, frozen = plan.split(nnx.to_pure_dict(state), jax.random.key(0))
    unlikelihood = Unlikelihood(0.5, HistoryPenalty(CODE_LEVELS, 1))
    batch = jax.device_put(packed_batch(), batch_sharding(mesh, 2))
    drop = Dropout(jax.random.key(3), rate=dropout) if dropout else None

    @jax.jit
    def run(trainable, batch):
        objective = completion_objective(graphdef, plan, unlikelihood, loss_chunk)
        return jax.value_and_grad(objective, has_aux=True)(trainable, frozen, batch, drop)
    (objective, sums), grads = run(trainable, batch)
    return (float(objective), float(sums["loss"]), float(sums["weight"]), float(sums["unlikelihood"]),
            jax.tree.map(np.asarray, grads))


def assert_same(got, want):
    for g, w in zip(got[:4], want[:4]):
        assert g == pytest.approx(w, rel=1e-5, abs=1e-5)
    assert jax.tree.structure(got[4]) == jax.tree.structure(want[4])
    for g, w in zip(jax.tree.leaves(got[4]), jax.tree.leaves(want[4])):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(w).max())))


@pytest.fixture(scope="module")
def reference():
    return {name: loss_and_grads(CONFIG, mesh) for name, mesh in MESHES.items()}


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("lever", sorted(LEVERS))
def test_each_lever_gives_todays_loss_and_gradients(reference, lever, mesh_name):
    assert reference[mesh_name][2] > 0 and reference[mesh_name][3] > 0  # completion tokens, penalties
    got = loss_and_grads(dataclasses.replace(CONFIG, **LEVERS[lever]), MESHES[mesh_name])
    assert_same(got, reference[mesh_name])


@pytest.mark.parametrize("chunk", [8, 5, 24, 100])  # dividing, padded, whole, longer than the sequence
@pytest.mark.parametrize("mesh_name", ["one device", "data 2 fsdp 2 tensor 2"])
def test_chunked_logits_give_todays_loss_penalty_and_gradients(reference, chunk, mesh_name):
    assert_same(loss_and_grads(CONFIG, MESHES[mesh_name], loss_chunk=chunk), reference[mesh_name])


def test_every_lever_at_once_with_dropout_draws_the_same_masks():
    want = loss_and_grads(CONFIG, MESHES["one device"], dropout=0.2)
    got = loss_and_grads(dataclasses.replace(CONFIG, scan_layers=True, remat="dots", attention="xla",
                                             attention_chunk=6), MESHES["one device"],
                         loss_chunk=7, dropout=0.2)
    assert_same(got, want)


def test_cached_decoding_matches_the_full_forward_of_every_setting():
    """The KV-cached decode (layer by layer) and the scanned, rematerialised, chunked full forward of
    the same weights (the checkpoint layout is the same for every setting) give the same logits."""
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 60, (2, 9)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
    full, _ = Decoder(CONFIG, nnx.Rngs(0))(tokens, positions)
    for settings in (dict(), dict(attention="xla"), dict(scan_layers=True, remat="full", attention="xla",
                                                          attention_chunk=4)):
        model = Decoder(dataclasses.replace(CONFIG, **settings), nnx.Rngs(0))
        cache = model.init_cache(2, 12)
        prefill, cache = model(tokens[:, :6], positions[:, :6], None, cache)
        steps = []
        for i in range(6, 9):
            step, cache = model(tokens[:, i:i + 1], positions[:, i:i + 1], None, cache)
            steps.append(step)
        cached = np.concatenate([prefill, *steps], axis=1)  # [batch, 9, vocab]
        np.testing.assert_allclose(cached, np.asarray(full), atol=1e-5, err_msg=str(settings))
        np.testing.assert_allclose(np.asarray(model(tokens, positions)[0]), np.asarray(full), atol=1e-5,
                                   err_msg=str(settings))


@pytest.mark.parametrize("setting, message", [
    (dict(attention="flash"), "attention 'flash' is not supported"),
    (dict(remat="some"), "remat 'some' is not supported"),
    (dict(attention_chunk=-2), "attention_chunk must be non-negative"),
])
def test_unknown_settings_are_clear_errors(setting, message):
    with pytest.raises(UserError, match=message):
        dataclasses.replace(CONFIG, **setting)


def test_a_training_run_with_every_lever_follows_todays_curve(tmp_path):
    write_dataset(tmp_path)
    levers = ("attention=xla", "attention_chunk=5", "remat=full", "scan_layers=true", "loss_chunk=7")
    train(tiny_config(tmp_path, "today", SETTINGS), devices=jax.devices()[:1])
    train(tiny_config(tmp_path, "levers", SETTINGS + levers), devices=jax.devices()[:1])
    np.testing.assert_allclose(losses(tmp_path / "levers"), losses(tmp_path / "today"), rtol=1e-5)


def test_a_negative_loss_chunk_is_a_clear_error(tmp_path):
    from neo_jax.train.config import check_settings
    with pytest.raises(UserError, match="loss_chunk must be non-negative"):
        check_settings(tiny_config(tmp_path, "run", ("loss_chunk=-1",)))
