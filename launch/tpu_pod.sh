#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it (or reuse it), copy this repository to every
# worker, install, and run the same `neo-jax train` command on all workers at once.
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR_TYPE CONFIG [key=value ...]
#   e.g. launch/tpu_pod.sh neo-v5e zone-of-your-quota v5litepod-16 configs/train_smollm2_grounding.yaml \
#          mesh.fsdp=16 run_dir=/home/$USER/gcs/runs/smollm2_grounding
#
# Environment:
#   PROJECT          gcloud project (default: gcloud's configured project)
#   RUNTIME_VERSION  TPU VM image (default tpu-ubuntu2204-base)
#   SPOT=1           create a Spot (preemptible) slice; preemption sends SIGTERM, the run
#                    saves a checkpoint and exits, and running this script again resumes it
#   GCS_BUCKET       mount this bucket with gcsfuse at ~/gcs on every worker; point run_dir
#                    there, because every host writes its own shards of each checkpoint
#                    into the same directory
#   REMOTE_DIR       where the code goes on the workers (default ~/neo_jax)
# Every worker joins the run with distributed.auto=true (JAX reads the slice's metadata).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 4 ]]; then
  echo "usage: $0 NAME ZONE ACCELERATOR_TYPE CONFIG [key=value ...]" >&2
  exit 2
fi
name="$1"; zone="$2"; accelerator="$3"; config="$4"; shift 4
runtime="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
remote_dir="${REMOTE_DIR:-neo_jax}"
project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project "$PROJECT")
tpu=(gcloud compute tpus tpu-vm "${project_flag[@]}")

if "${tpu[@]}" describe "$name" --zone "$zone" >/dev/null 2>&1; then
  echo "reusing TPU VM $name in $zone" >&2
else
  spot_flag=()
  [[ "${SPOT:-0}" == 1 ]] && spot_flag=(--spot)
  echo "creating TPU VM $name ($accelerator, $runtime) in $zone" >&2
  "${tpu[@]}" create "$name" --zone "$zone" --accelerator-type "$accelerator" --version "$runtime" "${spot_flag[@]}"
fi

staging="$(mktemp -d)"
archive="$staging/neo_jax.tar.gz"
trap 'rm -rf "$staging"' EXIT
git ls-files -z --cached --others --exclude-standard | tar --null -czf "$archive" -T -
"${tpu[@]}" scp "$archive" "$name:neo_jax.tar.gz" --zone "$zone" --worker=all

setup="mkdir -p $remote_dir && tar -xzf neo_jax.tar.gz -C $remote_dir && cd $remote_dir \
  && (test -x .venv/bin/python || python3 -m venv .venv) && . .venv/bin/activate \
  && pip install -q --upgrade pip && pip install -q -e . 'jax[tpu]'"
if [[ -n "${GCS_BUCKET:-}" ]]; then
  setup="$setup && (command -v gcsfuse >/dev/null || (sudo apt-get -qq update && sudo apt-get -qq install -y gcsfuse)) \
    && mkdir -p ~/gcs && (mountpoint -q ~/gcs || gcsfuse --implicit-dirs $GCS_BUCKET ~/gcs)"
fi
"${tpu[@]}" ssh "$name" --zone "$zone" --worker=all --command "$setup"

quoted_overrides=$(printf ' %q' "$@")
"${tpu[@]}" ssh "$name" --zone "$zone" --worker=all --command \
  "cd $remote_dir && . .venv/bin/activate && neo-jax train --config $config distributed.auto=true$quoted_overrides"
