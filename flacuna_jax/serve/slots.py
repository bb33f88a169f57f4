"""The decode slots on the device: their KV cache and the jitted functions that fill and advance it.

The cache is the model's own layout (`model.init_cache`: k/v [layers, slots, width, kv heads, head
dim], segment ids [slots, width]) with one write index per slot. Functions (compiled once per shape):

- prefill(ids [1, P], length, adapter [1], prefix=None): a prompt right-padded to a bucket P through
  the model into a fresh [1, P] cache, or, with a prefilled `prefix` cache, its rest appended after
  the prefix's real tokens; returns that cache (index: the real length) and the fp32 logits [vocab]
  of its last real token (the output projection applied to that one position only).
- insert(slots, cache [1, w], slot): the prefilled cache copied into a slot's first w columns, the
  rest of its row masked off (segment 0), its index set. The slots are donated: updated in place.
- step(params, slots, tokens, active, adapters, seeds, counters, temperatures, top_ps): one token for
  every slot at its own position, each with its adapter (`model.AdapterBank`) and sampling
  (`generate.sample_rows`, token k drawn with fold_in(key(seed), k)); a free slot computes and is
  ignored, its index unchanged.
- first_tokens(logits, seeds, temperatures, top_ps): a request's choices' first tokens (draw 0).
- resize(slots, rows, width): the same slots in a cache of another shape (the rows and columns in use kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

from flacuna_jax.generate import sample_rows
from flacuna_jax.model import init_cache


@dataclass(frozen=True)
class SlotFunctions:
    prefill: Callable
    insert: Callable
    step: Callable
    first_tokens: Callable
    resize: Callable


def empty_cache(model: Any, slots: int, width: int, sharding: Callable[[str, Any], Any] | None = None) -> dict:
    """Free slots: zeros, every write index 0, placed by `sharding(name, array)` when given."""
    cache = init_cache(model.config, slots, width, model.runtime.compute_dtype) | {"index": jnp.zeros((slots,), jnp.int32)}
    if sharding is not None:
        cache = {k: jax.device_put(v, sharding(k, v)) for k, v in cache.items()}
    return cache


def slot_cache_sharding(mesh: Any) -> Callable[[str, Any], Any]:
    """The slots' cache on a mesh: keys/values split over kv heads like the k/v projections (tensor
    parallel), segment ids and write indices replicated."""
    from flacuna_jax.sharding import named_sharding

    def sharding(name: str, value: Any) -> Any:
        names = ("layers", "batch", "length", "kv_heads", None) if name in ("k", "v") else (None,) * value.ndim
        return named_sharding(mesh, names, value.shape)

    return sharding


def compile_slot_functions(model: Any) -> SlotFunctions:
    """The jitted functions over `model` (one compile per shape: prompt bucket, cache width)."""
    cfg, cd = model.config, model.runtime.compute_dtype

    def adapter_arg(adapter_b):
        return {"adapter_b": adapter_b} if model.bank is not None else {}

    def prefill(params, ids_1r, length, adapter_1, prefix=None):
        r = ids_1r.shape[1]
        seg_1r = (jnp.arange(r) < length).astype(jnp.int32)[None]
        if prefix is None:
            start, cache = jnp.zeros((), jnp.int32), init_cache(cfg, 1, r, cd)
        else:  # the prefix's columns first (its padding is overwritten by the rest), then the rest's
            start = prefix["index"]
            cache = {name: jnp.concatenate([prefix[name], jnp.zeros(prefix[name].shape[:axis + 1] + (r,) + prefix[name].shape[axis + 2:],
                                                                   prefix[name].dtype)], axis=axis + 1)
                     for name, axis in (("k", 1), ("v", 1), ("segment_ids", 0))} | {"index": start}
        positions_1r = (start + jnp.arange(r, dtype=jnp.int32))[None]
        hidden, cache = model.apply({"params": params}, ids_1r, positions_1r, seg_1r, cache=cache, return_hidden=True,
                                    **adapter_arg(adapter_1))
        last_d = jax.lax.dynamic_index_in_dim(hidden[0], length - 1, keepdims=False)
        logits_v = last_d @ model.output_embedding(params).astype(cd)
        cache["index"] = start + length  # the prompt's real length (padding columns are masked off)
        return cache, logits_v.astype(jnp.float32)

    def insert(slots, cache_1w, slot):
        w = cache_1w["segment_ids"].shape[1]
        out = {name: jax.lax.dynamic_update_slice(slots[name], cache_1w[name].astype(slots[name].dtype),
                                                  (0, slot, 0, 0, 0)) for name in ("k", "v")}
        row = jnp.zeros((1, slots["segment_ids"].shape[1]), jnp.int32).at[:, :w].set(cache_1w["segment_ids"])
        out["segment_ids"] = jax.lax.dynamic_update_slice(slots["segment_ids"], row, (slot, 0))
        out["index"] = slots["index"].at[slot].set(cache_1w["index"])
        return out

    def keys(seeds_b, counters_b):
        return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds_b, counters_b)

    def first_tokens(logits_v, seeds_b, temperature_b, top_p_b):
        logits_bv = jnp.broadcast_to(logits_v, (seeds_b.shape[0],) + logits_v.shape)
        return sample_rows(logits_bv, keys(seeds_b, jnp.zeros_like(seeds_b, jnp.int32)), temperature_b, top_p_b)

    def step(params, slots, tokens_b, active_b, adapter_b, seeds_b, counters_b, temperature_b, top_p_b):
        positions_b1 = slots["index"][:, None]
        logits_b1v, cache = model.apply({"params": params}, tokens_b[:, None], positions_b1,
                                        active_b[:, None].astype(jnp.int32), cache=slots, **adapter_arg(adapter_b))
        cache["index"] = jnp.where(active_b, cache["index"], slots["index"])  # a free slot stays where it is
        return cache, sample_rows(logits_b1v[:, 0], keys(seeds_b, counters_b), temperature_b, top_p_b)

    def resize(slots, rows, width):
        out = {}
        for name, row_axis in (("k", 1), ("v", 1), ("segment_ids", 0), ("index", 0)):
            x = slots[name]
            for axis, size in ((row_axis, rows), (row_axis + 1, width)):
                if name == "index" and axis > row_axis:
                    continue
                keep = min(x.shape[axis], size)
                x = jax.lax.slice_in_dim(x, 0, keep, axis=axis)
                if size > keep:
                    pad = [(0, 0)] * x.ndim
                    pad[axis] = (0, size - keep)
                    x = jnp.pad(x, pad)  # new rows are free slots (segment 0), new columns unused
            out[name] = x
        return out

    # the step's cache is not donated: measured slower on CPU (the layer scan writes a new cache anyway)
    return SlotFunctions(prefill=jax.jit(prefill), insert=jax.jit(insert, donate_argnums=0),
                         step=jax.jit(step), first_tokens=jax.jit(first_tokens),
                         resize=jax.jit(resize, static_argnums=(1, 2)))  # resize: the old buffer cannot hold the new shape
