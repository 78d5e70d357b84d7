"""Training configs: the shipped YAMLs load; bad settings stop before compiling with one line naming them."""

import importlib
from pathlib import Path

import jax
import pytest

from neo_jax import cli
from neo_jax.config import load_config
from neo_jax.train import distributed
from neo_jax.train.config import TrainConfig
from train_fixtures import MODEL_TINY, write_dataset

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("train_*.yaml"))
TINY_GROUNDING = Path(__file__).parent.parent / "configs" / "train_tiny_grounding.yaml"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(TrainConfig, path)
    assert config.stage in ("grounding", "instruct") and config.run_dir


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("config")
    write_dataset(root)
    return root


@pytest.fixture
def no_compiling(monkeypatch):
    """Any `jax.jit` call fails the test: the error must come before compiling."""
    importlib.import_module("neo_jax.train.trainer")  # its imports decorate with jax.jit: load them first

    def compile_attempt(*args, **kwargs):
        raise AssertionError("a bad config reached jax.jit")
    monkeypatch.setattr(jax, "jit", compile_attempt)


def run_train(dataset, *overrides):
    base = [f"run_dir={dataset / 'run'}", f"data.records_dir={dataset / 'records'}",
            f"data.tokenizer={dataset / 'tokenizer'}", f"init.model_config={MODEL_TINY}", "batch_size=8",
            "data.num_shards=2", "seq_len=32"]
    return cli.main(["train", "--config", str(TINY_GROUNDING), *base, *overrides])


@pytest.mark.parametrize("overrides, named", [
    (["optimizer.lr=0.1"], "unknown setting 'optimizer.lr'"),
    (["batch_size=6", "mesh.data=2", "mesh.fsdp=4"], "mesh.data x mesh.fsdp"),
    (["batch_size=8", "grad_accum_steps=2", "mesh.data=8", "mesh.fsdp=1"], "grad_accum_steps"),
    (["mesh.data=16", "mesh.fsdp=1"], "mesh.data=16"),
    (["mesh.fsdp=1", "mesh.tensor=8"],
     "layers.0.attn.k_kernel: its kv_heads dimension (2) is not divisible by mesh axis tensor = 8"),
    (["mesh.allow_replicated=[kv_head]"], "mesh.allow_replicated: 'kv_head' is not a logical axis"),
    (["init.model_config=null", "init.checkpoint=/nonexistent/ckpt"], "init.checkpoint: /nonexistent/ckpt"),
    (["data.records_dir=/nonexistent/records"], "data.records_dir: /nonexistent/records"),
    (["data.valid_split=heldout"], "data.valid_split: "),
    (["stage=grounding", "lora.rank=8"], "lora.rank=8"),
    (["data.num_shards=3"], "data.num_shards 3"),
    (["stage=instruct", "lora.rank=4", "lora.targets=[q_proj]"], "lora.targets: ['q_proj']"),
    (["init.checkpoint=/tmp"], "exactly one of init.checkpoint"),
    (["init.model_config=/nonexistent/model.yaml"], "init.model_config: /nonexistent/model.yaml"),
    (["data.task_weights={recommend: 1, nope: 2}"], "data.task_weights: no train record has task 'nope'"),
    (["data.task_weights={recommend: 0}"], "data.task_weights: weights must be non-negative"),
    (["data.task_weights={recommend: -1}"], "data.task_weights: weights must be non-negative"),
    (["eval.recall_examples=/nonexistent/valid.jsonl"], "set both eval.recall_examples"),
    (["eval.recall_examples=/nonexistent/valid.jsonl", "eval.recall_sids=/tmp"],
     "eval.recall_examples: /nonexistent/valid.jsonl"),
    ([f"eval.recall_examples={TINY_GROUNDING}", "eval.recall_sids=/nonexistent/sids"],
     "eval.recall_sids: /nonexistent/sids"),
    ([f"eval.recall_examples={TINY_GROUNDING}", "eval.recall_sids=/tmp", "eval.recall_beams=5"],
     "eval.recall_beams"),
    (["eval.select=valid_accuracy"], "eval.select: unknown metric 'valid_accuracy'"),
    (["eval.select=valid_ndcg@10"], "eval.select=valid_ndcg@10 needs eval.recall_examples"),
    (["eval.select=valid_loss", "eval.every_steps=0"], "eval.select needs evaluations"),
])
def test_bad_settings_stop_before_compiling_with_one_line(dataset, no_compiling, capsys, overrides, named):
    assert run_train(dataset, *overrides) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1, message
    assert named in message, message
    assert not (dataset / "run" / "checkpoints").exists()


def test_unknown_key_in_the_yaml_file_names_file_and_key(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("run_dir: runs/x\noptimizer:\n  learning_rate: 0.1\n  decay: 0.1\n")
    assert cli.main(["train", "--config", str(path)]) == 2
    message = capsys.readouterr().err.strip()
    assert str(path) in message and "optimizer.decay" in message


@pytest.mark.parametrize("settings, named", [
    ({"coordinator_address": "127.0.0.1:1234"}, "distributed.num_processes"),
    ({"auto": True, "process_id": 0}, "distributed.auto"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, "distributed.process_id 2"),
])
def test_incomplete_distributed_settings_are_named(settings, named):
    with pytest.raises(distributed.UserError, match=named.replace(".", r"\.")):
        distributed.check(distributed.DistributedConfig(**settings))


def test_help_describes_the_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "key=value" in capsys.readouterr().out
