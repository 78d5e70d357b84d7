#!/usr/bin/env bash
# Try a training config on this machine's CPU, as a mesh of emulated devices, before a pod.
#
#   launch/local_cpu_mesh.sh [--devices N] [--processes P] CONFIG [key=value ...]
#
# N emulated CPU devices in total (default 8). With P > 1 (default 1), P processes of N/P
# devices each train together through jax.distributed on 127.0.0.1 with gloo collectives,
# the way the hosts of a pod do. Ctrl-C or SIGTERM reaches every process; each saves a
# checkpoint and stops, and the same command resumes. Example:
#   launch/local_cpu_mesh.sh --devices 8 --processes 2 configs/train_tiny_grounding.yaml mesh.data=2 steps=50
set -euo pipefail
cd "$(dirname "$0")/.."

devices=8
processes=1
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --devices) devices="$2"; shift 2 ;;
    --processes) processes="$2"; shift 2 ;;
    *) echo "unknown option $1 (expected --devices N or --processes P)" >&2; exit 2 ;;
  esac
done
if [[ $# -lt 1 ]]; then
  echo "usage: $0 [--devices N] [--processes P] CONFIG [key=value ...]" >&2
  exit 2
fi
config="$1"; shift
if (( devices % processes != 0 )); then
  echo "--devices $devices does not divide over --processes $processes" >&2
  exit 2
fi

export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=$((devices / processes)) ${XLA_FLAGS:-}"
if (( processes == 1 )); then
  exec neo-jax train --config "$config" "$@"
fi

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
forward() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap forward INT TERM
for ((i = 0; i < processes; i++)); do
  neo-jax train --config "$config" "$@" distributed.coordinator_address="127.0.0.1:$port" \
    distributed.num_processes="$processes" distributed.process_id="$i" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  until wait "$pid"; do
    code=$?
    if ! kill -0 "$pid" 2>/dev/null; then status=$code; break; fi  # exited with an error (not a trapped signal)
  done
done
exit "$status"
