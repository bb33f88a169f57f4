"""The LoRA adapters a server is started with, stacked into one `model.AdapterBank` on a frozen base.

Each adapter comes from a PEFT adapter dir (`--adapter NAME=DIR`) or a training run's latest
checkpoint (`--run NAME=DIR`); nothing else is ever opened (a request only names an adapter that
was loaded here). For every projection any adapter targets, the factors are stacked as

    bank_a [layers, n + 1, in, R]   bank_b [layers, n + 1, R, out]   bank_scale [layers, n + 1]

with index 0 the all-zero adapter (the base), adapter i at index i, R the largest rank (a smaller
rank's extra columns are zero) and scale alpha / r of each adapter (0 where it does not target the
projection). A row's delta is then exactly its own adapter's: zero columns add nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flacuna_jax.config import LORA_TARGETS
from flacuna_jax.model import AdapterBank, LlamaConfig, LoraSpec

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class AdapterLoadError(ValueError):
    pass


@dataclass(frozen=True)
class Adapter:
    """One served adapter: its model id, LoRA shape and factors (our tree: layers/attn|mlp/target/lora_a|lora_b)."""

    name: str
    spec: LoraSpec
    factors: dict
    source: str


def parse_named(values: Sequence[str], flag: str) -> list[tuple[str, str]]:
    """["NAME=DIR", ...] -> [(NAME, DIR), ...], each name a valid model id."""
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not path:
            raise AdapterLoadError(f"{flag} {v!r}: expected NAME=DIR")
        if not NAME.match(name):
            raise AdapterLoadError(f"{flag} {v!r}: the name must be letters, digits, '.', '_', ':' or '-' (at most 128)")
        out.append((name, path))
    return out


def load_adapter_dir(name: str, path: str, config: LlamaConfig) -> Adapter:
    from flacuna_jax.peft_io import load_adapter

    spec, tree = load_adapter(path, config)
    return Adapter(name, spec, tree, f"adapter {path}")


def load_run(name: str, path: str) -> Adapter:
    from flacuna_jax.checkpoint import load_trainable

    step, trainable, cfg = load_trainable(path)
    if cfg.finetune != "lora":
        raise AdapterLoadError(f"--run {name}={path}: a {cfg.finetune} fine-tune replaces the base's weights; export it "
                               f"(python -m flacuna_jax.convert export --format merged) and serve that as --model")
    spec = LoraSpec(cfg.lora.rank, cfg.lora.alpha, 0.0, tuple(cfg.lora.targets))
    return Adapter(name, spec, jax.tree.map(np.asarray, trainable), f"run {path} step {step}")


def load_adapters(adapter_args: Sequence[str], run_args: Sequence[str], config: LlamaConfig,
                  base_name: str) -> list[Adapter]:
    """Every `--adapter NAME=DIR` and `--run NAME=DIR`, in that order; names unique and not the base's."""
    named = [("--adapter", n, p) for n, p in parse_named(adapter_args, "--adapter")]
    named += [("--run", n, p) for n, p in parse_named(run_args, "--run")]
    seen = {base_name}
    adapters = []
    for flag, name, path in named:
        if name in seen:
            raise AdapterLoadError(f"{flag} {name}={path}: the model id {name!r} is already taken")
        seen.add(name)
        if not Path(path).is_dir():
            raise AdapterLoadError(f"{flag} {name}={path}: not a directory")
        adapters.append(load_adapter_dir(name, path, config) if flag == "--adapter" else load_run(name, path))
    return adapters


def _factors(tree: dict, target: str) -> dict | None:
    from flacuna_jax.peft_io import lora_path

    node: Any = tree
    for key in lora_path(target):
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return None
    return node


def build_bank(adapters: Sequence[Adapter], config: LlamaConfig) -> tuple[AdapterBank, dict]:
    """(AdapterBank, its parameters as a tree to merge with the base's) for these adapters."""
    from flacuna_jax.peft_io import factor_shapes, lora_path

    if not adapters:
        raise AdapterLoadError("no adapters to stack")
    targets = tuple(t for t in LORA_TARGETS if any(t in a.spec.targets for a in adapters))
    rank = max(a.spec.rank for a in adapters)
    n = len(adapters) + 1
    tree: dict = {}
    for target in targets:
        (layers, d_in, _), (_, _, d_out) = factor_shapes(config, target, rank)
        bank_a = np.zeros((layers, n, d_in, rank), np.float32)
        bank_b = np.zeros((layers, n, rank, d_out), np.float32)
        scale = np.zeros((layers, n), np.float32)
        for i, adapter in enumerate(adapters, start=1):
            node = _factors(adapter.factors, target) if target in adapter.spec.targets else None
            if node is None:
                continue
            a, b, r = np.asarray(node["lora_a"]), np.asarray(node["lora_b"]), adapter.spec.rank
            if a.shape != (layers, d_in, r) or b.shape != (layers, r, d_out):
                raise AdapterLoadError(f"{adapter.name} ({adapter.source}): {target} factors {a.shape} / {b.shape} do not fit "
                                       f"this model ({layers} layers, {d_in} -> {d_out}, rank {r})")
            bank_a[:, i, :, :r], bank_b[:, i, :r, :], scale[:, i] = a, b, adapter.spec.scale
        node = tree
        for key in lora_path(target):
            node = node.setdefault(key, {})
        node.update(bank_a=bank_a, bank_b=bank_b, bank_scale=scale)
    return AdapterBank(n, rank, targets), tree


def place_bank(model: Any, bank_tree: dict, mesh: Any = None) -> dict:
    """The bank's arrays on the devices: sharded like the kernels they sit beside on a mesh, else on the default device."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, bank_tree)
    from flax import traverse_util

    from flacuna_jax.model import abstract_params
    from flacuna_jax.sharding import named_sharding

    names = traverse_util.flatten_dict(abstract_params(model)[1])  # logical-name tuples are leaves (not dicts)
    flat = traverse_util.flatten_dict(bank_tree)
    return traverse_util.unflatten_dict({k: jax.device_put(v, named_sharding(mesh, names[k], v.shape))
                                         for k, v in flat.items()})
