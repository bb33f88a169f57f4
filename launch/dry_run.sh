# Sourced by local.sh, multihost.sh and slurm.sbatch: their `--dry-run` (first argument) prints what
# they would run instead of running it. `run_or_show CMD ARGS...` execs the command, or, when
# DRY_RUN=1, prints every variable below that is exported (`export NAME=value`, shell-quoted) and
# then the command line (shell-quoted), and exits 0. The printed lines can be pasted into a shell.
_shown_vars="JAX_PLATFORMS XLA_FLAGS XLA_PYTHON_CLIENT_MEM_FRACTION TOKENIZERS_PARALLELISM PYTHONUNBUFFERED \
COORDINATOR_ADDRESS NUM_PROCESSES PROCESS_ID LOCAL_DEVICE_IDS HEARTBEAT_TIMEOUT_S INIT_TIMEOUT_S"

run_or_show() {
  if [ "${DRY_RUN:-0}" != 1 ]; then
    exec "$@"
  fi
  local name value
  for name in $_shown_vars; do
    if value=$(printenv "$name"); then
      printf 'export %s=%q\n' "$name" "$value"
    fi
  done
  printf '%q' "$1"
  shift
  [ $# -eq 0 ] || printf ' %q' "$@"
  printf '\n'
  exit 0
}
