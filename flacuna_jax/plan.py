"""Ahead-of-time memory planner: compile the train step on abstract shapes, report per-device memory.

    python -m flacuna_jax.plan --config configs/flacuna_13b.yaml --devices 4 [--arch llama_13b] [--chip v5e] [--json]

No weight is allocated: parameters, optimizer state and the batch are `ShapeDtypeStruct`s with
their shardings on a mesh of N devices (fake CPU devices when this machine has fewer), the step is
lowered and compiled, and XLA's memory analysis gives the temporaries. Parameters and optimizer
state are counted exactly from their per-device shard shapes. `--arch` names a `tiny.PRESETS`
shape for when `model.path` is not on this machine. `--chip` (v4, v5e, v5p, v6e, h100, h200, ...)
takes the memory of one chip of that kind for the "fits" verdict (`accelerators.py`, with sources);
`--device-memory` gives it directly.

Planning on fake CPU devices for a GPU/TPU run (`--target accelerator`, the default): XLA:CPU has
no bf16 matmul, so it up-casts every bf16 weight to fp32, and its loop-invariant code motion then
hoists those casts out of the layer scan, materialising an fp32 copy of every layer at once (13B on
4 devices: +13 GiB of "temporaries" no accelerator would allocate). The planner turns that one
pass off; `--target cpu` keeps it, for planning a CPU run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

from flacuna_jax.accelerators import CHIPS


@dataclass(frozen=True)
class Plan:
    devices: int
    mesh: tuple[int, int, int]
    accum: int
    params: int  # bytes per device: frozen base + trainable
    optimizer: int
    temp: int
    batch: int
    total: int
    flops_per_step: float  # model FLOPs (no remat recompute) for one global batch
    compile_s: float

    def to_json(self) -> dict:
        return {"devices": self.devices, "mesh": {"data": self.mesh[0], "fsdp": self.mesh[1], "tensor": self.mesh[2]},
                "accumulation_steps": self.accum,
                "per_device_bytes": {"params": self.params, "optimizer": self.optimizer, "temp": self.temp,
                                     "batch": self.batch, "total": self.total},
                "flops_per_step": self.flops_per_step, "compile_s": round(self.compile_s, 1)}


def plan(cfg, config, devices) -> Plan:
    """Compiles the configured train step for a mesh over `devices` and measures it."""
    import jax

    from flacuna_jax.lora import split_params
    from flacuna_jax.metrics import flops_per_token
    from flacuna_jax.model import Llama, abstract_params
    from flacuna_jax.optim import make_optimizer
    from flacuna_jax.sharding import make_mesh, tree_shardings
    from flacuna_jax.step import abstract_batch
    from flacuna_jax.train_compile import (batch_layout, configured_train_step, device_memory, master_shapes,
                                           model_options)
    from flacuna_jax.train_state import abstract_state, state_shardings

    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices)
    accum = batch_layout(cfg, mesh)
    model = Llama(config, *model_options(cfg))
    shapes, names = abstract_params(model)
    shardings = tree_shardings(mesh, names, shapes)
    trainable_shapes, frozen_shapes = split_params(shapes, cfg.finetune)
    trainable_shapes = master_shapes(trainable_shapes)
    trainable_sh, frozen_sh = split_params(shardings, cfg.finetune)
    tx, schedule = make_optimizer(cfg.optim, total_steps=max(cfg.train.steps or 1000, 1))
    st_sh = state_shardings(mesh, tx, trainable_shapes, trainable_sh)
    state = abstract_state(tx, trainable_shapes, st_sh)
    frozen = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), frozen_shapes, frozen_sh)
    rows = cfg.train.global_batch_size
    batch = abstract_batch(rows, cfg.train.seq_len, mesh)
    step = configured_train_step(cfg, model, tx, schedule, mesh, st_sh, frozen_sh, accum)
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    m = device_memory(compiled, state, frozen, batch)
    flops = flops_per_token(config, cfg.train.seq_len, cfg.finetune) * rows * cfg.train.seq_len
    return Plan(len(devices), tuple(mesh.shape.values()), accum, m["params"], m["optimizer"], m["temp"], m["batch"],
                m["total"], flops, compile_s)


def _gb(n: int) -> str:
    return f"{n / 1e9:7.2f} GB"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flacuna_jax.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training config YAML")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (value parsed as YAML)")
    p.add_argument("--devices", type=int, required=True, help="number of devices in the mesh")
    p.add_argument("--arch", help="a tiny.PRESETS shape (e.g. llama_13b) instead of model.path/config.json")
    memory = p.add_mutually_exclusive_group()
    memory.add_argument("--chip", choices=sorted(CHIPS), help="the accelerator planned for: its memory per chip is the "
                        "fits verdict's limit (TPU v4 32 GB, v5e 16 GB, v5p 95 GB, v6e 32 GB; GPUs as named)")
    memory.add_argument("--device-memory", help="memory of one device, for the fits verdict: 80GB (10^9), 24GiB (2^30) "
                        "(default 80GB)")
    p.add_argument("--target", choices=("accelerator", "cpu"), default="accelerator",
                   help="the run being planned: on a GPU/TPU (default) or on CPU (see above)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    if a.devices <= 0:
        sys.exit("error: --devices must be positive")
    # Fake CPU devices must be requested before JAX starts.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags = f"{flags} --xla_force_host_platform_device_count={a.devices}"
    if a.target == "accelerator" and os.environ["JAX_PLATFORMS"] == "cpu" and "xla_disable_hlo_passes" not in flags:
        flags = f"{flags} --xla_disable_hlo_passes=while-loop-invariant-code-motion"
    os.environ["XLA_FLAGS"] = flags.strip()
    import jax

    from flacuna_jax.config import ConfigError, load_config
    from flacuna_jax.hf import CheckpointError, load_hf_config, parse_size
    from flacuna_jax.tiny import PRESETS

    try:
        cfg = load_config(a.config, a.overrides)
        if a.arch:
            if a.arch not in PRESETS:
                raise ConfigError(f"--arch {a.arch!r}: not one of {', '.join(sorted(PRESETS))}")
            config = PRESETS[a.arch]
        else:
            try:
                config = load_hf_config(cfg.model.path)
            except CheckpointError as e:
                raise ConfigError(f"{e}; pass --arch with one of {', '.join(sorted(PRESETS))} to plan without it") from None
        if len(jax.devices()) < a.devices:
            raise ConfigError(f"--devices {a.devices}: only {len(jax.devices())} devices visible")
        limit = CHIPS[a.chip].memory_bytes if a.chip else parse_size(a.device_memory or "80GB")
        result = plan(cfg, config, jax.devices()[:a.devices])
    except (ConfigError, ValueError) as e:
        sys.exit(f"error: {e}")
    if a.json:
        print(json.dumps({**result.to_json(), "chip": a.chip, "device_memory": limit, "fits": result.total <= limit}))
        return
    d, f, t = result.mesh
    print(f"mesh data={d} fsdp={f} tensor={t}, {result.accum} accumulation step(s), compiled in {result.compile_s:.1f}s")
    print(f"per device:  params {_gb(result.params)}  optimizer {_gb(result.optimizer)}  "
          f"temp {_gb(result.temp)}  total {_gb(result.total)}")
    print(f"model FLOPs per step: {result.flops_per_step:.3e}")
    chip = f" (one {a.chip})" if a.chip else ""
    print(f"{'fits' if result.total <= limit else 'does NOT fit'} in {_gb(limit).strip()} per device{chip}")


if __name__ == "__main__":
    main()
