"""What the benchmark scripts share: the repo root, the child-process environment, JSON lines, the
machine and its load.

Benchmarks that need fresh XLA flags or a separate accelerator client (the planner's fake devices,
the two sides of `mfu`, every benchmark under `run_all`) run as `python -m ...` children; a child
prints one JSON line last, and `run_json` returns it as a dict or raises `BenchError` with the
tail of what the child wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_ASSETS = ROOT.parent / "shared" / "assets"
FAKE_DEVICES_FLAG = "--xla_force_host_platform_device_count"


class BenchError(RuntimeError):
    pass


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child: fake CPU device counts dropped from XLA_FLAGS (the
    child chooses its own devices), other XLA flags kept, no hub access, `extra` added."""
    env = dict(os.environ)
    flags = [f for f in env.pop("XLA_FLAGS", "").split() if not f.startswith(FAKE_DEVICES_FLAG)]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra})
    return env


def last_json_line(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def run_json(args: list[str], env: dict[str, str] | None = None, timeout: float | None = None) -> dict:
    """Runs `python ARGS` in the repo root; its last stdout line that is a JSON object."""
    try:
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env or child_env(), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"timed out after {timeout:.0f} s: python {' '.join(args)}") from None
    result = last_json_line(proc.stdout)
    if proc.returncode != 0 or result is None:
        tail = [line for line in (proc.stderr + "\n" + proc.stdout).splitlines() if line.strip()][-3:]
        raise BenchError(f"exit {proc.returncode}: " + " | ".join(tail or ["no output"]))
    return result


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what `platform` knows."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Load:
    """The machine's load around a measurement: `with Load() as load: ...`, then `load.fields()`.

    A ratio against another program measured while the 1-minute load average exceeds the core count
    is not a measurement of either side (the two compete with other work for the cores, and torch's
    threads lose more than XLA's when starved): it is flagged `"loaded": true`, and run_all reports it
    so instead of met / NOT met.

    The load average does not see work outside this machine, e.g. a neighbour on the host of a
    virtual machine competing for its memory bandwidth, so the memory read rate of one core (numpy,
    a sum over 128 MB) is recorded before and after too: a drop from the machine's usual figure says
    the measurement shared the memory system."""

    def __enter__(self) -> "Load":
        self.before, self.read_before = load_average(), memory_read_gb_per_s()
        return self

    def __exit__(self, *exc) -> None:
        self.after, self.read_after = load_average(), memory_read_gb_per_s()

    @property
    def loaded(self) -> bool:
        return max(self.before[0], self.after[0]) > (os.cpu_count() or 1)

    def fields(self) -> dict:
        return {"cpu_model": cpu_model(), "cpus": os.cpu_count(), "load_before": self.before,
                "load_after": self.after, "loaded": self.loaded,
                "memory_read_gb_per_s": [self.read_before, self.read_after]}


def memory_read_gb_per_s(n_bytes: int = 128 << 20) -> float:
    """One core's read rate: the best of 3 numpy sums over `n_bytes` of float32 (larger than a CPU's caches)."""
    x = np.ones(n_bytes // 4, np.float32)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return round(n_bytes / best / 1e9, 1)


def emit(result: dict) -> dict:
    print(json.dumps(result), flush=True)
    return result


def random_lora_step(model, optim_cfg, *, seed: int = 0, loss_chunk: int = 0, dropout: bool = True):
    """(step, state, frozen, mesh) to train `model`'s LoRA factors on one device, from random weights.

    The weights are drawn on the device straight into their shardings (LoRA A as PEFT does, B = 0),
    so a 7B model is never on the host; the optimizer state exists only for the factors.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from flacuna_jax.lora import split_params
    from flacuna_jax.model import abstract_params
    from flacuna_jax.optim import make_optimizer
    from flacuna_jax.sharding import make_mesh, tree_shardings
    from flacuna_jax.step import make_train_step
    from flacuna_jax.train_state import init_train_state, state_shardings

    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    shapes, names = abstract_params(model)
    shardings = tree_shardings(mesh, names, shapes)
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, 8), jnp.int32))["params"]),
                     out_shardings=shardings)(jax.random.key(0))
    trainable, frozen = split_params(params, "lora")
    del params
    trainable_sh, frozen_sh = split_params(shardings, "lora")
    tx, schedule = make_optimizer(optim_cfg, 1000)
    st_sh = state_shardings(mesh, tx, jax.eval_shape(lambda: trainable), trainable_sh)
    state = jax.jit(lambda p: init_train_state(p, tx, seed), out_shardings=st_sh, donate_argnums=(0,))(trainable)
    step = make_train_step(model, tx, schedule, mesh, st_sh, frozen_sh, accum=1, loss_chunk=loss_chunk,
                           dropout=dropout)
    return step, state, frozen, mesh


def all_trained_batch(ids, mesh) -> dict:
    """The train step's batch from ids [b, t + 1] (one sequence per row, every token trained), on `mesh`."""
    import jax
    import numpy as np

    from flacuna_jax.sharding import batch_sharding
    from flacuna_jax.step import BATCH_KEYS

    b, t = ids.shape[0], ids.shape[1] - 1
    host = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((b, t), np.float32),
            "segment_ids": np.ones((b, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))}
    return {k: jax.device_put(host[k], batch_sharding(mesh)) for k in BATCH_KEYS}


def best_seconds(fn, args: tuple, repeats: int) -> float:
    """The fastest of `repeats` timed calls of jitted `fn(*args)`, after one call that compiles and warms up."""
    import time

    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)
