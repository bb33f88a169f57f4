"""kv_cache.py: the cache layout, a write at the index, and a shared prefix in front of every row."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from flacuna_jax import tiny
from flacuna_jax.kv_cache import init_cache, prepend_prefix, write_cache

CONFIG = dataclasses.replace(tiny.PRESETS["gqa"], num_layers=2)


@pytest.mark.parametrize("layers", ["scan", "unrolled"])
def test_layout_and_a_shared_prefix_in_front(layers):
    c = CONFIG
    cache = init_cache(c, batch=3, max_len=5, layers=layers)
    keys = cache["k"] if layers == "scan" else jnp.stack(cache["k"])
    values = cache["v"] if layers == "scan" else jnp.stack(cache["v"])
    assert keys.shape == (c.num_layers, 3, c.num_kv_heads, c.head_dim, 5)  # keys transposed: slots last
    assert values.shape == (c.num_layers, 3, c.num_kv_heads, 5, c.head_dim)
    prefix = init_cache(c, batch=1, max_len=4, layers=layers)
    mark = lambda x: x + 1  # noqa: E731
    prefix = {**prefix, "k": mark(prefix["k"]) if layers == "scan" else tuple(map(mark, prefix["k"])),
              "segment_ids": prefix["segment_ids"].at[0, 1:].set(1), "index": jnp.int32(4)}
    joined = prepend_prefix(prefix, cache)
    k = joined["k"] if layers == "scan" else jnp.stack(joined["k"])
    assert k.shape == (c.num_layers, 3, c.num_kv_heads, c.head_dim, 9)
    assert np.all(np.asarray(k[..., :4]) == 1) and np.all(np.asarray(k[..., 4:]) == 0)  # every row
    np.testing.assert_array_equal(np.asarray(joined["segment_ids"]), [[0, 1, 1, 1, 0, 0, 0, 0, 0]] * 3)
    assert int(joined["index"]) == 4


def test_a_write_lands_at_the_index():
    c = CONFIG
    one = {"k": jnp.zeros((2, c.num_kv_heads, c.head_dim, 6)), "v": jnp.zeros((2, c.num_kv_heads, 6, c.head_dim))}
    new_btkf = jnp.arange(2 * 2 * c.num_kv_heads * c.head_dim, dtype=jnp.float32).reshape(2, 2, c.num_kv_heads, c.head_dim)
    out = write_cache(one, {"k": new_btkf, "v": -new_btkf}, jnp.int32(3))
    np.testing.assert_array_equal(np.asarray(out["k"][..., 3:5]), np.asarray(new_btkf.transpose(0, 2, 3, 1)))
    np.testing.assert_array_equal(np.asarray(out["v"][:, :, 3:5]), -np.asarray(new_btkf.transpose(0, 2, 1, 3)))
    assert not np.any(np.asarray(out["k"][..., :3])) and not np.any(np.asarray(out["k"][..., 5:]))
    assert not np.any(np.asarray(out["v"][:, :, :3])) and not np.any(np.asarray(out["v"][:, :, 5:]))


def test_a_write_at_one_index_per_row():
    """The server's slots: each row written at its own index (a scalar index would put them in one column)."""
    c = CONFIG
    one = {"k": jnp.zeros((2, c.num_kv_heads, c.head_dim, 6)), "v": jnp.zeros((2, c.num_kv_heads, 6, c.head_dim))}
    new_btkf = 1 + jnp.arange(2 * c.num_kv_heads * c.head_dim, dtype=jnp.float32).reshape(2, 1, c.num_kv_heads, c.head_dim)
    out = write_cache(one, {"k": new_btkf, "v": new_btkf}, jnp.array([1, 4], jnp.int32))
    for row, col in enumerate((1, 4)):
        np.testing.assert_array_equal(np.asarray(out["k"][row, ..., col]), np.asarray(new_btkf[row, 0]))
        np.testing.assert_array_equal(np.asarray(out["v"][row, :, col]), np.asarray(new_btkf[row, 0]))
        assert np.count_nonzero(np.asarray(out["k"][row])) == np.count_nonzero(np.asarray(new_btkf[row]))


def test_unrolled_decoding_with_a_shared_prefix_equals_the_scan(tmp_path):
    """The decoder on the unrolled layout (one cache array per layer), a run's shared prefix prefilled
    once and put in front of every row: the same tokens as the scanned model (a decisive model, so
    that tokens are comparable: tests/test_generate.py)."""
    from flacuna_jax import hf
    from flacuna_jax.generate import MIN_SHARED, Generator
    from flacuna_jax.model import unrolled
    from tests.helpers import CHAR_VOCAB, write_decisive_model

    path = write_decisive_model(tmp_path, dataclasses.replace(CONFIG, vocab_size=CHAR_VOCAB), seed=3)
    model, params = hf.load_pretrained(path)
    umodel, uparams = unrolled(model, dict(params))
    rng = np.random.default_rng(0)
    prefix = rng.integers(3, CHAR_VOCAB, MIN_SHARED + 3).tolist()
    prompts = [prefix + rng.integers(3, CHAR_VOCAB, n).tolist() for n in (2, 7, 4)]
    scan = Generator(model, params, eos_ids=(), batch_size=2)
    unr = Generator(umodel, uparams, eos_ids=(), batch_size=2)
    assert unr.generate_ids(prompts, 6) == scan.generate_ids(prompts, 6)
    assert unr._prefix is not None and isinstance(unr._prefix[1]["k"], tuple)  # the prefix path ran, per layer


@pytest.mark.parametrize("t, index", [(1, [0, 4, 9]), (3, [2, 0, 6]), (2, 5)])
def test_cached_attention_equals_attending_the_written_cache(t, index):
    """A decode step's attention over the cache as it was and this call's keys/values apart (so that XLA
    can write the cache in place; `attention.before_write_masks`): the same outputs as the reference
    kernel over the written cache, whatever the slots at and after the write index held before (stale
    keys of a freed slot here)."""
    from flacuna_jax import attention
    from flacuna_jax.kv_cache import write_slots

    b, s, h, k, f = 3, 12, 4, 2, 8
    rng = np.random.default_rng(t)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    cache = {"k": normal(b, k, f, s), "v": normal(b, k, s, f)}  # every slot holds something
    q_bthf, new = normal(b, t, h, f), {"k": normal(b, t, k, f), "v": normal(b, t, k, f)}
    write_index = jnp.asarray(index, jnp.int32)
    old_segments = jnp.asarray(rng.integers(0, 2, (b, s)), jnp.int32)  # padding (0) among the earlier slots
    segment_ids_bt = jnp.asarray([[1] * t, [1] * t, [0] + [1] * (t - 1)], jnp.int32)  # a padding query too
    mask = attention.masking(segment_ids_bt, write_slots(old_segments, segment_ids_bt, write_index, slot_axis=1),
                             write_index)
    written = write_cache(cache, new, write_index)
    before_bts, new_btt = attention.before_write_masks(mask, s)
    got = attention.cached_attention(q_bthf, cache["k"], cache["v"], before_bts, new["k"], new["v"], new_btt)
    want = attention.xla_attention(q_bthf, written["k"].transpose(0, 3, 1, 2), written["v"].transpose(0, 2, 1, 3),
                                   mask.dense_bts)
    real = np.asarray(segment_ids_bt) > 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=0, atol=2e-6)


@pytest.mark.parametrize("t, index, chunk", [(20, [0, 3, 10], 6), (9, 2, 4), (5, [1, 0, 2], 8)])
def test_a_prefill_in_causal_chunks_equals_attending_the_whole_cache(t, index, chunk):
    """`attention.cached_prefill_attention`: each chunk of queries reads only the slots up to its last
    query's (s - t + end), with the same outputs as `cached_attention` over the whole written cache for
    every real query, whatever the write index (<= s - t) and the stale slots after the prompt."""
    from flacuna_jax import attention
    from flacuna_jax.kv_cache import write_slots

    b, s, h, k, f = 3, 30, 4, 2, 8
    rng = np.random.default_rng(t)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    cache = {"k": normal(b, k, f, s), "v": normal(b, k, s, f)}  # stale keys everywhere
    q_bthf, new = normal(b, t, h, f), {"k": normal(b, t, k, f), "v": normal(b, t, k, f)}
    write_index = jnp.asarray(index, jnp.int32)
    old_segments = jnp.asarray(rng.integers(0, 2, (b, s)), jnp.int32)  # a prefix with padding among it
    segment_ids_bt = jnp.asarray([[1] * t, [0, 0] + [1] * (t - 2), [1] * t], jnp.int32)  # left padding too
    mask = attention.masking(segment_ids_bt, write_slots(old_segments, segment_ids_bt, write_index, slot_axis=1),
                             write_index)
    written = write_cache(cache, new, write_index)
    got = attention.cached_prefill_attention(q_bthf, written["k"], written["v"], mask.dense_bts, chunk=chunk)
    want = attention.cached_attention(q_bthf, written["k"], written["v"], mask.dense_bts)
    real = np.asarray(mask.dense_bts).any(axis=-1)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=0, atol=2e-6)


@pytest.mark.parametrize("rows", [1, 3])
def test_a_decode_step_writes_the_cache_in_place(rows, tmp_path):
    """The compiled decode steps (the server's slot step, `generate`'s loop) hold no copy of a layer's
    cache: reading what the step just wrote, or compiling without `in_place_options`, made XLA's CPU
    compiler copy every layer's keys and values up to four times a step (half a one-row step's time)."""
    import re

    import jax

    from flacuna_jax import hf
    from flacuna_jax.generate import DecodeSpec, make_decoder
    from flacuna_jax.model import unrolled
    from flacuna_jax.serve.slots import compile_slot_functions, empty_cache

    model, params = hf.load_pretrained(tiny.write_tiny_model(tmp_path / "model", CONFIG, seed=0))
    model, params = unrolled(model, dict(params))
    cache = empty_cache(model, rows, 32)
    zeros = np.zeros((rows,), np.int32)
    step = compile_slot_functions(model).step.lower(params, cache, zeros, np.ones((rows,), bool), zeros,
                                                    zeros.astype(np.uint32), zeros, np.zeros((rows,), np.float32),
                                                    np.ones((rows,), np.float32)).compile().as_text()
    ids = np.ones((rows, 16), np.int32)
    loop = make_decoder(model, DecodeSpec(max_new_tokens=16, eos_ids=())).lower(
        params, ids, ids, jax.random.key(0), jnp.float32(0), jnp.float32(1)).compile().as_text()
    shapes = {",".join(map(str, x.shape)) for x in jax.tree.leaves((cache["k"], cache["v"]))}
    cache_copy = re.compile(r"f32\[(" + "|".join(shapes) + r")\]\{[\d,]*\} copy\(")
    for hlo in (step, loop):
        copies = [line for line in hlo.splitlines() if cache_copy.search(line)]
        assert len(hlo) > 1000 and not copies, copies[:2]
