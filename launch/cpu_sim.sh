#!/usr/bin/env bash
# A many-host run simulated on this machine: N processes x D fake CPU devices, gloo collectives,
# coordinator on 127.0.0.1. Exercises jax.distributed, per-host data, global arrays and
# multi-process checkpoints without any GPU.
#   launch/cpu_sim.sh 2 2 configs/demo.yaml train.steps=6 output_dir=runs/sim
# Logs: OUTPUT_DIR/process_<i>.log (output_dir from the overrides, else runs/cpu_sim).
# If one process fails, the others are stopped and the script exits non-zero.
set -uo pipefail
[ $# -ge 3 ] || { echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS CONFIG [key=value ...]" >&2; exit 2; }
N=$1; D=$2; shift 2
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
PORT="${PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
OUT=runs/cpu_sim
for arg in "$@"; do case "$arg" in output_dir=*) OUT="${arg#output_dir=}";; esac; done
mkdir -p "$OUT"
pids=()
for ((i = 0; i < N; i++)); do
  COORDINATOR_ADDRESS="127.0.0.1:$PORT" NUM_PROCESSES="$N" PROCESS_ID="$i" JAX_PLATFORMS=cpu \
  HEARTBEAT_TIMEOUT_S="${HEARTBEAT_TIMEOUT_S:-10}" \
  XLA_FLAGS="--xla_force_host_platform_device_count=$D" \
    "$PY" -m flacuna_jax.train --config "$@" > "$OUT/process_$i.log" 2>&1 &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
status=0
# Wait for the first process to finish; if it failed, stop the rest.
while [ "${#pids[@]}" -gt 0 ]; do
  wait -n -p done_pid "${pids[@]}"; rc=$?
  pids=($(for p in "${pids[@]}"; do [ "$p" != "$done_pid" ] && echo "$p"; done))
  if [ "$rc" -ne 0 ]; then
    echo "process (pid $done_pid) exited with $rc; stopping the others" >&2
    status=$rc
    kill "${pids[@]}" 2>/dev/null
  fi
done
for ((i = 0; i < N; i++)); do echo "== process $i (tail) =="; tail -n 5 "$OUT/process_$i.log"; done
exit "$status"
