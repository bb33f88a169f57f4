"""The decode slots on the device: their KV cache and the jitted functions that fill and advance it.

The cache is the model's own layout (`kv_cache.init_cache`: k [layers, slots, kv heads, head dim,
width], v [layers, slots, kv heads, width, head dim], or one array per layer for an unrolled model;
segment ids [slots, width]) with one write index per slot. Functions (compiled once per shape):

- prefill(ids [1, P], length, adapter [1], prefix=None): a prompt right-padded to a bucket P through
  the model into a fresh [1, P] cache, or, with a prefilled `prefix` cache, its rest appended after
  the prefix's real tokens; returns that cache (index: the real length) and the fp32 logits [vocab]
  of its last real token (the output projection applied to that one position only).
- insert(slots, cache [1, w], slot): the prefilled cache copied into a slot's first w columns, the
  rest of its row masked off (segment 0), its index set. The slots are donated: updated in place.
- step(params, slots, tokens, active, adapters, seeds, counters, temperatures, top_ps): one token for
  every slot at its own position, each with its adapter (`model.AdapterBank`) and sampling
  (`generate.sample_rows`, token k drawn with fold_in(key(seed), k); a step where no slot samples
  settled by the greedy screen where the params have one, `generate.greedy_from_hidden`); a free slot
  computes and is ignored, its index unchanged. The slots are donated.
- first_tokens(logits, seeds, temperatures, top_ps): a request's choices' first tokens (draw 0).
- resize(slots, rows, width): the same slots in a cache of another shape (the rows and columns in use kept).
- take_rows(slots, rows [r]): a cache of r slots, slot j a copy of slot rows[j] (moving busy slots down).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

from flacuna_jax import greedy_cpu
from flacuna_jax.generate import sample_rows, sample_rows_from_hidden
from flacuna_jax.kv_cache import CACHE_AXES, CACHE_LAYOUT, in_place_options, init_cache


@dataclass(frozen=True)
class SlotFunctions:
    prefill: Callable
    insert: Callable
    step: Callable
    first_tokens: Callable
    resize: Callable
    take_rows: Callable


def empty_cache(model: Any, slots: int, width: int, sharding: Callable[[str, Any], Any] | None = None) -> dict:
    """Free slots: zeros, every write index 0, placed by `sharding(name, array)` when given."""
    cache = init_cache(model.config, slots, width, model.runtime.compute_dtype, model.runtime.layers)
    cache["index"] = jnp.zeros((slots,), jnp.int32)
    if sharding is not None:
        cache = {k: jax.tree.map(lambda x, k=k: jax.device_put(x, sharding(k, x)), v) for k, v in cache.items()}
    return cache


def slot_cache_sharding(mesh: Any) -> Callable[[str, Any], Any]:
    """The slots' cache on a mesh: keys/values split over kv heads like the k/v projections (tensor
    parallel), segment ids and write indices replicated."""
    from flacuna_jax.sharding import named_sharding

    def sharding(name: str, value: Any) -> Any:
        if name not in ("k", "v"):
            return named_sharding(mesh, (None,) * value.ndim, value.shape)
        names = tuple(None if axis == "head_dim" else axis for axis in CACHE_LAYOUT[name][-value.ndim:])
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
            start, cache = jnp.zeros((), jnp.int32), init_cache(cfg, 1, r, cd, model.runtime.layers)
        else:  # the prefix's columns first (its padding is overwritten by the rest), then r empty ones
            start = prefix["index"]
            cache = {name: jax.tree.map(lambda x, axis=axis: _pad_axis(x, axis, r), prefix[name])
                     for name, (_, axis) in CACHE_AXES.items()} | {"index": start}
        positions_1r = (start + jnp.arange(r, dtype=jnp.int32))[None]
        hidden, cache = model.apply({"params": params}, ids_1r, positions_1r, seg_1r, cache=cache, return_hidden=True,
                                    **adapter_arg(adapter_1))
        last_d = jax.lax.dynamic_index_in_dim(hidden[0], length - 1, keepdims=False)
        logits_v = last_d @ model.output_embedding(params).astype(cd)
        cache["index"] = start + length  # the prompt's real length (padding columns are masked off)
        return cache, logits_v.astype(jnp.float32)

    def insert(slots, cache_1w, slot):
        w = cache_1w["segment_ids"].shape[1]

        def put(dst, src, batch_axis):  # src's one row at row `slot`, columns 0..
            start = [jnp.zeros((), jnp.int32)] * dst.ndim
            start[batch_axis] = jnp.asarray(slot, jnp.int32)
            return jax.lax.dynamic_update_slice(dst, src.astype(dst.dtype), start)

        out = {name: jax.tree.map(lambda d, s: put(d, s, CACHE_AXES[name][0]), slots[name], cache_1w[name])
               for name in ("k", "v")}
        row = jnp.zeros((1, slots["segment_ids"].shape[1]), jnp.int32).at[:, :w].set(cache_1w["segment_ids"])
        out["segment_ids"] = put(slots["segment_ids"], row, 0)  # the rest of the row masked off
        out["index"] = slots["index"].at[slot].set(cache_1w["index"])
        return out

    def keys(seeds_b, counters_b):
        return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds_b, counters_b)

    def first_tokens(logits_v, seeds_b, temperature_b, top_p_b):
        logits_bv = jnp.broadcast_to(logits_v, (seeds_b.shape[0],) + logits_v.shape)
        return sample_rows(logits_bv, keys(seeds_b, jnp.zeros_like(seeds_b, jnp.int32)), temperature_b, top_p_b)

    def step(params, slots, tokens_b, active_b, adapter_b, seeds_b, counters_b, temperature_b, top_p_b):
        positions_b1 = slots["index"][:, None]
        screened = greedy_cpu.usable(params) is None  # greedy rows settled by the screen (generate.greedy_from_hidden)
        out_b1x, cache = model.apply({"params": params}, tokens_b[:, None], positions_b1,
                                     active_b[:, None].astype(jnp.int32), cache=slots, return_hidden=screened,
                                     **adapter_arg(adapter_b))
        cache["index"] = jnp.where(active_b, cache["index"], slots["index"])  # a free slot stays where it is
        keys_b = keys(seeds_b, counters_b)
        if screened:
            return cache, sample_rows_from_hidden(out_b1x[:, 0], params, model.config.vocab_size, keys_b, temperature_b,
                                                  top_p_b, needed_b=active_b)
        return cache, sample_rows(out_b1x[:, 0], keys_b, temperature_b, top_p_b)

    def resize(slots, rows, width):
        def fit(x, sizes):  # new rows are free slots (segment 0), new columns unused
            for axis, size in sizes:
                keep = min(x.shape[axis], size)
                x = _pad_axis(jax.lax.slice_in_dim(x, 0, keep, axis=axis % x.ndim), axis, size - keep)
            return x

        out = {name: jax.tree.map(lambda x, ax=axes: fit(x, ((ax[0], rows), (ax[1], width))), slots[name])
               for name, axes in CACHE_AXES.items()}
        out["index"] = fit(slots["index"], ((0, rows),))
        return out

    def take_rows(slots, rows_r):
        out = {name: jax.tree.map(lambda x, axis=axes[0]: jnp.take(x, rows_r, axis=axis), slots[name])
               for name, axes in CACHE_AXES.items()}
        out["index"] = slots["index"][rows_r]
        return out

    # the step's cache is donated: with one cache array per layer (the unrolled model) it is updated in
    # place; not donated, every step copies it (SmolLM2 fp32, CPU, 32 slots x 512 columns: 278 vs 377 ms a step)
    in_place = in_place_options()
    return SlotFunctions(prefill=jax.jit(prefill), insert=jax.jit(insert, donate_argnums=0, compiler_options=in_place),
                         step=jax.jit(step, donate_argnums=1, compiler_options=in_place), first_tokens=jax.jit(first_tokens),
                         resize=jax.jit(resize, static_argnums=(1, 2)),  # resize: the old buffer cannot hold the new shape
                         take_rows=jax.jit(take_rows))


def _pad_axis(x: jax.Array, axis: int, extra: int) -> jax.Array:
    """`x` with `extra` zeros appended along `axis`."""
    if extra <= 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad)
