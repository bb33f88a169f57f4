#!/usr/bin/env bash
# One host, all its accelerators, one process.
#   launch/local.sh configs/vicuna_7b_lora.yaml output_dir=runs/v7b train.steps=1000
# XLA flags and memory fraction: launch/gpu_env.sh (XLA_FLAGS / XLA_PYTHON_CLIENT_MEM_FRACTION from the
# environment win; FLACUNA_GPU_XLA_FLAGS="" drops the recommended flags).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 CONFIG [key=value ...]" >&2; exit 2; }
cd "$(dirname "$0")/.."
source launch/gpu_env.sh
exec "${PYTHON:-.venv/bin/python}" -m flacuna_jax.train --config "$@"
