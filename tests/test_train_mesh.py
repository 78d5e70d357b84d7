"""The same config on 1 and on 8 emulated devices (and with gradient accumulation) gives the same curve."""

import jax
import numpy as np
import pytest
from flax import nnx, traverse_util

from neo_jax.checkpoint import abstract_decoder, load_model
from neo_jax.config import MeshConfig
from neo_jax.model import ModelConfig
from neo_jax.sharding import make_mesh
from neo_jax.train.flops import matmul_params, measured_peak_flops, train_flops_per_token
from neo_jax.train.monitor import read_metrics
from neo_jax.train.trainer import _Throughput, train
from train_fixtures import tiny_config, write_dataset

SETTINGS = ("steps=4", "eval.every_steps=0", "checkpoint.every_steps=100", "stage=instruct")
EIGHT_WAYS = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")


def losses(run_dir):
    return np.array([r["loss"] for r in read_metrics(run_dir) if "loss" in r])


def params(final_dir):
    model = load_model(final_dir, make_mesh(MeshConfig(), jax.devices()[:1]))
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model))).items()}


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    root = tmp_path_factory.mktemp("mesh")
    write_dataset(root)
    result = train(tiny_config(root, "one", SETTINGS), devices=jax.devices()[:1])
    return root, result


def test_eight_devices_match_one_device(one_device):
    root, single = one_device
    assert len(jax.devices()) == 8
    eight = train(tiny_config(root, "eight", SETTINGS + EIGHT_WAYS))
    np.testing.assert_allclose(losses(root / "eight"), losses(root / "one"), rtol=2e-5)
    want, have = params(single.final_dir), params(eight.final_dir)
    for path in want:
        np.testing.assert_allclose(have[path], want[path], rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_gradient_accumulation_matches_one_big_batch(one_device):
    root, _ = one_device
    train(tiny_config(root, "accumulated", SETTINGS + EIGHT_WAYS + ("grad_accum_steps=2",)))
    np.testing.assert_allclose(losses(root / "accumulated"), losses(root / "one"), rtol=2e-5)


def test_bfloat16_compute_keeps_float32_weights_and_follows_the_float32_curve(one_device):
    root, _ = one_device
    result = train(tiny_config(root, "bf16", SETTINGS + ("compute_dtype=bfloat16",)), devices=jax.devices()[:1])
    np.testing.assert_allclose(losses(root / "bf16"), losses(root / "one"), rtol=2e-2)
    assert all(value.dtype == np.float32 for value in params(result.final_dir).values())


def test_model_flops_count_every_matrix_product_once():
    d, f, layers, heads, kv, hd, vocab = 64, 96, 3, 4, 2, 16, 256
    for tied, item_ids in ((False, 0), (True, 0), (True, 500)):
        config = ModelConfig("LlamaForCausalLM", vocab_size=vocab, hidden_size=d, intermediate_size=f,
                             num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=hd,
                             tie_word_embeddings=tied, num_item_ids=item_ids)
        params = nnx.to_pure_dict(nnx.state(abstract_decoder(config)))
        per_layer = d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * f  # q, o; k, v; gate, up, down
        assert matmul_params(params) == layers * per_layer + vocab * d  # + the output head, never a lookup table
    flops = train_flops_per_token(1000, num_layers=2, num_heads=4, head_dim=16, seq_len=128)
    assert flops == 6 * 1000 + 6 * 2 * 4 * 16 * 128
    assert measured_peak_flops("float32") > 1e8  # any machine multiplies faster than 0.1 GFLOP/s


def test_a_peak_measured_low_on_a_busy_start_is_measured_again_when_the_steps_outrun_it():
    throughput = _Throughput(tokens_per_step=1000, flops_per_token=1000.0, peak_flops=1.0)  # far too low
    throughput.steps, throughput.start = 1, throughput.start - 1.0  # a step of 10^6 model FLOPs a second
    measured = throughput.measure()
    assert throughput.peak_flops > 1e8 and 0.0 < measured["mfu"] <= 1.0
