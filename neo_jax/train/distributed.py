"""Several processes, one program: `jax.distributed` start-up and global arrays from per-process data.

On a TPU pod slice or a SLURM GPU cluster `jax.distributed.initialize()` finds the
coordinator by itself (`auto`); elsewhere the config names it. On CPU the
cross-process collectives need gloo, which must be chosen before the backend starts.
Each process then feeds only its own rows of a batch (see `neo_jax.train.input`), and
`jax.make_array_from_process_local_data` stitches them into one global array.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from neo_jax.errors import UserError
from neo_jax.sharding import batch_sharding


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process run; all unset = one process.

    `auto: true` lets JAX read the cluster (TPU VM metadata, SLURM variables);
    otherwise give all three of coordinator_address, num_processes and process_id.
    """

    auto: bool = False
    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def explicit(self) -> bool:
        return self.coordinator_address is not None


def check(config: DistributedConfig) -> None:
    """Stop on an incomplete or contradictory setting before anything starts."""
    given = {"distributed.coordinator_address": config.coordinator_address,
             "distributed.num_processes": config.num_processes,
             "distributed.process_id": config.process_id}
    missing = [name for name, value in given.items() if value is None]
    if config.auto and len(missing) < len(given):
        raise UserError("distributed.auto=true finds the coordinator itself; leave "
                        "distributed.coordinator_address, num_processes and process_id unset")
    if 0 < len(missing) < len(given):
        raise UserError(f"{missing[0]} is not set; a multi-process run needs coordinator_address, "
                        "num_processes and process_id together")
    if config.num_processes is not None and config.num_processes < 1:
        raise UserError(f"distributed.num_processes must be at least 1, got {config.num_processes}")
    if config.process_id is not None and not 0 <= config.process_id < (config.num_processes or 0):
        raise UserError(f"distributed.process_id {config.process_id} is outside 0..{config.num_processes - 1}")


def initialize(config: DistributedConfig) -> None:
    """Join the run described by `config` (no-op for a single process). Call before any JAX computation."""
    check(config)
    if not (config.auto or config.explicit):
        return
    # Cross-process collectives of the CPU backend (the only backend on a CPU machine; unused
    # but harmless beside a TPU or GPU backend) go through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if config.auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=config.coordinator_address,
                                   num_processes=config.num_processes, process_id=config.process_id)


def global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """One global array per field from this process's rows (`[local_batch, ...]` -> `[global_batch, ...]`),
    its rows over the mesh's data axes (`batch_sharding`)."""
    return {name: jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
            for name, value in local.items()}
