#!/usr/bin/env bash
# One host, all its accelerators, one process.
#   launch/local.sh configs/vicuna_7b_lora.yaml output_dir=runs/v7b train.steps=1000
#   launch/local.sh --dry-run CONFIG ...   prints the environment and command instead of running them
# XLA flags and memory fraction: launch/gpu_env.sh (XLA_FLAGS / XLA_PYTHON_CLIENT_MEM_FRACTION from the
# environment win; FLACUNA_GPU_XLA_FLAGS="" drops the recommended flags).
# SIGTERM (the python process is exec'd: it receives it) stops the run after the step in progress, which
# is saved; exit code 75; the same command resumes from it.
set -euo pipefail
DRY_RUN=0; if [ "${1:-}" = --dry-run ]; then DRY_RUN=1; shift; fi
[ $# -ge 1 ] || { echo "usage: $0 [--dry-run] CONFIG [key=value ...]" >&2; exit 2; }
cd "$(dirname "$0")/.."
source launch/gpu_env.sh
source launch/dry_run.sh
run_or_show "${PYTHON:-.venv/bin/python}" -m flacuna_jax.train --config "$@"
