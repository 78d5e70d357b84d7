"""Two processes on this machine (jax.distributed over 127.0.0.1, gloo collectives) train as one."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import yaml

from neo_jax.config import to_dict
from neo_jax.train.monitor import read_metrics
from neo_jax.train.trainer import train
from train_fixtures import tiny_config, write_dataset

SETTINGS = ("steps=4", "eval.every_steps=2", "checkpoint.every_steps=2", "stage=instruct",
            "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1", "data.num_shards=2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def curve(run_dir):
    records = read_metrics(run_dir)
    return ([r["loss"] for r in records if "loss" in r], [r["valid_loss"] for r in records if "valid_loss" in r])


def test_two_processes_of_two_devices_agree_with_one_process_of_four(tmp_path):
    write_dataset(tmp_path)
    config_path = tmp_path / "two_processes.yaml"
    settings = json.loads(json.dumps(to_dict(tiny_config(tmp_path, "two", SETTINGS))))  # tuples -> lists
    config_path.write_text(yaml.safe_dump(settings))
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    workers = [subprocess.Popen(
        [sys.executable, "-m", "neo_jax.cli", "train", "--config", str(config_path),
         f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
         f"distributed.process_id={i}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    reference = train(tiny_config(tmp_path, "one", SETTINGS), devices=jax.devices()[:4])
    outputs = [worker.communicate(timeout=600) for worker in workers]
    for worker, (stdout, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
    summaries = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
    assert [s["step"] for s in summaries] == [4, 4]
    assert summaries[0]["loss"] == summaries[1]["loss"]  # both processes hold the same global result
    two_losses, two_valid = curve(tmp_path / "two")
    one_losses, one_valid = curve(tmp_path / "one")
    np.testing.assert_allclose(two_losses, one_losses, rtol=2e-5)
    np.testing.assert_allclose(two_valid, one_valid, rtol=2e-5)
    np.testing.assert_allclose(summaries[0]["loss"], reference.loss, rtol=2e-5)
    data_states = set(os.listdir(tmp_path / "two" / "checkpoints" / "4" / "data"))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= data_states  # each process's data position
