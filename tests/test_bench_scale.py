"""`neo-jax bench scale`: one JSON object of compiled memory figures per model and layout; a layout
that does not divide a parameter is that layout's one-line error; bad arguments are clear errors.
No test asserts a size or a speed."""

import json

import pytest

from neo_jax import cli
from neo_jax.bench.scale import parse_layout
from neo_jax.config import MeshConfig

SMALL = ["--models", "tiny", "--batch-per-device", "1", "--seq-len", "32", "--loss-chunk", "8", "--attention-chunk", "8",
         "--decode-requests", "8", "--decode-beams", "2", "--prompt-len", "8", "--new-tokens", "4"]


def test_prints_compiled_figures_per_layout_and_the_error_of_a_layout_that_does_not_divide(capsys):
    # the tiny preset has 2 KV heads: tensor=4 does not divide them
    assert cli.main(["bench", "scale", *SMALL, "--layouts", "fsdp=8", "fsdp=2,tensor=4",
                     "--measure", "tiny", "--measure-steps", "1", "--measure-seq-len", "16"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["settings"] == {"dtype": "bfloat16", "remat": "full", "attention": "xla", "attention_chunk": 8,
                                  "scan_layers": True, "loss_chunk": 8}
    fits, fails = result["models"]["tiny"]["layouts"]
    assert fits["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    for step in ("train_step", "decode_step"):
        figures = fits[step]
        assert figures["peak_bytes"] == (figures["argument_bytes"] + figures["output_bytes"] + figures["temp_bytes"]
                                         - figures["alias_bytes"]) > 0
        assert figures["compile_seconds"] > 0
    assert fits["train_step"]["tokens_per_device"] == 32 and fits["train_step"]["global_batch"] == 8
    assert fits["train_step"]["optimizer_bytes"] >= 2 * fits["train_step"]["parameter_bytes"] > 0
    assert fits["decode_step"]["sequences"] == 16
    assert "kv_heads" in fails["error"] and "tensor" in fails["error"] and "train_step" not in fails
    assert result["measured"]["steps_per_s"] > 0 and result["measured"]["global_batch"] == 8


@pytest.mark.parametrize("text, expected", [("fsdp=8", MeshConfig(1, 8, 1)), ("data=2,tensor=4", MeshConfig(2, 1, 4))])
def test_layouts_name_the_axes(text, expected):
    assert parse_layout(text) == expected


@pytest.mark.parametrize("argv, message", [
    (["--layouts", "fsdp:8"], "not AXIS=N"),
    (["--layouts", "fsdp=16"], "needs 16 devices"),
    (["--models", "gpt-5"], "unknown model shape 'gpt-5'"),
    (["--seq-len", "0"], "--seq-len must be at least 1"),
    (["--loss-chunk", "-1"], "--loss-chunk must be non-negative"),
    (["--attention-chunk", "-1"], "--attention-chunk must be non-negative"),
    (["--layers", "0"], "--layers must be at least 1"),
])
def test_bad_arguments_are_clear_errors(argv, message, capsys):
    assert cli.main(["bench", "scale", *SMALL, *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err
