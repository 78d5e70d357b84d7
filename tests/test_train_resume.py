"""Exact resume: a run stopped by SIGTERM and restarted equals the uninterrupted run, on any mesh.

The runs train with dropout, so a resume must also draw the same dropout masks."""

import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest
from flax import nnx, traverse_util

from neo_jax.checkpoint import load_model
from neo_jax.config import MeshConfig
from neo_jax.errors import UserError
from neo_jax.sharding import make_mesh
from neo_jax.train.checkpointing import CHECKPOINTS_DIR
from neo_jax.train.monitor import read_metrics
from neo_jax.train.trainer import train
from train_fixtures import tiny_config, write_dataset

SETTINGS = ("steps=4", "dropout=0.2", "eval.every_steps=2", "checkpoint.every_steps=100", "mesh.data=2", "mesh.fsdp=2",
            "mesh.tensor=2")


def preempt_at_step_2(model, step):
    """A validation hook that delivers a preemption notice at step 2, as a TPU VM's SIGTERM would."""
    if step == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return {}


def curve(run_dir):
    """step -> (training loss, completion tokens in the batch): the loss and the data order."""
    return {r["step"]: (r["loss"], r["loss_tokens"]) for r in read_metrics(run_dir) if "loss" in r}


def final_params(run_dir):
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    params = nnx.to_pure_dict(nnx.state(load_model(run_dir / "final", mesh)))
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted run, and a run preempted after step 2 (not yet resumed)."""
    root = tmp_path_factory.mktemp("resume")
    write_dataset(root)
    full = train(tiny_config(root, "full", SETTINGS))
    stopped = train(tiny_config(root, "stopped", SETTINGS), validation_hooks=[preempt_at_step_2])
    return root, full, stopped


def test_sigterm_saves_and_stops_at_the_step_boundary(runs):
    root, _, stopped = runs
    assert stopped.preempted and stopped.step == 2 and stopped.final_dir is None
    assert sorted(os.listdir(root / "stopped" / CHECKPOINTS_DIR)) == ["2"]
    saved = json.loads((root / "stopped" / CHECKPOINTS_DIR / "2" / "data" / "process_0-of-1.json").read_text())
    assert saved  # the data position went into the same checkpoint


def test_resume_reproduces_the_uninterrupted_run(runs):
    root, full, _ = runs
    resumed_dir = root / "resumed"
    shutil.copytree(root / "stopped", resumed_dir)
    resumed = train(tiny_config(root, "resumed", SETTINGS))
    assert resumed.step == 4 and not resumed.preempted
    expected, got = curve(root / "full"), curve(resumed_dir)
    assert sorted(got) == [1, 2, 3, 4]
    for step in expected:
        assert got[step][1] == expected[step][1], f"step {step} saw another batch"
        np.testing.assert_allclose(got[step][0], expected[step][0], rtol=0, atol=1e-6)
    want, have = final_params(root / "full"), final_params(resumed_dir)
    for path in want:
        np.testing.assert_allclose(have[path], want[path], rtol=0, atol=1e-6, err_msg=str(path))
    assert resumed.valid_loss == pytest.approx(full.valid_loss, abs=1e-6)


def test_a_run_over_an_older_final_model_swaps_in_its_own_and_leaves_no_staging(runs):
    root, _, _ = runs
    longer_dir = root / "longer"
    longer_dir.mkdir()
    shutil.copytree(root / "full" / "final", longer_dir / "final")  # an older model, no checkpoints
    before = final_params(longer_dir)
    result = train(tiny_config(root, "longer", SETTINGS + ("steps=6",)))
    assert result.step == 6 and result.final_dir == str(longer_dir / "final")
    after = final_params(longer_dir)
    assert any(not np.array_equal(after[path], before[path]) for path in before)
    assert not [p.name for p in longer_dir.iterdir() if p.name.startswith(".final")]


def run_dir_files(run_dir):
    """relative path -> bytes of every file under a run directory."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("change,message", [
    ("steps=8", r"steps 4 -> 8\. .*learning rate at step 2 would go from .* to .*pass its own settings \(steps=4\)"),
    ("optimizer.warmup_steps=3", r"optimizer\.warmup_steps 1 -> 3\."),
])
def test_resume_with_another_schedule_is_refused_and_keeps_the_run(runs, change, message):
    """A resume must use the schedule its checkpoints were trained under; with the run's own steps
    it resumes as before."""
    root, full, _ = runs
    name = "changed_" + change.split("=")[0].replace(".", "_")
    run_dir = root / name
    shutil.copytree(root / "stopped", run_dir)
    saved = json.loads((run_dir / "train_config.json").read_text())
    assert (saved["steps"], saved["optimizer"]["warmup_steps"]) == (4, 1)  # what the check compares with
    before = run_dir_files(run_dir)
    with pytest.raises(UserError, match=message) as refused:
        train(tiny_config(root, name, SETTINGS + (change,)))
    assert f"init.checkpoint={run_dir / 'final'}" in str(refused.value)
    assert run_dir_files(run_dir) == before  # checkpoints, metrics and the saved config untouched
    resumed = train(tiny_config(root, name, SETTINGS))
    assert resumed.step == 4 and not resumed.preempted
    expected, got = curve(root / "full"), curve(run_dir)
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step][1] == expected[step][1]
        np.testing.assert_allclose(got[step][0], expected[step][0], rtol=0, atol=1e-6)


def test_a_finished_run_with_more_steps_points_to_a_new_run_dir(runs):
    root, _, _ = runs
    run_dir = root / "finished"
    shutil.copytree(root / "full", run_dir)
    with pytest.raises(UserError, match=r"steps 4 -> 6\. .*This run is complete .*start a new run_dir with "
                                        r"init\.checkpoint=.*finished/final"):
        train(tiny_config(root, "finished", SETTINGS + ("steps=6",)))
    assert sorted(os.listdir(run_dir / CHECKPOINTS_DIR)) == ["4"]


def test_restore_onto_another_mesh_shape_gives_the_same_losses(runs):
    root, full, _ = runs
    other_dir = root / "other_mesh"
    shutil.copytree(root / "stopped", other_dir)
    other_mesh = ("mesh.data=1", "mesh.fsdp=1", "mesh.tensor=4", "mesh.allow_replicated=[kv_heads]")  # 2 KV heads
    other = train(tiny_config(root, "other_mesh", SETTINGS + other_mesh), devices=jax.devices()[:4])
    expected, got = curve(root / "full"), curve(other_dir)
    for step in (3, 4):
        assert got[step][1] == expected[step][1]
        np.testing.assert_allclose(got[step][0], expected[step][0], rtol=1e-5)
    assert other.valid_loss == pytest.approx(full.valid_loss, rel=1e-5)
