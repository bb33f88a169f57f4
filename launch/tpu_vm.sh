#!/usr/bin/env bash
# The same training command on every worker of a Cloud TPU VM slice, through gcloud's ssh (--worker=all).
#   launch/tpu_vm.sh [--dry-run] NAME ZONE CONFIG [key=value ...]
#   launch/tpu_vm.sh my-v5e-16 us-west4-a configs/flacuna_13b.yaml output_dir=gs://my-bucket/runs/flacuna \
#       model.attention=splash
# runs
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command \
#     "cd DIR && source launch/tpu_env.sh && FLACUNA_DISTRIBUTED=auto exec PYTHON -m flacuna_jax.train --config CONFIG ..."
# --dry-run prints that command instead, quoted for bash (paste it to run it).
#
# Every worker needs this repository at FLACUNA_TPU_DIR (default flacuna_jax, i.e. ~/flacuna_jax there) with
# its environment (FLACUNA_TPU_PYTHON, default .venv/bin/python in that dir; pip install -c constraints.txt
# -e ".[tpu]"). JAX finds the slice by itself (FLACUNA_DISTRIBUTED=auto: the worker's index and its peers
# from the TPU metadata), so every worker runs the identical command. CONFIG and relative paths in the
# overrides are read on the workers, relative to FLACUNA_TPU_DIR. output_dir must be storage every worker
# writes to, a bucket (gs://...): every process writes its part of each checkpoint (README: "TPU").
# Values are quoted for the remote shell: spaces, quotes and $ reach the trainer as typed.
# LIBTPU_INIT_ARGS and FLACUNA_TPU_LIBTPU_ARGS set here are passed on (launch/tpu_env.sh); gcloud's own
# settings (project, account) come from its configuration or CLOUDSDK_* variables (CLOUDSDK_CORE_PROJECT=...).
set -euo pipefail
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
[ $# -ge 3 ] || { echo "usage: $0 [--dry-run] NAME ZONE CONFIG [key=value ...]" >&2; exit 2; }
name=$1 zone=$2 config=$3
shift 3

q() { printf '%q' "$1"; }
remote="cd $(q "${FLACUNA_TPU_DIR:-flacuna_jax}") &&"
for var in LIBTPU_INIT_ARGS FLACUNA_TPU_LIBTPU_ARGS; do
  if [ -n "${!var+set}" ]; then remote+=" export $var=$(q "${!var}") &&"; fi
done
remote+=" source launch/tpu_env.sh && FLACUNA_DISTRIBUTED=auto exec $(q "${FLACUNA_TPU_PYTHON:-.venv/bin/python}")"
remote+=" -m flacuna_jax.train --config $(q "$config")"
for override in "$@"; do remote+=" $(q "$override")"; done

cmd=(gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$remote")
if [ "$dry_run" = 1 ]; then  # one line: a word with anything but [A-Za-z0-9_./=:,@+-] in single quotes
  line=""
  for word in "${cmd[@]}"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./=:,@+-]+$ ]]; then line+=" $word"; else line+=" '${word//\'/\'\\\'\'}'"; fi
  done
  printf '%s\n' "${line# }"
else
  exec "${cmd[@]}"
fi
