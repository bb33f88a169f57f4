"""Multi-process start-up: `jax.distributed.initialize` driven by the environment.

Call `initialize()` before any other JAX call. It decides, in this order:

1. `COORDINATOR_ADDRESS`, `NUM_PROCESSES`, `PROCESS_ID` (and optionally `LOCAL_DEVICE_IDS`) set
   explicitly (`launch/multihost.sh`, `launch/slurm.sbatch`, `launch/cpu_sim.sh`, k8s, ssh): use
   them; each process sees all of its host's devices unless `LOCAL_DEVICE_IDS` says otherwise.
2. Under SLURM (`SLURM_NTASKS` > 1) or Open MPI (`OMPI_COMM_WORLD_SIZE` > 1) without them (e.g.
   `srun python -m flacuna_jax.train` run directly), or with `FLACUNA_DISTRIBUTED=auto`
   (`launch/tpu_vm.sh` sets it on every worker of a Cloud TPU VM slice): JAX's own cluster detection
   (under SLURM on GPUs its default is one device per process, the one numbered by the task's local
   id; on a TPU VM, the worker's index and its peers' addresses come from the TPU metadata server).
3. Otherwise: a single process, nothing to initialise.

On CPU, collectives across processes go through gloo (`JAX_PLATFORMS=cpu`).

In a multi-process job every line this process writes to stdout/stderr from Python starts with
`[p<index>/<count>] ` (C++ logs from XLA, gloo and gRPC are not prefixed).

A process that dies must not leave the others hanging. These mechanisms bound that:

- A collective that notices the dead peer (gloo: "Connection closed by peer" or "reset by peer")
  raises `JaxRuntimeError`; the uncaught-exception hook installed here prints it with a one-line
  explanation and exits at once with `EXIT_PEER_FAILURE` (other uncaught exceptions: exit code 1).
- When the coordinator (process 0, which hosts the coordination service) dies, the others fail their
  next error poll at once and JAX terminates them ("another task died"; SIGABRT, exit code 134).
- The coordination service's heartbeat (`HEARTBEAT_TIMEOUT_S`, default 100 s, JAX's own default and
  MaxText's): a process that has sent no heartbeat for that long is declared dead and JAX terminates
  every other process ("Terminating process because the JAX distributed service detected fatal
  errors"; SIGABRT, exit code 134). It bounds what the first two cannot see: a host
  that vanishes without closing its connections, or peers blocked in a collective that never
  completes (NCCL waits forever for a dead peer). Why not shorter: heartbeats are sent by a
  background thread that a busy or swapping host can starve; a timeout shorter than the worst stall
  kills healthy jobs (seen with 10 s on a loaded 2-core machine while two processes compiled; MaxText
  users running large models raise it well above 100 s). A hang of at most 100 s after a host is lost
  costs far less than a healthy run killed. Tests and `cpu_sim.sh` use the same default: a process
  killed there closes its sockets, so the others stop through the first two within seconds.
- The hook skips JAX's shutdown barrier on the way out (`os._exit` after flushing). Without it a
  process that failed alone would wait in that barrier for peers blocked in a collective, up to
  `shutdown_timeout_seconds` (300 s), then abort.

`INIT_TIMEOUT_S` (default 300) bounds the wait for every process to join at start-up.

SIGTERM is not a failure: `jax.distributed.initialize` also starts JAX's preemption service, whose
SIGTERM handler keeps the process running; the training loop then stops every process after the same
step, saved (`preemption.py`, exit code 75).
"""

from __future__ import annotations

import io
import os
import sys
import traceback

import jax

EXIT_PEER_FAILURE = 4  # a cross-process operation failed: another process probably died
DEFAULT_HEARTBEAT_TIMEOUT_S = 100  # JAX's default and MaxText's (why not shorter: the module docstring)
# Text of runtime errors that mean "a peer or the coordination service went away".
_PEER_SIGNS = ("gloo", "connection closed", "connection reset", "connection refused", "heartbeat", "unavailable",
               "deadline_exceeded", "nccl", "coordination service", "barrier")

_initialized = False


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"error: environment variable {name}={value!r} is not an integer") from None


def initialize() -> None:
    """Joins the multi-process job described by the environment (no-op for a single process)."""
    global _initialized
    if _initialized:
        return
    coordinator = os.environ.get("COORDINATOR_ADDRESS")
    num = _int_env("NUM_PROCESSES")
    pid = _int_env("PROCESS_ID")
    heartbeat = _int_env("HEARTBEAT_TIMEOUT_S") or DEFAULT_HEARTBEAT_TIMEOUT_S
    auto = os.environ.get("FLACUNA_DISTRIBUTED", "")
    if auto not in ("", "auto"):
        raise SystemExit(f"error: FLACUNA_DISTRIBUTED={auto!r}: the only value is 'auto' (JAX finds the job itself)")
    cluster = (_int_env("SLURM_NTASKS") or 1) > 1 or (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1 or auto == "auto"
    if not coordinator and not cluster:
        return
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(heartbeat_timeout_seconds=heartbeat, initialization_timeout=_int_env("INIT_TIMEOUT_S") or 300)
    if coordinator:
        if num is None or pid is None:
            raise SystemExit("error: COORDINATOR_ADDRESS is set but NUM_PROCESSES or PROCESS_ID is not")
        if not 0 <= pid < num:
            raise SystemExit(f"error: PROCESS_ID={pid} is not in [0, NUM_PROCESSES={num})")
        local = os.environ.get("LOCAL_DEVICE_IDS")
        local_ids = [int(i) for i in local.split(",")] if local else None
        jax.distributed.initialize(coordinator, num, pid, local_device_ids=local_ids, **kwargs)
    else:
        jax.distributed.initialize(**kwargs)
    _initialized = True
    if jax.process_count() > 1:
        _prefix_output(f"[p{jax.process_index()}/{jax.process_count()}] ")
        sys.excepthook = _exit_on_uncaught
    print(f"joined: process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} local / "
          f"{jax.device_count()} global {jax.devices()[0].platform} devices; heartbeat timeout {heartbeat} s",
          flush=True)


def log_prefix() -> str:
    """'[p1/2] ' in multi-process runs, '' otherwise ('' too where `initialize` already prefixes
    every line of stdout/stderr)."""
    if jax.process_count() == 1 or isinstance(sys.stdout, _PrefixedStream):
        return ""
    return f"[p{jax.process_index()}/{jax.process_count()}] "


def is_peer_failure(exc: BaseException) -> bool:
    """Whether `exc` looks like a lost peer: a runtime error from a collective or the coordination service."""
    if not isinstance(exc, jax.errors.JaxRuntimeError):
        return False
    text = str(exc).lower()
    return any(sign in text for sign in _PEER_SIGNS)


def _exit_on_uncaught(kind, exc, tb) -> None:
    """sys.excepthook of multi-process runs: report, then leave at once (no shutdown barrier)."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
    else:
        traceback.print_exception(kind, exc, tb, file=sys.stderr)
    if is_peer_failure(exc):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else kind.__name__
        print(f"error: process {jax.process_index()} lost contact with another process of the job ({first}). "
              f"Another process has most likely died or been stopped: see its log. Exiting with code "
              f"{EXIT_PEER_FAILURE}.", file=sys.stderr, flush=True)
        code = EXIT_PEER_FAILURE
    else:
        print(f"error: process {jax.process_index()} failed ({kind.__name__}); exiting at once so that the other "
              f"processes stop too (they will report a lost peer).", file=sys.stderr, flush=True)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - leaving anyway
            pass
    os._exit(code)


class _PrefixedStream(io.TextIOBase):
    """A text stream that starts every line with `prefix` (writes through to `stream`)."""

    def __init__(self, stream, prefix: str):
        self._stream, self._prefix, self._line_start = stream, prefix, True

    def write(self, text: str) -> int:
        parts = []
        for piece in text.splitlines(keepends=True):
            if self._line_start:
                parts.append(self._prefix)
            parts.append(piece)
            self._line_start = piece.endswith(("\n", "\r"))
        self._stream.write("".join(parts))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self):  # noqa: D401 - mirrors the wrapped stream
        return getattr(self._stream, "encoding", "utf-8")

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _prefix_output(prefix: str) -> None:
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, _PrefixedStream):
            setattr(sys, name, _PrefixedStream(stream, prefix))
