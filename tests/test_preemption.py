"""PreemptionWatch in one process: a SIGTERM handler that only sets a flag, restored afterwards; where no
handler can be installed it says so. The multi-process mode (JAX's preemption sync point) runs in
tests/test_launch.py (SIGTERM to one of two processes), the whole CLI in tests/test_train.py."""

import os
import signal
import threading
import time

from jax.experimental import multihost_utils

from flacuna_jax.preemption import EXIT_PREEMPTED, PreemptionWatch


def sigterm_myself_and_wait(watch, count):
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 60  # a hang guard: Python runs the handler at its next bytecode
    while watch.signals < count and time.time() < deadline:
        time.sleep(0.01)


def test_sigterm_sets_a_flag_and_the_previous_handler_comes_back():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *a: seen.append(a))
    try:
        with PreemptionWatch() as watch:
            assert watch.mode == "signal" and not watch.reached(1)
            assert watch.describe() == "on SIGTERM: stop after the step in progress, save it and exit with code 75"
            sigterm_myself_and_wait(watch, 1)
            assert watch.reached(2) and watch.signals == 1
            sigterm_myself_and_wait(watch, 2)  # a second one, as while the checkpoint is being saved
            assert watch.reached(3) and watch.signals == 2
        assert not seen  # the outer handler saw nothing while the watch was on ...
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 60
        while not seen and time.time() < deadline:
            time.sleep(0.01)
        assert len(seen) == 1  # ... and is back afterwards
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert EXIT_PREEMPTED == 75  # sysexits.h EX_TEMPFAIL; 1-4 are taken (error, usage, non-finite, peer failure)


def test_outside_the_main_thread_no_handler_and_it_says_so():
    before = signal.getsignal(signal.SIGTERM)
    result = {}

    def body():
        with PreemptionWatch() as watch:
            result.update(mode=watch.mode, reached=watch.reached(1), text=watch.describe())
    t = threading.Thread(target=body)
    t.start()
    t.join(60)
    assert result == {"mode": "none", "reached": False,
                      "text": "SIGTERM ends this run without a checkpoint: the run is not in the main thread"}
    assert signal.getsignal(signal.SIGTERM) is before


def test_multi_process_without_jax_preemption_service_says_so(monkeypatch):
    """jax_enable_preemption_service=False: JAX raises RuntimeError and has installed no handler; the
    watch must not install a Python one either (processes could not agree on a step)."""
    import jax

    def disabled(step):
        raise RuntimeError("Preemption sync manager has not been initialized.")
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", disabled)
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionWatch() as watch:
        assert watch.mode == "none" and not watch.reached(1)
        assert "JAX's preemption service is off (jax_enable_preemption_service)" in watch.describe()
        assert signal.getsignal(signal.SIGTERM) is before


def test_multi_process_asks_jax_with_this_launchs_step_count(monkeypatch):
    """In a jax.distributed job the answer is JAX's preemption sync point, asked with the steps done in
    this launch (0 on entry: a notice before the first step then stops after it)."""
    import jax

    answers = [False, False, True]
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                        lambda n: calls.append(n) or (answers[n - 1] if n else False))
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionWatch() as watch:
        assert watch.mode == "jax" and signal.getsignal(signal.SIGTERM) is before  # JAX's own handler stays
        assert [watch.reached(n) for n in (1, 2, 3)] == answers
    assert calls == [0, 1, 2, 3]
