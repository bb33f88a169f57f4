"""Training checkpoints with orbax: async, keep-K, atomic; the frozen base is never written.

Layout: `output_dir/checkpoints/<step>/` with five items

    params     the trainable tree (LoRA factors; every weight for finetune=full)
    opt_state  its optimizer state
    misc       step, base RNG key, skipped-update counters
    data       the data-iterator state (JSON, one for the whole job), so the next batch after a resume
               is the same, under any number of processes and devices
    spec       what defines these weights (`run_spec.py`: base model, tokenizer, LoRA shape, data stream)

Orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous step as the latest usable one (temporary leftovers are removed
when the manager next opens the directory). Saves are asynchronous: the arrays are copied to host
before `save` returns, the files are written in the background; `wait()` blocks until done.

`load_trainable(run_dir)` is the export entry point: the trainable tree as numpy arrays plus the
run's `Config` (`config.yaml` with the checkpoint's own spec on top), restored on CPU whatever mesh
trained it.
"""

from __future__ import annotations

import json
import logging
import warnings
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from flacuna_jax.config import Config, load_config
from flacuna_jax.run_spec import spec_overrides
from flacuna_jax.storage import run_path
from flacuna_jax.train_state import TrainState

ITEMS = ("params", "opt_state", "misc", "data", "spec")


class CheckpointNotFound(FileNotFoundError):
    pass


def checkpoint_dir(run_dir: str | os.PathLike) -> Any:
    """`run_dir/checkpoints` as an epath.Path (a local dir or a bucket: storage.py)."""
    return run_path(run_dir) / "checkpoints"


class _Manager(ocp.CheckpointManager):
    """orbax's manager without its own preemption queries. Each save asks JAX's preemption sync point
    with the GLOBAL step (on the saving thread and again from its finalize thread, steps later). JAX keeps
    one counter per process, the last value passed in: those calls would overwrite the step count the
    training loop reports (`preemption.py`), and a notice arriving then would set the agreed step to one
    the loop has already passed, so the run would never stop. orbax only logs the answer; the training
    loop decides when to save."""

    def reached_preemption(self, step: int) -> bool:
        return False


class Checkpointer:
    """Saves and restores `TrainState` + data-iterator state under `run_dir/checkpoints`."""

    def __init__(self, run_dir: str | os.PathLike, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = checkpoint_dir(run_dir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=async_save,
        )
        self.manager = _Manager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: Any, spec: dict | None = None) -> None:
        """Starts an async save of `state` (after `step` completed steps), the iterator state and the
        run's spec."""
        items = state.items()
        extra = {} if spec is None else {"spec": ocp.args.JsonSave(spec)}
        self.manager.save(step, force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(items["params"]),
            opt_state=ocp.args.StandardSave(items["opt_state"]),
            misc=ocp.args.StandardSave(items["misc"]),
            data=ocp.args.JsonSave({"iterator": data_state}),
            **extra,
        ))

    def spec(self, step: int) -> dict | None:
        """The spec stored with checkpoint `step` (None for a checkpoint saved without one)."""
        return stored_spec(self.directory, step)

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, Any]:
        """(state placed like `target`'s ShapeDtypeStructs, data-iterator state) at `step`."""
        items = target.items()
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(items["params"]),
            opt_state=ocp.args.StandardRestore(items["opt_state"]),
            misc=ocp.args.StandardRestore(items["misc"]),
            data=ocp.args.JsonRestore(),
        ))
        state = TrainState.from_items({k: out[k] for k in ("params", "opt_state", "misc")})
        return state, out["data"]["iterator"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def latest_complete_step(run_dir: str | os.PathLike) -> int | None:
    """The latest complete checkpoint's step, read from the directory names alone (orbax renames a
    step's temporary directory to the bare number when it is complete), without opening a manager."""
    d = checkpoint_dir(run_dir)
    steps = [int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir()] if d.is_dir() else []
    return max(steps, default=None)


def stored_spec(ckpt_dir: str | os.PathLike, step: int) -> dict | None:
    path = run_path(ckpt_dir) / str(step) / "spec" / "metadata"
    return json.loads(path.read_text()) if path.is_file() else None


def restore_params_numpy(manager: ocp.CheckpointManager, step: int) -> Any:
    """The `params` item of `step` as host numpy arrays (no devices or mesh needed)."""
    meta = manager.item_metadata(step)["params"]
    tree = meta.tree if hasattr(meta, "tree") else meta
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    with warnings.catch_warnings():  # "sharding info not provided": none is wanted for numpy
        warnings.simplefilter("ignore", UserWarning)
        out = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args)))
    return jax.tree.map(np.asarray, out["params"])


def load_trainable(run_dir: str | os.PathLike, step: int | None = None) -> tuple[int, Any, Config]:
    """(step, trainable params as numpy arrays, the run's Config) from a training run directory.

    `step=None` takes the latest complete checkpoint. The config is `run_dir/config.yaml`, as
    `python -m flacuna_jax.train` wrote it, with the checkpoint's spec (model, tokenizer, LoRA shape)
    on top: what the weights were trained as, whatever a later launch did to config.yaml.
    """
    run_dir = run_path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointNotFound(f"{cfg_path} not found (is {run_dir} a training output_dir?)")
    ckpt_dir = checkpoint_dir(run_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointNotFound(f"{run_dir}: no checkpoints directory")
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # read-only notices about items we deliberately leave
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
                                    item_handlers={"params": ocp.PyTreeCheckpointHandler()})
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise CheckpointNotFound(f"{ckpt_dir}: no complete checkpoint")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CheckpointNotFound(f"{ckpt_dir}: no checkpoint at step {step} (have {steps})")
        spec = stored_spec(ckpt_dir, step)
        cfg = load_config(cfg_path, spec_overrides(spec) if spec else [])
        return int(step), restore_params_numpy(manager, step), cfg
    finally:
        manager.close()
        absl_logger.setLevel(level)
