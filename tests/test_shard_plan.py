"""`neo-jax shard-plan`: partition specs and bytes per device of a tiny model, against sums done by hand."""

import json
from pathlib import Path

import pytest

from neo_jax import cli
from neo_jax.tokenizer import LAYOUT_FILE
from train_fixtures import LAYOUT, MODEL_TINY

TINY_GROUNDING = Path(__file__).parent.parent / "configs" / "train_tiny_grounding.yaml"

# configs/model_tiny.yaml (tied embeddings, hidden 64, MLP 192, 2 layers, 4 heads, 2 KV heads of 16) with
# LAYOUT's 128 padded rows, float32, on data=1 x fsdp=4 x tensor=2; floats each device holds:
EMBED = 128 // 8 * 64  # [vocab, embed]: rows over tensor x fsdp, embed whole
NORM = 64 // 4  # [embed] over fsdp
LAYER = (64 // 4 * (4 // 2) * 16  # q [embed, heads, head_dim]: embed over fsdp, heads over tensor
         + 2 * (64 // 4 * (2 // 2) * 16)  # k, v [embed, kv_heads, head_dim]
         + (4 // 2) * 16 * (64 // 4)  # o [heads, head_dim, embed]
         + 3 * (64 // 4 * (192 // 2))  # gate, up [embed, mlp]; down [mlp, embed]
         + 2 * NORM)  # the two norms
PARAMS = 4 * (EMBED + NORM + 2 * LAYER)  # bytes
COUNTERS = 2 * 4  # int32: Adam's step count and the learning-rate schedule's


def shard_plan(capsys, tmp_path, *overrides, devices=()):
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir(exist_ok=True)
    (tokenizer / LAYOUT_FILE).write_text(LAYOUT.to_json())
    code = cli.main(["shard-plan", "--config", str(TINY_GROUNDING), *devices, f"init.model_config={MODEL_TINY}",
                     f"data.tokenizer={tokenizer}", "data.records_dir=/nowhere", *overrides])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else err.strip())


@pytest.mark.parametrize("settings, trainable, optimizer", [
    (["stage=instruct"], PARAMS, 2 * PARAMS + COUNTERS + 4),  # Adam's two moments, counters, the step
    (["stage=grounding"], 4 * EMBED, 2 * 4 * EMBED + COUNTERS + 4),  # only the token table trains
    (["stage=instruct", "optimizer.ema_decay=0.99"], PARAMS, 3 * PARAMS + COUNTERS + 4),  # + the weight average
])
def test_bytes_per_device_are_the_hand_computed_ones(capsys, tmp_path, settings, trainable, optimizer):
    code, plan = shard_plan(capsys, tmp_path, "mesh.fsdp=4", "mesh.tensor=2", *settings)
    assert code == 0, plan
    assert plan["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2} and plan["devices"] == 8
    assert plan["bytes_per_device"] == {"parameters": PARAMS, "optimizer_state": optimizer, "gradients": trainable,
                                        "total": PARAMS + optimizer + trainable}
    rows = {row["path"].split(".", 1)[1].removeprefix("model."): row for row in plan["parameters"]}
    assert sum(row["bytes_per_device"] for row in rows.values()) == PARAMS
    assert rows["embed_tokens"] == {"path": rows["embed_tokens"]["path"], "shape": [128, 64], "dtype": "float32",
                                    "spec": [["tensor", "fsdp"], None], "bytes_per_device": 4 * EMBED}
    assert rows["layers.1.attn.k_kernel"]["spec"] == ["fsdp", "tensor", None]
    assert rows["layers.1.mlp.down_kernel"]["bytes_per_device"] == 4 * 64 // 4 * 192 // 2


def test_devices_that_need_not_exist(capsys, tmp_path):
    code, plan = shard_plan(capsys, tmp_path, "mesh.fsdp=-1", "mesh.tensor=2", devices=("--devices", "16"))
    assert code == 0, plan
    assert plan["mesh"] == {"data": 1, "fsdp": 8, "tensor": 2} and plan["devices"] == 16
    embed = next(row for row in plan["parameters"] if row["path"].endswith("embed_tokens"))
    assert embed["bytes_per_device"] == 4 * 128 // 16 * 64


def test_an_axis_that_does_not_divide_a_parameter_is_one_line(capsys, tmp_path):
    code, message = shard_plan(capsys, tmp_path, "mesh.fsdp=1", "mesh.tensor=8")
    assert code == 2 and len(message.splitlines()) == 1
    assert "layers.0.attn.k_kernel: its kv_heads dimension (2) is not divisible by mesh axis tensor = 8" in message
    code, plan = shard_plan(capsys, tmp_path, "mesh.data=2", "mesh.fsdp=1", "mesh.tensor=4",
                            "mesh.allow_replicated=[kv_heads]")
    assert code == 0, plan
    assert plan["allow_replicated"] == ["kv_heads"]
    k_kernel = next(row for row in plan["parameters"] if row["path"].endswith("layers.0.attn.k_kernel"))
    assert k_kernel["spec"] == ["fsdp", None, None] and k_kernel["bytes_per_device"] == 4 * 64 * 2 * 16
