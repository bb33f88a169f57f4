"""How a config becomes a compiled train step: shared by training, the planner and the benchmarks.

`model_options` reads the model's runtime and LoRA spec from the config, `batch_layout` the
gradient-accumulation steps, `master_shapes` the dtype of what trains (float32 master weights and
optimizer state for every trainable leaf, whatever `model.param_dtype` the frozen base is kept in;
the model computes in `model.compute_dtype`), `configured_train_step` the jitted step and
`compile_train_step` compiles it ahead of the first batch and reports its per-device memory
(`device_memory`, the planner's numbers).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from flacuna_jax.attention_splash import SplashBlocks
from flacuna_jax.config import Config, ConfigError
from flacuna_jax.model import LoraSpec, Runtime
from flacuna_jax.step import abstract_batch, make_train_step

MASTER_DTYPE = jnp.float32


def model_options(cfg: Config) -> tuple[Runtime, LoraSpec | None]:
    """(Runtime, LoraSpec or None for finetune=full): how the config runs the model."""
    sp = cfg.model.splash
    runtime = Runtime(jnp.dtype(cfg.model.compute_dtype), jnp.dtype(cfg.model.param_dtype), cfg.model.remat,
                      cfg.model.attention, cfg.model.base_quant, cfg.model.double_quant,
                      SplashBlocks(sp.block_q, sp.block_kv, sp.block_kv_compute, sp.block_q_bwd, sp.block_kv_bwd))
    if cfg.finetune != "lora":
        return runtime, None
    return runtime, LoraSpec(cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, tuple(cfg.lora.targets))


def batch_layout(cfg: Config, mesh: jax.sharding.Mesh) -> int:
    """Accumulation steps: global batch = per_device x (data x fsdp) x accumulation."""
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.train.per_device_batch_size * batch_devices
    if cfg.train.global_batch_size % micro:
        raise ConfigError(f"config key 'train.global_batch_size': {cfg.train.global_batch_size} is not a multiple of "
                          f"per_device_batch_size x data x fsdp = {cfg.train.per_device_batch_size} x {batch_devices}")
    return cfg.train.global_batch_size // micro


def master_shapes(shapes: Any) -> Any:
    """The trainable tree's shapes in the master dtype (float32): a bf16 weight would lose updates
    smaller than its rounding step (bf16(w) - 2e-5 == bf16(w) for most w)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, MASTER_DTYPE, sharding=getattr(s, "sharding", None)),
                        shapes)


def configured_train_step(cfg: Config, model: Any, tx: Any, schedule: Any, mesh: Any, state_sh: Any, frozen_sh: Any,
                          accum: int) -> Any:
    """The jitted train step `cfg` asks for (loss chunking, LoRA dropout)."""
    return make_train_step(model, tx, schedule, mesh, state_sh, frozen_sh, accum=accum, loss_chunk=cfg.train.loss_chunk,
                           dropout=cfg.finetune == "lora" and cfg.lora.dropout > 0)


def _shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of arrays or ShapeDtypeStructs with shardings."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def device_memory(compiled, state, frozen, batch) -> dict[str, int]:
    """Per-device bytes of a compiled train step: its arguments counted from their shard shapes, its
    temporaries from XLA's memory analysis."""
    mem = compiled.memory_analysis()
    use = {"params": _shard_bytes(frozen) + _shard_bytes(state.params), "optimizer": _shard_bytes(state.opt_state),
           "temp": int(mem.temp_size_in_bytes) if mem is not None else 0, "batch": _shard_bytes(batch)}
    return {**use, "total": sum(use.values())}


def compile_train_step(cfg: Config, step: Any, state: Any, frozen: Any, mesh: Any, say: Callable[[str], None]) -> Any:
    """The step compiled before the first batch: its exact per-device memory is reported up front, and
    a batch of another shape, dtype or sharding is an error instead of a silent recompile."""
    t0 = time.perf_counter()
    batch = abstract_batch(cfg.train.global_batch_size, cfg.train.seq_len, mesh)
    compiled = step.lower(state, frozen, batch).compile()
    m = device_memory(compiled, state, frozen, batch)
    gib = lambda n: f"{n / 2**30:.3f} GiB"  # noqa: E731
    say(f"train step compiled in {time.perf_counter() - t0:.1f}s; per-device memory: params {gib(m['params'])} "
        f"(frozen base + trainable), optimizer {gib(m['optimizer'])}, temporaries {gib(m['temp'])}, batch "
        f"{gib(m['batch'])} -> {gib(m['total'])}")
    return compiled
