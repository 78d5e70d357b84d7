"""`neo-jax bench model`: one JSON object on stdout, sane figures, clear errors. No test asserts a speed."""

from __future__ import annotations

import argparse
import json
import math
import sys

import jax
import pytest
import yaml

from neo_jax import cli
from neo_jax.bench.model import model_config_from, random_batch, torch_reference
from neo_jax.errors import UserError
from neo_jax.model import ModelConfig

FAST = ["--batch", "8", "--seq-len", "16", "--steps", "2", "--warmup", "1"]
TINY_SHAPE = dict(architecture="Qwen3ForCausalLM", vocab_size=256, hidden_size=32, intermediate_size=64,
                  num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8)


def _bench(argv: list[str], capsys) -> dict:
    """Run the benchmark; stdout must hold exactly one JSON object."""
    assert cli.main(["bench", "model", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_ours(result: dict, batch: int, seq_len: int) -> None:
    assert result["batch"] == batch and result["seq_len"] == seq_len
    assert math.prod(result["mesh"].values()) == result["device_count"] == len(jax.devices())
    assert result["device_kind"] and result["jax_version"] == jax.__version__
    for key in ("layers", "hidden", "heads", "kv_heads", "vocab", "params"):
        assert _positive(result["model"][key]), key
    for key in ("tokens_per_s", "step_seconds", "model_flops_per_token", "model_flops_per_s", "peak_flops_per_s",
                "mfu", "cpu_cores"):
        assert _positive(result[key]), key
    assert 0 < result["mfu"] <= 1
    assert result["model_flops_per_s"] == pytest.approx(result["tokens_per_s"] * result["model_flops_per_token"])
    assert result["mfu"] == pytest.approx(result["model_flops_per_s"] / result["peak_flops_per_s"])
    assert result["tokens_per_s"] == pytest.approx(batch * seq_len / result["step_seconds"])


def test_yaml_config_without_torch(tmp_path, capsys):
    config_file = tmp_path / "model.yaml"
    config_file.write_text(yaml.safe_dump(TINY_SHAPE))
    result = _bench(["--config", str(config_file), "--no-torch", *FAST], capsys)
    _check_ours(result, 8, 16)
    assert result["model"]["architecture"] == "Qwen3ForCausalLM" and result["model"]["vocab"] == 256
    assert result["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert result["torch"] is None and result["ratio_vs_torch"] is None


def test_lora_step_against_the_full_step_in_the_same_run(capsys):
    result = _bench(["--preset", "tiny", "--no-torch", "--lora-rank", "4", "--lora-targets", "q_kernel,up_kernel",
                     *FAST], capsys)
    _check_ours(result, 8, 16)
    lora, memory = result["lora"], result["memory"]
    assert lora["rank"] == 4 and lora["targets"] == ["q_kernel", "up_kernel"]
    for figures in (memory, lora["memory"]):
        assert figures["peak_bytes"] == (figures["argument_bytes"] + figures["output_bytes"] + figures["temp_bytes"]
                                         - figures["alias_bytes"]) > 0
    assert lora["step_time_ratio_vs_full"] > 0 and lora["full_step_seconds_alternated"] > 0
    assert lora["peak_memory_ratio_vs_full"] == pytest.approx(lora["memory"]["peak_bytes"] / memory["peak_bytes"])
    assert lora["tokens_per_s"] == pytest.approx(8 * 16 / lora["step_seconds"])
    assert 0 < lora["memory"]["xla_flops"] < memory["xla_flops"]  # no weight gradient of a frozen kernel
    assert lora["xla_flops_ratio_vs_full"] == pytest.approx(lora["memory"]["xla_flops"] / memory["xla_flops"])


def test_against_torch_on_a_mesh(capsys):
    result = _bench(["--preset", "tiny", "--mesh.data", "2", "--mesh.fsdp", "2", "--mesh.tensor", "2", *FAST],
                    capsys)
    _check_ours(result, 8, 16)
    assert result["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    reference = result["torch"]
    assert reference["params"] == result["model"]["params"]  # the same architecture on both sides
    assert reference["threads"] == result["cpu_cores"]
    assert _positive(reference["tokens_per_s"])
    assert result["ratio_vs_torch"] == pytest.approx(result["tokens_per_s"] / reference["tokens_per_s"])


def test_shape_from_a_hugging_face_or_checkpoint_directory(tiny_hf_model, tmp_path):
    hf_dir = tiny_hf_model("qwen2_tied_mqa")
    args = argparse.Namespace(config=str(hf_dir), preset=None, dtype="bfloat16")
    expected = ModelConfig.from_hf(json.loads((hf_dir / "config.json").read_text()), dtype="bfloat16")
    assert model_config_from(args) == expected
    (tmp_path / "model_config.json").write_text(expected.to_json())
    assert model_config_from(argparse.Namespace(config=str(tmp_path), preset=None, dtype="float32")) == \
        ModelConfig.from_dict({**json.loads(expected.to_json()), "dtype": "float32"})


@pytest.mark.parametrize("argv, message", [
    (["--batch", "3"], "--batch 3 is not divisible by the data axes"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--config", "/nonexistent/model.yaml"], "/nonexistent/model.yaml does not exist"),
    (["--mesh.tensor", "3"], "8 devices cannot be split"),
    (["--lora-rank", "2", "--lora-targets", "q_proj"], "--lora-targets: ['q_proj'] are not projection kernels"),
])
def test_bad_arguments_are_user_errors(argv, message, capsys):
    assert cli.main(["bench", "model", "--no-torch", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err


def test_incomplete_yaml_names_the_file(tmp_path, capsys):
    config_file = tmp_path / "partial.yaml"
    config_file.write_text(yaml.safe_dump({"architecture": "LlamaForCausalLM", "vocab_size": 64}))
    assert cli.main(["bench", "model", "--no-torch", "--config", str(config_file)]) == 2
    assert f"{config_file}: missing required setting 'hidden_size'" in capsys.readouterr().err


def test_missing_torch_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    config = ModelConfig(**TINY_SHAPE)
    with pytest.raises(UserError, match=r"pip install -e \.\[test\]"):
        torch_reference(config, random_batch(config, 2, 4, seed=0), warmup=1, steps=1, seed=0)
