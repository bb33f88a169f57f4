#!/usr/bin/env bash
# Many hosts, generic (k8s, ssh, ...): run this on every host with the same CONFIG and overrides.
#   COORDINATOR_ADDRESS=10.0.0.1:1234 NUM_PROCESSES=4 PROCESS_ID=<0..3> \
#     launch/multihost.sh configs/flacuna_13b.yaml output_dir=/shared/runs/flacuna
#   launch/multihost.sh --dry-run CONFIG ...   prints the environment and command instead of running them
# output_dir must be on storage every host sees (checkpoints are written by all processes).
# Optional: LOCAL_DEVICE_IDS=0,1,.. (this process' GPUs; default all of the host's), HEARTBEAT_TIMEOUT_S
# (default 100, JAX's: a host lost without closing its connections stops the others within about that
# long; flacuna_jax/distributed.py says why not shorter), INIT_TIMEOUT_S (default 300: the wait for all
# to join). XLA flags: launch/gpu_env.sh (yours in XLA_FLAGS win).
# SIGTERM to any host's process (k8s pod deletion, spot reclaim; python is exec'd and receives it) stops
# every process after the same step, which is saved; all exit with code 75; the same commands resume from
# it. The grace period before SIGKILL (k8s terminationGracePeriodSeconds) must cover one step plus one save.
set -euo pipefail
DRY_RUN=0; if [ "${1:-}" = --dry-run ]; then DRY_RUN=1; shift; fi
[ $# -ge 1 ] || { echo "usage: COORDINATOR_ADDRESS=host:port NUM_PROCESSES=N PROCESS_ID=i $0 [--dry-run] CONFIG [key=value ...]" >&2; exit 2; }
: "${COORDINATOR_ADDRESS:?set COORDINATOR_ADDRESS=host:port (the address of process 0)}"
: "${NUM_PROCESSES:?set NUM_PROCESSES}"
: "${PROCESS_ID:?set PROCESS_ID (0..NUM_PROCESSES-1)}"
export COORDINATOR_ADDRESS NUM_PROCESSES PROCESS_ID
cd "$(dirname "$0")/.."
source launch/gpu_env.sh
source launch/dry_run.sh
run_or_show "${PYTHON:-.venv/bin/python}" -m flacuna_jax.train --config "$@"
