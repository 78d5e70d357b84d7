#!/usr/bin/env bash
# The main job on the embedded default, on a fresh machine: a venv, the package, then
# `neo-jax quickstart` (generated catalog -> SIDs -> training -> constrained generation -> eval).
# Extra arguments go to `neo-jax quickstart` (e.g. `out=runs/qs instruct_steps=800`, or
# `--config configs/quickstart_full.yaml`).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${NEO_JAX_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q -e .
exec neo-jax quickstart "$@"
