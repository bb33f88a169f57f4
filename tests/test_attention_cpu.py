"""attention_cpu.py: the native decode attention against XLA's `cached_attention`, the slots it reads, its
build, where it runs (a model's decode step, a mesh) and where it does not (XLA's instead, said once)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flacuna_jax import attention, attention_cpu, native, sharding, tiny
from tests.helpers import needs_compiler


def inputs(b, t, h, k, f, s, n, seed=0):
    """Queries, a cache whose rows see different slot ranges (one row: none but its new keys, gaps in
    another), new keys causal among themselves, and which queries are real (the last row's first is padding)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    mask = np.zeros((b, t, s), bool)
    for row in range(b):
        lo, hi = sorted(rng.integers(0, s + 1, 2))
        mask[row, :, lo:hi] = rng.random(hi - lo) > 0.2 if row % 2 else True
    mask[1] = False
    new_mask = np.broadcast_to(np.tril(np.ones((t, n), bool), k=n - t), (b, t, n)).copy()
    real = np.ones((b, t), bool)
    real[-1, 0] = False
    mask[-1, 0], new_mask[-1, 0] = False, False
    return (normal(b, t, h, f), normal(b, k, f, s), normal(b, k, s, f), jnp.asarray(mask), normal(b, n, k, f),
            normal(b, n, k, f), jnp.asarray(new_mask)), real


@needs_compiler
@pytest.mark.parametrize("b, t, h, k, f, s, n", [(4, 1, 6, 2, 16, 37, 1), (3, 3, 4, 4, 8, 20, 3), (5, 1, 9, 3, 64, 130, 1)])
def test_native_decode_attention_equals_xla(b, t, h, k, f, s, n):
    """GQA and MHA, one query or several, head dims 8-64, widths that are not a multiple of the vector width."""
    args, real = inputs(b, t, h, k, f, s, n)
    assert attention_cpu.refusal(args[0], args[1]) is None
    got = jax.jit(attention_cpu.decode_attention)(*args)
    want = attention.cached_attention(*args)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=0, atol=2e-6)


@needs_compiler
def test_slots_no_query_may_see_are_never_read():
    """NaN keys and values outside each row's visible slot range change nothing: the kernel reads only
    the range its row's mask reaches (where XLA's kernel multiplies every slot)."""
    args, real = inputs(4, 1, 6, 2, 16, 40, 1, seed=3)
    q, k_cache, v_cache, mask = args[:4]
    m = np.asarray(mask).any(axis=1)  # [b, s]: a slot any of the row's queries sees
    span = np.zeros_like(m)
    for row in range(m.shape[0]):
        if m[row].any():
            seen = np.flatnonzero(m[row])
            span[row, seen[0]:seen[-1] + 1] = True
    k_poisoned = jnp.where(jnp.asarray(span)[:, None, None, :], k_cache, jnp.nan)  # keys [b, k, f, s]
    v_poisoned = jnp.where(jnp.asarray(span)[:, None, :, None], v_cache, jnp.nan)  # values [b, k, s, f]
    got = attention_cpu.decode_attention(q, k_poisoned, v_poisoned, *args[3:])
    want = attention.cached_attention(*args)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=0, atol=2e-6)


@needs_compiler
def test_a_decode_step_runs_the_native_kernel_unless_told_xla(tmp_path):
    """The slot step of an fp32 model calls the kernel in every layer by default, and never with
    `Runtime.decode_attention="xla"`; both give the same next tokens and logits."""
    import dataclasses

    from flacuna_jax import hf
    from flacuna_jax.model import unrolled
    from flacuna_jax.serve.slots import compile_slot_functions, empty_cache

    config = dataclasses.replace(tiny.PRESETS["gqa"], num_layers=2)
    model, params = unrolled(*hf.load_pretrained(tiny.write_tiny_model(tmp_path / "model", config, seed=0)))
    rows = 3
    zeros = np.zeros((rows,), np.int32)
    step_args = (np.ones((rows,), bool), zeros, zeros.astype(np.uint32), zeros, np.zeros((rows,), np.float32),
                 np.ones((rows,), np.float32))
    outputs = {}
    for kind in ("native", "xla"):
        m = model.clone(runtime=dataclasses.replace(model.runtime, decode_attention=kind))
        fns = compile_slot_functions(m)
        cache = empty_cache(m, rows, 16)
        cache["segment_ids"] = cache["segment_ids"].at[:, :5].set(1)
        cache["index"] = jnp.full((rows,), 5, jnp.int32)
        cache["k"] = tuple(jnp.asarray(np.random.default_rng(i).normal(size=x.shape), x.dtype) for i, x in enumerate(cache["k"]))
        cache["v"] = tuple(jnp.asarray(np.random.default_rng(9 + i).normal(size=x.shape), x.dtype) for i, x in enumerate(cache["v"]))
        ids = np.array([3, 7, 11], np.int32)
        hlo = fns.step.lower(params, cache, ids, *step_args).compile().as_text()
        assert hlo.count(attention_cpu.TARGET) == (config.num_layers if kind == "native" else 0), kind
        outputs[kind] = fns.step(params, cache, ids, *step_args)
    (cache_n, tokens_n), (cache_x, tokens_x) = outputs["native"], outputs["xla"]
    np.testing.assert_array_equal(np.asarray(tokens_n), np.asarray(tokens_x))
    for a, b in zip(jax.tree.leaves(cache_n), jax.tree.leaves(cache_x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("mesh_shape, heads", [((2, 1, 2), (4, 2)), ((2, 1, 2), (6, 3))])
def test_under_a_mesh_rows_and_kv_heads_split(mesh_shape, heads):
    """Inside a mesh context: rows over data, kv heads over tensor where they divide (2 kv heads over 2),
    else whole on every device (3 over 2); the same outputs as unsharded."""
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:4])
    h, k = heads
    args, real = inputs(4, 1, h, k, 16, 24, 1, seed=5)
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))  # noqa: E731

    @jax.jit
    def sharded(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return attention_cpu.decode_attention(*args)

    hlo = sharded.lower(*map(put, args)).as_text()
    manual = next(line for line in hlo.splitlines() if "sdy.manual_computation" in line)  # shard_map's
    assert ('{"tensor"}' in manual) == (k % 2 == 0), manual
    got = sharded(*map(put, args))
    want = attention.cached_attention(*args)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=0, atol=2e-6)


@needs_compiler
def test_the_library_is_built_once_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("FLACUNA_JAX_CACHE", str(tmp_path))
    first = native.build()
    assert first.parent == tmp_path and first.suffix == ".so"
    stamp = first.stat().st_mtime_ns
    assert native.build() == first and first.stat().st_mtime_ns == stamp  # cached, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial file left beside it


def test_a_missing_or_failing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FLACUNA_JAX_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-c\\+\\+' on PATH \\(set CXX\\)"):
        native.build("no-such-c++")
    with pytest.raises(RuntimeError, match="false could not build csrc/"):
        native.build("false")
    hanging = tmp_path / "hanging-c++"
    hanging.write_text("#!/bin/sh\nexec sleep 60\n")  # killed at the timeout, nothing left behind
    hanging.chmod(0o755)
    with pytest.raises(RuntimeError, match="hanging-c\\+\\+ did not finish building csrc/ in 0.5 s"):
        native.build(str(hanging), timeout_s=0.5)
    assert not list(tmp_path.glob("*.so"))


def test_without_the_kernel_decoding_runs_xla_and_says_why_once(monkeypatch, caplog):
    reason = "the csrc/ kernels could not be built: no C++ compiler 'c++' on PATH (set CXX)"
    monkeypatch.setattr(attention_cpu, "_registration", lambda: reason)
    monkeypatch.setattr(attention, "_logged_choices", set())
    args, real = inputs(2, 1, 4, 2, 8, 10, 1)
    with caplog.at_level(logging.WARNING, logger="flacuna_jax.attention"):
        for _ in range(2):
            got = attention.decode_attention("native", *args)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(attention.cached_attention(*args)))
    assert [r.getMessage() for r in caplog.records] == [
        f"attention: XLA's decode attention instead of the native CPU kernel: {reason}"]
    half = [x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in args]
    assert "it takes float32" in attention_cpu.refusal(half[0], half[1])
    with pytest.raises(ValueError, match="decode attention 'cudnn': not one of native, xla"):
        attention.decode_attention("cudnn", *args)


@needs_compiler
def test_shapes_that_disagree_are_an_error_not_a_stray_read():
    args, _ = inputs(2, 1, 4, 2, 8, 10, 1)
    q, k_cache, v_cache, mask = args[:4]
    with pytest.raises(jax.errors.JaxRuntimeError, match="shapes do not agree"):
        jax.block_until_ready(attention_cpu.decode_attention(q, k_cache, v_cache, mask[:, :, :5], *args[4:]))
