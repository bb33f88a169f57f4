"""Test-only pacing for the crash/resume tests: put this directory first on PYTHONPATH and set
SLOW_STEP_S to make every training process sleep that long before reading each batch, so that a
test can kill a run between two known checkpoints. The library has no such hook."""

import os

_delay = float(os.environ.get("SLOW_STEP_S", "0") or 0)
if _delay > 0:
    import time

    from flacuna_jax import train_data

    _next_batch = train_data.DataFeed.next_batch

    def _slow_next_batch(self):
        time.sleep(_delay)
        return _next_batch(self)

    train_data.DataFeed.next_batch = _slow_next_batch
