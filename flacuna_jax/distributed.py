"""Multi-process start-up: `jax.distributed.initialize` driven by the environment.

Call `initialize()` before any other JAX call. It decides, in this order:

1. `COORDINATOR_ADDRESS`, `NUM_PROCESSES`, `PROCESS_ID` (and optionally `LOCAL_DEVICE_IDS`) set
   explicitly (`launch/multihost.sh`, `launch/cpu_sim.sh`, k8s, ssh): use them.
2. Under SLURM (`SLURM_NTASKS` > 1) or Open MPI (`OMPI_COMM_WORLD_SIZE` > 1): JAX's own cluster
   detection.
3. Otherwise: a single process, nothing to initialise.

On CPU, collectives across processes go through gloo. A process that dies is noticed by the others
through the coordination service's heartbeat (`HEARTBEAT_TIMEOUT_S`, default 30 s), which makes them
exit with an error instead of hanging in a collective.
"""

from __future__ import annotations

import logging
import os

import jax

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
    heartbeat = _int_env("HEARTBEAT_TIMEOUT_S") or 30
    cluster = (_int_env("SLURM_NTASKS") or 1) > 1 or (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1
    if not coordinator and not cluster:
        return
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(heartbeat_timeout_seconds=heartbeat, initialization_timeout=_int_env("INIT_TIMEOUT_S") or 300)
    if coordinator:
        if num is None or pid is None:
            raise SystemExit("error: COORDINATOR_ADDRESS is set but NUM_PROCESSES or PROCESS_ID is not")
        local = os.environ.get("LOCAL_DEVICE_IDS")
        local_ids = [int(i) for i in local.split(",")] if local else None
        jax.distributed.initialize(coordinator, num, pid, local_device_ids=local_ids, **kwargs)
    else:
        jax.distributed.initialize(**kwargs)
    _initialized = True
    logging.getLogger(__name__).info("process %d of %d, %d local / %d global devices", jax.process_index(),
                                     jax.process_count(), jax.local_device_count(), jax.device_count())


def is_main_process() -> bool:
    return jax.process_index() == 0


def log_prefix() -> str:
    """'[p1/2] ' in multi-process runs, '' otherwise: log lines say which process wrote them."""
    return f"[p{jax.process_index()}/{jax.process_count()}] " if jax.process_count() > 1 else ""
