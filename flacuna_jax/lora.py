"""LoRA as tree surgery: the parameters split into a trainable and a frozen tree.

The model (`model.Linear`) creates `lora_a` [in, r] and `lora_b` [r, out] next to each targeted
kernel, so one parameter tree holds everything. Training never differentiates that whole tree:

    trainable, frozen = split_params(params, "lora")   # LoRA factors | base weights
    loss(merge_params(trainable, frozen))               # recombined at call time, inside jit
    jax.grad(..., argnums=trainable)                    # gradients and optimizer state: LoRA only

so the frozen base has no gradient, no optimizer state and stays in its compute dtype (bf16), while
the factors are fp32. `finetune="full"` makes every weight trainable (no LoRA factors exist then).
`fold_lora` writes W' = W + (alpha/r) A B into the base, the merged model HF loads.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from flacuna_jax.model import Llama, LoraSpec, _lora_a_init, abstract_params
from flacuna_jax.quant import is_quantized

LORA_LEAVES = ("lora_a", "lora_b")


def is_trainable(path: tuple[str, ...], finetune: str) -> bool:
    if finetune == "full":
        return True
    if finetune == "lora":
        return path[-1] in LORA_LEAVES
    raise ValueError(f"finetune must be 'lora' or 'full', got {finetune!r}")


def split_params(params: dict, finetune: str = "lora") -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts; every leaf lands in exactly one of them."""
    flat = traverse_util.flatten_dict(params)
    trainable = {k: v for k, v in flat.items() if is_trainable(k, finetune)}
    frozen = {k: v for k, v in flat.items() if not is_trainable(k, finetune)}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: dict, frozen: dict) -> dict:
    flat = traverse_util.flatten_dict(frozen)
    overlap = flat.keys() & traverse_util.flatten_dict(trainable).keys()
    if overlap:
        raise ValueError(f"parameters in both trees: {sorted('/'.join(k) for k in overlap)[:3]}")
    flat.update(traverse_util.flatten_dict(trainable))
    return traverse_util.unflatten_dict(flat)


def lora_shapes(model: Llama) -> dict:
    """Abstract shapes of the LoRA factors (no allocation)."""
    shapes, _ = abstract_params(model)
    return split_params(shapes, "lora")[0]


def init_lora_params(model: Llama, rng: jax.Array, shardings: Any = None) -> dict:
    """LoRA factors initialised as PEFT does: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0 (fp32)."""
    flat = traverse_util.flatten_dict(lora_shapes(model))
    if not flat:
        raise ValueError("the model has no LoRA factors (is model.lora set, with targets?)")

    def make(rng):
        keys = jax.random.split(rng, len(flat))
        out = {}
        for key, (path, s) in zip(keys, sorted(flat.items())):
            out[path] = _lora_a_init(key, s.shape, s.dtype) if path[-1] == "lora_a" else jnp.zeros(s.shape, s.dtype)
        return traverse_util.unflatten_dict(out)

    return jax.jit(make, out_shardings=shardings)(rng)


def count_params(model: Llama, finetune: str = "lora") -> tuple[int, int]:
    """(trainable, total) parameter counts from abstract shapes."""
    shapes, _ = abstract_params(model)
    flat = traverse_util.flatten_dict(shapes)
    total = sum(math.prod(s.shape) for s in flat.values())
    trainable = sum(math.prod(s.shape) for k, s in flat.items() if is_trainable(k, finetune))
    return trainable, total


def fold_lora(params: dict, lora: LoraSpec) -> dict:
    """Base parameters with every LoRA pair folded in (W' = W + scale * A @ B) and removed."""
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, value in flat.items():
        if path[-1] in LORA_LEAVES:
            continue
        if path[-1] == "kernel" and path[:-1] + ("lora_a",) in flat:
            if is_quantized(value):
                raise ValueError(f"{'/'.join(path)}: a quantized kernel cannot hold the fold exactly; apply the "
                                 f"factors on top of it (model.lora) as inference.py does")
            a, b = flat[path[:-1] + ("lora_a",)], flat[path[:-1] + ("lora_b",)]
            delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32)) * lora.scale
            value = (value.astype(jnp.float32) + delta).astype(value.dtype)
        out[path] = value
    return traverse_util.unflatten_dict(out)
