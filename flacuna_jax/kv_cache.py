"""The KV cache that decoding writes and reads: its layout, one write, and a shared prefix in front.

    {"k": [layers, batch, kv heads, head dim, slots], "v": [layers, batch, kv heads, slots, head dim]
     (or a tuple of one array per layer, without the leading axis, for `Runtime(layers="unrolled")`),
     "segment_ids": [batch, slots] (0: empty or padding), "index": the next slot written, one for every
     row (`generate`: prompts are left-padded) or one per row [batch] (the server's decode slots)}

A decode step's attention (`attention.cached_attention`) multiplies each kv head's keys and values
where they lie, with no transpose of the cache and no repeat to the query heads: scores as
[g, head dim] x [head dim, slots], outputs as [g, slots] x [slots, head dim]. The keys are stored
transposed because XLA's CPU dot runs the scores about 2x faster that way than as [g, f] x [s, f]^T
(SmolLM2's shapes, 32 rows x 512 slots: 0.97 vs 1.87 ms a layer, `benchmarks/decode_profile.py`).
`generate` and a serving engine share these functions rather than keeping two layouts.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


# Each cache array's axes by name, the one place the layout is written: `init_cache`, `CACHE_AXES` and
# the serving slots' sharding (`serve/slots.py`) derive from it. "layers" leads only a scanned model's
# cache; an unrolled model's holds one array per layer without it.
CACHE_LAYOUT = {"k": ("layers", "batch", "kv_heads", "head_dim", "length"),
                "v": ("layers", "batch", "kv_heads", "length", "head_dim"),
                "segment_ids": ("batch", "length")}
# (batch axis, slot axis) of each cache array, counted from the end (the same with or without "layers")
CACHE_AXES = {name: (axes.index("batch") - len(axes), axes.index("length") - len(axes)) for name, axes in CACHE_LAYOUT.items()}


def init_cache(config: Any, batch: int, max_len: int, dtype=jnp.float32, layers: str = "scan") -> dict:
    """An empty KV cache (`CACHE_LAYOUT`): "k" [layers, batch, kv heads, head dim, max_len], "v" [layers,
    batch, kv heads, max_len, head dim] (what a decode step's attention reads without a transpose), with
    `layers="unrolled"` (`Runtime.layers`) a tuple of one array per layer without the leading axis;
    "segment_ids" [batch, max_len] (0: empty or padding); "index": the next slot written (one for all rows)."""
    size = {"layers": config.num_layers, "batch": batch, "kv_heads": config.num_kv_heads,
            "head_dim": config.head_dim, "length": max_len}
    shape = {name: tuple(size[axis] for axis in axes) for name, axes in CACHE_LAYOUT.items()}
    if layers == "unrolled":
        kv = {name: tuple(jnp.zeros(shape[name][1:], dtype) for _ in range(config.num_layers)) for name in ("k", "v")}
    else:
        kv = {name: jnp.zeros(shape[name], dtype) for name in ("k", "v")}
    return {**kv, "segment_ids": jnp.zeros(shape["segment_ids"], jnp.int32), "index": jnp.zeros((), jnp.int32)}


def in_place_options() -> dict:
    """`jax.jit` compiler options for a function that writes a KV cache: on CPU, XLA's copy insertion
    with region analysis, which sees that a decode step's cache write can happen in place (without
    it, XLA copies every layer's cache at the step's entry: SmolLM2 fp32, 1 row x 1024 slots, 60 vs
    40 ms a step, `benchmarks/decode_profile.py`). Other backends: none."""
    return {"xla_cpu_copy_insertion_use_region_analysis": True} if jax.default_backend() == "cpu" else {}


def write_slots(buffer: Array, new: Array, index: Array, slot_axis: int) -> Array:
    """`new` written into `buffer` (batch on axis 0) from slot `index` along `slot_axis`: one index for
    every row (a slice update, in place where the buffer can be reused), or one per row [b] (the
    server's decode slots, each at its own length)."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice_in_dim(buffer, new, jnp.asarray(index, jnp.int32), axis=slot_axis)
    return jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=slot_axis - 1))(buffer, new, index)


def write_cache(cache: dict, new: dict, write_index: Array) -> dict:
    """One layer's cache {"k" [b, k, f, s], "v" [b, k, s, f]} with keys/values [b, t, k, f] written at
    slots write_index.. (a scalar, or one index per row: `write_slots`)."""
    k_bkft, v_bktf = new["k"].transpose(0, 2, 3, 1), new["v"].transpose(0, 2, 1, 3)
    return {"k": write_slots(cache["k"], k_bkft.astype(cache["k"].dtype), write_index, 3),
            "v": write_slots(cache["v"], v_bktf.astype(cache["v"].dtype), write_index, 2)}


def prepend_prefix(prefix: dict, cache: dict) -> dict:
    """A cache whose first slots are `prefix`'s (a one-row cache, e.g. a shared prompt prefilled once),
    broadcast to every row of `cache`, followed by `cache`'s slots; its index continues after the prefix."""
    def join(name):
        batch_axis, slot_axis = CACHE_AXES[name]

        def one(p, c):
            shape = list(p.shape)
            shape[batch_axis] = c.shape[batch_axis]
            return jnp.concatenate([jnp.broadcast_to(p, shape), c], axis=slot_axis)
        return jax.tree.map(one, prefix[name], cache[name])

    return {**{name: join(name) for name in CACHE_AXES}, "index": prefix["index"]}
