"""Stopping a training run cleanly when the scheduler asks: every process stops after the same step,
which is checkpointed before the process exits.

Schedulers announce that they are about to kill a job with SIGTERM and send SIGKILL a grace period
later: SLURM preemption, time limits (`--signal=TERM@<seconds>`) and `scancel`, Kubernetes/GKE pod
deletion (`terminationGracePeriodSeconds`, default 30 s), spot and preemptible VM reclaim. The training
loop asks `PreemptionWatch.reached(n)` once after each completed step; when it says yes the loop saves
that step, waits for the save and exits with `EXIT_PREEMPTED`. Re-running the same command resumes there.

How a notice becomes one agreed step:

- multi-process jobs (`jax.distributed` initialised, `distributed.py`): JAX's preemption sync manager,
  which `jax.distributed.initialize` starts (config `jax_enable_preemption_service`, on by default).
  It installs its own SIGTERM handler; a notice received by ANY process (one spot host reclaimed) is
  passed to all through the coordination service, which collects every process' last reported step
  counter and sets the sync point to the largest plus one. `reached_preemption_sync_point(n)` is then
  true on every process at the same n. The protocol uses the coordination service only, so it works
  with gloo on CPU as with NCCL. A Python handler must not be installed here: it would replace JAX's.
- one process: a Python SIGTERM handler that sets a flag.

The counter is the number of steps completed in THIS launch (1, 2, ...), not the global step: JAX's
counters start at 0, so a notice that arrives before the first call (during compilation) sets the sync
point to 1, which a resumed run counting from its checkpoint's step would never reach. Nothing else may
report a counter (JAX keeps the last value per process): orbax's own manager does on every save, so
`checkpoint.py` switches that off.

A second SIGTERM changes nothing: the flag stays set, JAX's handler stays installed, the save in flight
finishes. SIGKILL after the grace period cannot be caught; orbax's atomic rename then leaves the
previous checkpoint as the latest (`checkpoint.py`). The grace period must cover one step plus one save.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL, "try again later": re-running the command resumes


class PreemptionWatch:
    """Answers, once per completed step, whether the run must stop there (every process alike).

    Use as a context manager around the training loop: in one process it installs the SIGTERM
    handler on entry and restores the previous one on exit (after the last save has completed)."""

    def __init__(self) -> None:
        self.mode = "none"  # "jax" | "signal" | "none"
        self.signals = 0  # SIGTERMs seen by the Python handler ("signal" mode)
        self._previous: Any = None
        self._why_none = ""

    def __enter__(self) -> "PreemptionWatch":
        if jax.distributed.is_initialized():
            from jax.experimental import multihost_utils

            try:
                multihost_utils.reached_preemption_sync_point(0)  # 0: what JAX's counter starts at anyway
                self.mode = "jax"
            except RuntimeError:  # jax_enable_preemption_service is off: SIGTERM ends the process
                self._why_none = "JAX's preemption service is off (jax_enable_preemption_service)"
        elif threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self.mode = "signal"
        else:  # Python only lets the main thread install a signal handler
            self._why_none = "the run is not in the main thread"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.mode == "signal":  # None: a handler set outside Python, which Python cannot put back
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.signals += 1  # no I/O here: the handler can interrupt a print in progress

    def reached(self, steps_done: int) -> bool:
        """Whether to stop after this launch's `steps_done`-th step; call it after every step, on
        every process, with 1, 2, 3, ..."""
        if self.mode == "jax":
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(steps_done)
        return self.signals > 0

    def describe(self) -> str:
        if self.mode == "jax":
            return (f"on SIGTERM to any of the {jax.process_count()} processes: all stop after the same step, "
                    f"save it and exit with code {EXIT_PREEMPTED}")
        if self.mode == "signal":
            return f"on SIGTERM: stop after the step in progress, save it and exit with code {EXIT_PREEMPTED}"
        return f"SIGTERM ends this run without a checkpoint: {self._why_none}"
