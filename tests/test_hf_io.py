"""Bad input to import-hf/export-hf names the file and tensor and leaves nothing behind; config and vocab extension."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from neo_jax import cli
from neo_jax.config import MeshConfig
from neo_jax.errors import UserError
from neo_jax.model.config import ModelConfig
from neo_jax.model.decoder import MASKED_LOGIT
from neo_jax.model.extend_vocab import NOISE_SCALE, extend_vocab
from neo_jax.sharding import make_mesh
from neo_jax.vocab import EntityType, VocabLayout


def run_cli_expecting_error(capsys, *argv) -> str:
    assert cli.main(list(map(str, argv))) == 2
    return capsys.readouterr().err


def assert_nothing_written(out_dir):
    assert not out_dir.exists()
    assert not list(out_dir.parent.glob(f".{out_dir.name}.tmp-*"))


@pytest.fixture
def qwen2_copy(tiny_hf_model, tmp_path):
    """A private, editable copy of the tiny Qwen2 model directory."""
    return shutil.copytree(tiny_hf_model("qwen2"), tmp_path / "hf")


def rewrite_tensors(path, edit):
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_config_json(qwen2_copy, tmp_path, capsys):
    (qwen2_copy / "config.json").unlink()
    err = run_cli_expecting_error(capsys, "import-hf", qwen2_copy, tmp_path / "out")
    assert f"{qwen2_copy / 'config.json'}: not found" in err
    assert_nothing_written(tmp_path / "out")


def test_missing_weights_file(qwen2_copy, tmp_path, capsys):
    (qwen2_copy / "model.safetensors").unlink()
    err = run_cli_expecting_error(capsys, "import-hf", qwen2_copy, tmp_path / "out")
    assert "neither model.safetensors nor model.safetensors.index.json" in err and str(qwen2_copy) in err
    assert_nothing_written(tmp_path / "out")


def test_unknown_architecture(qwen2_copy, tmp_path, capsys):
    config = json.loads((qwen2_copy / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (qwen2_copy / "config.json").write_text(json.dumps(config))
    err = run_cli_expecting_error(capsys, "import-hf", qwen2_copy, tmp_path / "out")
    assert "config.json" in err and "'GPT2LMHeadModel' is not supported" in err
    assert_nothing_written(tmp_path / "out")


def test_shape_mismatch_names_file_and_tensor(qwen2_copy, tmp_path, capsys):
    name = "model.layers.1.self_attn.k_proj.weight"
    rewrite_tensors(qwen2_copy / "model.safetensors", lambda t: t.update({name: np.zeros((16, 64), np.float32)}))
    err = run_cli_expecting_error(capsys, "import-hf", qwen2_copy, tmp_path / "out")
    assert f"{qwen2_copy / 'model.safetensors'}: tensor '{name}' has shape (16, 64), expected (32, 64)" in err
    assert_nothing_written(tmp_path / "out")


def test_missing_tensor_is_named(qwen2_copy, tmp_path, capsys):
    rewrite_tensors(qwen2_copy / "model.safetensors", lambda t: t.pop("model.layers.0.self_attn.v_proj.bias"))
    err = run_cli_expecting_error(capsys, "import-hf", qwen2_copy, tmp_path / "out")
    assert "model.safetensors: tensor 'model.layers.0.self_attn.v_proj.bias' is missing" in err
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_names_the_file(qwen2_copy, tmp_path, capsys, damage):
    path = qwen2_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100] if damage == "truncated" else b"not a safetensors file at all")
    err = run_cli_expecting_error(capsys, "import-hf", qwen2_copy, tmp_path / "out")
    assert f"{path}: not a valid safetensors file" in err
    assert_nothing_written(tmp_path / "out")


def test_sharded_checkpoint_with_a_missing_shard(tiny_hf_model, tmp_path, capsys):
    hf_dir = shutil.copytree(tiny_hf_model("qwen3_tied_sharded_bf16"), tmp_path / "hf")
    shard = sorted(hf_dir.glob("model-*.safetensors"))[-1]
    shard.unlink()
    err = run_cli_expecting_error(capsys, "import-hf", hf_dir, tmp_path / "out")
    assert f"{shard}: safetensors file not found" in err
    assert_nothing_written(tmp_path / "out")


def test_existing_output_is_left_alone(qwen2_copy, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    err = run_cli_expecting_error(capsys, "import-hf", qwen2_copy, tmp_path / "out")
    assert "already exists" in err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_export_of_a_non_checkpoint(tmp_path, capsys):
    (tmp_path / "not_a_checkpoint").mkdir()
    err = run_cli_expecting_error(capsys, "export-hf", tmp_path / "not_a_checkpoint", tmp_path / "out")
    assert "model_config.json is missing" in err
    assert_nothing_written(tmp_path / "out")


def test_both_rope_spellings_give_one_config():
    legacy = {"architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 500000.0,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    current = {k: v for k, v in legacy.items() if k not in ("rope_theta", "rope_scaling")}
    current["rope_parameters"] = {**legacy["rope_scaling"], "rope_theta": 500000.0}
    config = ModelConfig.from_hf(legacy)
    assert config == ModelConfig.from_hf(current)
    assert config.rope_scaling.factor == 8.0 and config.head_dim == 16
    assert ModelConfig.from_hf(config.to_hf()) == config
    with pytest.raises(UserError, match="my/config.json: rope type 'yarn' is not supported"):
        ModelConfig.from_hf({**current, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}},
                            source="my/config.json")


@pytest.mark.parametrize("tied", [False, True])
def test_vocab_extension_keeps_text_rows_and_initialises_new_rows(random_decoder, tied):
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=300, hidden_size=64, intermediate_size=96,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=tied)
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=4))
    model = random_decoder(config, mesh, seed=11, allow_replicated=("vocab", "kv_heads"))  # 300 rows, 2 KV heads
    layout = VocabLayout(text_size=300, entity_types=(EntityType("item", (64, 64)), EntityType("user", (32,))),
                         pad_multiple=128)
    extended = extend_vocab(model, layout, mesh, allow_replicated=("kv_heads",))  # the padded rows divide
    assert extended.config.vocab_size == layout.padded_size == 512
    assert extended.config.num_real_tokens == layout.size == 463

    tables = [("embed_tokens", model.embed_tokens, extended.embed_tokens)]
    if not tied:
        tables.append(("lm_head", model.lm_head, extended.lm_head))
    new_rows_seen = []
    for name, before, after in tables:
        text = np.asarray(before.get_value())  # [300, 64]
        grown = np.asarray(after.get_value())  # [512, 64]
        assert after.get_value().sharding.spec == P(("tensor", "fsdp"), None)  # 512 rows split 8 ways
        assert np.array_equal(grown[:300], text), name  # bit for bit
        assert not grown[layout.size:].any(), name  # padding rows are zero
        new = grown[300: layout.size]  # [163, 64]
        mean, std = text.mean(0), text.std(0)
        standardised = (new - mean) / std  # documented: N(0, NOISE_SCALE^2) per dimension
        assert abs(standardised.std() - NOISE_SCALE) < 0.1 * NOISE_SCALE, name
        assert np.all(np.abs(standardised.mean(0)) < 5 * NOISE_SCALE / np.sqrt(len(new))), name
        new_rows_seen.append(new)
    if not tied:
        assert not np.allclose(new_rows_seen[0] - new_rows_seen[0].mean(0), new_rows_seen[1] - new_rows_seen[1].mean(0))

    tokens = np.array([[1, 299, 300, 462]], np.int32)
    logits = nnx.jit(lambda m, t, p: m(t, p)[0])(extended, tokens, np.arange(4, dtype=np.int32)[None])
    assert np.all(np.asarray(logits)[..., layout.size:] == MASKED_LOGIT)
    assert np.all(np.asarray(logits)[..., : layout.size] > MASKED_LOGIT / 2)


def test_vocab_extension_needs_the_pretrained_text_size(random_decoder):
    config = ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=300, hidden_size=64, intermediate_size=96,
                         num_layers=1, num_heads=4, num_kv_heads=1, head_dim=16)
    model = random_decoder(config)
    layout = VocabLayout(text_size=256, entity_types=(EntityType("item", (8,)),))
    with pytest.raises(UserError, match="text_size 256 differs from the model's 300"):
        extend_vocab(model, layout, make_mesh(MeshConfig(), jax.devices()[:1]))
