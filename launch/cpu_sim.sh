#!/usr/bin/env bash
# A many-host run simulated on this machine: N processes x D fake CPU devices, gloo collectives,
# coordinator on 127.0.0.1. Exercises jax.distributed, per-host data, global arrays and
# multi-process checkpoints without any GPU.
#   launch/cpu_sim.sh 2 2 configs/demo.yaml train.steps=6 output_dir=runs/sim
# Logs: OUTPUT_DIR/process_<i>.log (output_dir from the overrides, else runs/cpu_sim); their pids:
# OUTPUT_DIR/pids ("<index> <pid>" lines). Exit status: 0, or the first failing process' code.
#
# The coordinator listens on 127.0.0.1 only (JAX_COORDINATOR_BIND_ADDRESS).
#
# A process that dies makes the others exit by themselves: a collective that loses its peer exits
# with code 4 within seconds, and JAX's heartbeat (HEARTBEAT_TIMEOUT_S, the library default of 100 s
# unless set; see flacuna_jax/distributed.py for why not shorter) bounds the rest. Fallback, for
# the simulation only: a process still running PEER_EXIT_GRACE_S (default 120, past the heartbeat)
# seconds after another one failed is killed here, and this is said on stderr.
#
# SIGTERM to one process (kill -TERM <pid from OUTPUT_DIR/pids>) stops them all after the same step, which
# they save before exiting with code 75 (preempted; re-run the same command to resume). SIGTERM or Ctrl-C
# to this script is passed on to every process as SIGTERM, with the same effect; processes still running
# STOP_GRACE_S (default 60) seconds later are killed, as a scheduler's SIGKILL would.
# Env: PYTHON, PORT, HEARTBEAT_TIMEOUT_S, PEER_EXIT_GRACE_S, STOP_GRACE_S.
set -uo pipefail
[ $# -ge 3 ] || { echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS CONFIG [key=value ...]" >&2; exit 2; }
N=$1; D=$2; shift 2
[[ "$N" =~ ^[1-9][0-9]*$ && "$D" =~ ^[1-9][0-9]*$ ]] || { echo "error: NUM_PROCESSES and DEVICES_PER_PROCESS must be positive integers" >&2; exit 2; }
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
PORT="${PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
GRACE="${PEER_EXIT_GRACE_S:-120}"
STOP_GRACE="${STOP_GRACE_S:-60}"
OUT=runs/cpu_sim
for arg in "$@"; do case "$arg" in output_dir=*) OUT="${arg#output_dir=}";; esac; done
mkdir -p "$OUT"
declare -A pids=()
: > "$OUT/pids"
for ((i = 0; i < N; i++)); do
  COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_COORDINATOR_BIND_ADDRESS="127.0.0.1:$PORT" NUM_PROCESSES="$N" \
  PROCESS_ID="$i" JAX_PLATFORMS=cpu HEARTBEAT_TIMEOUT_S="${HEARTBEAT_TIMEOUT_S:-}" PYTHONUNBUFFERED=1 \
  XLA_FLAGS="--xla_force_host_platform_device_count=$D" \
    "$PY" -m flacuna_jax.train --config "$@" > "$OUT/process_$i.log" 2>&1 &
  pids[$i]=$!
  echo "$i $!" >> "$OUT/pids"
done
stop_all() {  # after a peer failure: SIGTERM, SIGKILL 5 s later (with a peer gone no step can be agreed and saved)
  kill "${pids[@]}" 2>/dev/null
  for _ in {1..25}; do
    [ -n "$(jobs -rp)" ] || return 0
    sleep 0.2
  done
  kill -KILL "${pids[@]}" 2>/dev/null
}
stop_asked=""
trap 'stop_asked=${stop_asked:-$SECONDS}; echo "SIGTERM passed on to the processes" >&2; kill -TERM "${pids[@]}" 2>/dev/null' INT TERM
status=0
failed_at=""
describe() {  # exit code -> words
  if [ "$1" -gt 128 ]; then echo "$1 (signal $(kill -l $(($1 - 128)) 2>/dev/null || echo $(($1 - 128))))"; else echo "$1"; fi
}
while [ "${#pids[@]}" -gt 0 ]; do
  running=" $(jobs -rp | tr '\n' ' ') "
  for i in "${!pids[@]}"; do
    p=${pids[$i]}
    [[ "$running" == *" $p "* ]] && continue
    wait "$p"; rc=$?
    unset "pids[$i]"
    if [ "$rc" -ne 0 ]; then
      echo "process $i (pid $p) exited with $(describe "$rc")" >&2
      if [ "$status" -eq 0 ]; then status=$rc; failed_at=$SECONDS; fi
    fi
  done
  if [ -n "$failed_at" ] && [ "${#pids[@]}" -gt 0 ] && [ $((SECONDS - failed_at)) -ge "$GRACE" ]; then
    echo "fallback: process(es) ${!pids[*]} still running ${GRACE} s after a failure; killing them" >&2
    stop_all
    failed_at=""  # report their exit codes on the next rounds
  fi
  if [ -n "$stop_asked" ] && [ "${#pids[@]}" -gt 0 ] && [ $((SECONDS - stop_asked)) -ge "$STOP_GRACE" ]; then
    echo "process(es) ${!pids[*]} still running ${STOP_GRACE} s after SIGTERM; killing them" >&2
    kill -KILL "${pids[@]}" 2>/dev/null
    stop_asked=""
  fi
  sleep 0.2
done
for ((i = 0; i < N; i++)); do echo "== process $i (tail) =="; tail -n 5 "$OUT/process_$i.log"; done
exit "$status"
