"""The weight average (`optimizer.ema_decay`): its recurrence, frozen rows kept bit for bit, the saved
model being the average, and exact resume with it."""

import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from neo_jax.errors import UserError
from neo_jax.train.step import ema_update
from neo_jax.train.trainer import train
from test_train_resume import final_params, preempt_at_step_2
from train_fixtures import tiny_config, write_dataset

# A constant learning rate, so that a run's first k steps do not depend on its total steps.
CONSTANT = ("optimizer.warmup_steps=0", "optimizer.end_lr_ratio=1.0", "eval.every_steps=0",
            "checkpoint.every_steps=100")
DECAY = 0.5


def test_ema_update_follows_the_warmed_up_decay_and_keeps_frozen_values():
    ema = {"w": jnp.array([1.0, 2.0, 3.0])}
    trainable = {"w": jnp.array([5.0, 6.0, 3.0 + 1e-7])}
    masks = {"w": np.array([True, True, False])}
    got = ema_update(ema, trainable, masks, jnp.int32(0), decay=0.99)  # step 0: d = min(0.99, 1/10)
    np.testing.assert_allclose(np.asarray(got["w"][:2]), 0.1 * np.array([1.0, 2.0]) + 0.9 * np.array([5.0, 6.0]),
                               rtol=1e-6)
    assert np.asarray(got["w"])[2] == np.float32(3.0)  # frozen: the average's own bits
    later = ema_update(ema, trainable, masks, jnp.int32(10_000), decay=0.99)  # late: d = 0.99
    np.testing.assert_allclose(np.asarray(later["w"][:1]), [0.99 * 1.0 + 0.01 * 5.0], rtol=1e-6)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A data set and a trained checkpoint every run below starts from (its weights are known)."""
    root = tmp_path_factory.mktemp("ema")
    write_dataset(root)
    train(tiny_config(root, "start", ("steps=1", *CONSTANT)))
    return root


def runs_from_start(root, name, *overrides):
    return train(tiny_config(root, name, (f"init.checkpoint={root / 'start' / 'final'}",
                                          "init.model_config=null", *CONSTANT, *overrides)))


def test_the_saved_model_is_the_average_of_the_trained_weights(start):
    root = start
    weights = [final_params(root / "start")]  # p0, then p1..p3: the same trajectory, cut after k steps
    for steps in (1, 2, 3):
        runs_from_start(root, f"plain{steps}", f"steps={steps}")
        weights.append(final_params(root / f"plain{steps}"))
    runs_from_start(root, "ema", "steps=3", f"optimizer.ema_decay={DECAY}")
    got = final_params(root / "ema")
    for path in weights[0]:
        expected = weights[0][path].astype(np.float64)
        for t in range(3):
            d = min(DECAY, (1 + t) / (10 + t))
            expected = d * expected + (1 - d) * weights[t + 1][path]
        np.testing.assert_allclose(got[path], expected, rtol=0, atol=1e-6, err_msg=str(path))
    assert not np.allclose(got[("embed_tokens",)], weights[3][("embed_tokens",)])  # not the last weights


def test_a_resumed_run_keeps_its_average(start):
    root = start
    settings = ("steps=4", f"optimizer.ema_decay={DECAY}", "eval.every_steps=2")
    runs_from_start(root, "ema_full", *settings)
    stopped = train(tiny_config(root, "ema_stopped", (f"init.checkpoint={root / 'start' / 'final'}",
                                                      "init.model_config=null", *CONSTANT, *settings)),
                    validation_hooks=[preempt_at_step_2])
    assert stopped.preempted and stopped.step == 2
    shutil.copytree(root / "ema_stopped", root / "ema_resumed")
    runs_from_start(root, "ema_resumed", *settings)
    want, have = final_params(root / "ema_full"), final_params(root / "ema_resumed")
    for path in want:
        np.testing.assert_allclose(have[path], want[path], rtol=0, atol=1e-6, err_msg=str(path))
    with pytest.raises(UserError, match="optimizer.ema_decay 0.5 -> 0.0"):  # the average may not be dropped
        runs_from_start(root, "ema_stopped", "steps=4", "optimizer.ema_decay=0.0", "eval.every_steps=2")


def test_a_decay_outside_zero_to_one_is_refused(start):
    with pytest.raises(UserError, match=r"optimizer.ema_decay must be in \[0, 1\)"):
        runs_from_start(start, "bad", "steps=1", "optimizer.ema_decay=1.0")
