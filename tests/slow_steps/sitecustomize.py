"""Test-only pacing for the crash/resume tests: put this directory first on PYTHONPATH and set
- SLOW_STEP_S to make every training process sleep that long before reading each batch, so that a
  test can kill a run between two known checkpoints;
- PAUSE_AT_BATCH=k and PAUSE_UNTIL=<path> to make every training process wait, before it reads its
  k-th training batch, until <path> exists. The loop (train.train_loop) reads batch k after it has
  dispatched step k - 1 and before it logs or saves that step; by then it has saved step k - 2. So
  with k = c + 2, checkpoint c is written (asynchronously) and no later one can be: a test kills a
  process at an exact step, whatever the machine's load;
- SIGTERM_AFTER_SAVE=s to make every training process send itself SIGTERM as soon as the save of
  checkpoint s has started (Checkpointer.save returned, its files still being written in the
  background): a second SIGTERM while a preemption checkpoint is being saved.
The library has no such hook."""

import os

_delay = float(os.environ.get("SLOW_STEP_S", "0") or 0)
_pause_at = int(os.environ.get("PAUSE_AT_BATCH", "0") or 0)
_release = os.environ.get("PAUSE_UNTIL", "")
_sigterm_after_save = int(os.environ.get("SIGTERM_AFTER_SAVE", "0") or 0)
if _delay > 0 or (_pause_at > 0 and _release):
    import time

    from flacuna_jax import train_data

    _next_batch = train_data.DataFeed.next_batch
    _reads = 0

    def _paced_next_batch(self):
        global _reads
        _reads += 1
        if _reads == _pause_at and _release:
            print(f"paused before batch {_reads} until {_release} exists", flush=True)
            while not os.path.exists(_release):
                time.sleep(0.05)
        if _delay > 0:
            time.sleep(_delay)
        return _next_batch(self)

    train_data.DataFeed.next_batch = _paced_next_batch

if _sigterm_after_save > 0:
    import signal

    from flacuna_jax import checkpoint

    _save = checkpoint.Checkpointer.save

    def _save_then_sigterm(self, step, *args, **kwargs):
        _save(self, step, *args, **kwargs)
        if step == _sigterm_after_save:
            print(f"SIGTERM to myself while checkpoint {step} is being saved", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)

    checkpoint.Checkpointer.save = _save_then_sigterm
