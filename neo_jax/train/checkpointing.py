"""Train checkpoints with orbax: state and data position saved together, resumable on any mesh.

    RUN_DIR/checkpoints/<step>/state/   the train state pytree (parameters, optimizer state, step)
    RUN_DIR/checkpoints/<step>/data/    the grain iterator state, one JSON file per process

Saves are asynchronous (the device-to-host copy happens before `save` returns, the
writing in the background) every `every_steps` steps; the last `keep` are kept. A
restore reads the state straight into the shardings of the current mesh, whatever mesh
wrote it. On SIGTERM (a TPU preemption notice) the loop saves at the next step boundary
and exits cleanly: one process catches the signal itself; several processes agree on the
step through JAX's preemption sync point, which listens for SIGTERM in every process.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from neo_jax.checkpoint import restore_failure
from neo_jax.errors import UserError
from neo_jax.train.config import CheckpointConfig

CHECKPOINTS_DIR = "checkpoints"


class TrainCheckpoints:
    """An orbax `CheckpointManager` over `RUN_DIR/checkpoints` with items `state` and `data`."""

    def __init__(self, run_dir: str | Path, config: CheckpointConfig):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep, enable_async_checkpointing=config.async_save,
            # Exactly every N steps; preemption and the last step save with `force` (see `save`).
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(config.every_steps))
        self.directory = Path(run_dir).absolute() / CHECKPOINTS_DIR
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator, force: bool = False) -> bool:
        """Start saving if `step` is due (or `force`); returns whether a save started."""
        return self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)), force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator) -> Any:
        """The state of `step` laid out as `abstract_state` says (`jax.ShapeDtypeStruct`s with
        shardings); `data_iterator` is moved to the saved position in place."""
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)))
        except Exception as e:  # the checkpoint and storage libraries raise many types for a damaged or foreign one
            raise UserError(f"{self.directory / str(step)}: cannot resume from this checkpoint; was it written "
                            f"by a run with another stage, model or data.num_shards? ({restore_failure(e)})") from None
        return restored["state"]

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def abstract_like(state: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct`s of `state`'s leaves placed by `shardings` (a restore target)."""
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        state, shardings)


class PreemptionWatch:
    """Says when the run must save and stop because SIGTERM arrived (in any process)."""

    def __init__(self):
        self._signalled = False
        self._multi_process = jax.process_count() > 1
        self._previous = None if self._multi_process else signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self._signalled = True

    def reached(self, step: int) -> bool:
        """Call once per step in every process; True at the step where all processes save."""
        if self._multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._signalled

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
