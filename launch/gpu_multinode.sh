#!/usr/bin/env bash
# Train on several GPU nodes: one process per node, all running the same `neo-jax train`
# command and meeting at a coordinator through jax.distributed (no torchrun needed).
#
# Under SLURM (one task per node, all GPUs of the node visible to it):
#   srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu_multinode.sh CONFIG [key=value ...]
# Without SLURM, on every node (NODE_RANK 0 .. NUM_NODES-1; COORDINATOR = node 0's host:port):
#   COORDINATOR=10.0.0.1:12355 NUM_NODES=4 NODE_RANK=$i launch/gpu_multinode.sh CONFIG [key=value ...]
#
# Install first on every node: `pip install -e . 'jax[cuda12]'`. run_dir must be on a file
# system all nodes share: every process writes its own shards of each checkpoint there.
# SIGTERM (e.g. `scancel --signal=TERM`) saves a checkpoint on every node and stops;
# running the same command again resumes.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG [key=value ...]   (under srun, or with COORDINATOR, NUM_NODES, NODE_RANK set)" >&2
  exit 2
fi
config="$1"; shift

if [[ -n "${COORDINATOR:-}" ]]; then
  : "${NUM_NODES:?set NUM_NODES with COORDINATOR}" "${NODE_RANK:?set NODE_RANK with COORDINATOR}"
  distributed=(distributed.coordinator_address="$COORDINATOR" distributed.num_processes="$NUM_NODES"
               distributed.process_id="$NODE_RANK")
elif [[ -n "${SLURM_JOB_ID:-}" ]]; then
  distributed=(distributed.auto=true)  # JAX reads SLURM_* for the coordinator, process count and rank
else
  echo "neither SLURM (run under srun) nor COORDINATOR/NUM_NODES/NODE_RANK is set" >&2
  exit 2
fi
exec neo-jax train --config "$config" "${distributed[@]}" "$@"
