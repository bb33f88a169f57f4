"""Splash attention (Pallas, run in interpret mode on CPU) against the XLA reference attention:
packed rows, padding, GQA, lengths that are not a multiple of the block, a KV cache, the mesh.

Relative error: max |a - b| / max |b| over the real (non-padding) query rows; a padding query's
output is not defined by any kernel (attention.py) and its cotangent is zero here, as in training.
"""

import argparse
import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flacuna_jax import attention as A
from flacuna_jax import attention_splash as S
from flacuna_jax import sharding, step
from tests.test_step import make_batch, rel_err, setup, single_mesh

SMALL = S.SplashBlocks(128, 128, 128, 128, 128)


def packed_segments(t=200):
    """Row 0: three examples then padding; row 1: one example filling the row."""
    seg = np.zeros((2, t), np.int32)
    seg[0, :70], seg[0, 70:150], seg[0, 150:190], seg[1] = 1, 2, 3, 1
    return jnp.asarray(seg)


def qkvg(seg, h, k, f=16, dtype=jnp.float32):
    b, t = seg.shape
    keys = jax.random.split(jax.random.key(0), 4)
    q, kk, v = (jax.random.normal(key, (b, t, n, f)).astype(dtype) for key, n in zip(keys, (h, k, k)))
    g = jnp.where((seg != 0)[:, :, None, None], jax.random.normal(keys[3], (b, t, h, f)), 0.0)
    return q, kk, v, g


def out_and_grads(fn, q, k, v, g):
    """[output on the real rows, dq, dk, dv] of sum(fn(q, k, v) * g), as fp32 numpy."""
    real = g.any(axis=(2, 3), keepdims=True)

    def run(q, k, v, g):
        out, pullback = jax.vjp(fn, q, k, v)
        return (jnp.where(real, out, 0), *pullback(g.astype(out.dtype)))

    return [np.asarray(x, np.float32) for x in jax.jit(run)(q, k, v, g)]


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("heads, blocks", [((6, 2), SMALL), ((4, 4), S.SplashBlocks())])
def test_splash_equals_xla_forward_and_gradients_fp32(heads, blocks):
    """Length 200: with 128-blocks a 2x2 grid over the padded 256, with the default 512 one 256-block."""
    seg = packed_segments()
    mask = A.masking(seg)
    q, k, v, g = qkvg(seg, *heads)
    want = out_and_grads(lambda q, k, v: A.xla_attention(q, k, v, mask.dense_bts), q, k, v, g)
    got = out_and_grads(lambda q, k, v: S.splash_attention(q, k, v, mask, blocks), q, k, v, g)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel(a, b) <= 1e-5, name
    assert np.abs(got[0][0, 150:190]).max() > 0  # the third example is computed, not masked away


def test_splash_bf16_is_as_close_to_fp32_as_the_xla_path_in_bf16():
    """bf16 has no exact answer: the tolerance is the XLA path's own bf16 error against fp32 on the same
    (bf16-rounded) inputs, twice over. Splash keeps its scores and P.V in fp32 where the XLA path
    rounds scores to bf16, so it lands near that error (measured: 0.6x-1.3x of it per output); a wrong
    mask, scale or KV head costs O(1)."""
    seg = packed_segments()
    mask = A.masking(seg)
    q, k, v, g = qkvg(seg, 6, 2, dtype=jnp.bfloat16)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    xla = lambda q, k, v: A.xla_attention(q, k, v, mask.dense_bts)  # noqa: E731
    exact = out_and_grads(xla, *up, g)
    xla_bf16 = out_and_grads(xla, q, k, v, g)
    splash_bf16 = out_and_grads(lambda q, k, v: S.splash_attention(q, k, v, mask, SMALL), q, k, v, g)
    for name, s, x, e in zip(("out", "dq", "dk", "dv"), splash_bf16, xla_bf16, exact):
        assert 0 < rel(x, e) < 2e-2, name  # bf16 really is in play, at bf16's scale
        assert rel(s, e) <= 2 * rel(x, e), name


def test_splash_with_a_kv_cache_at_a_traced_write_index():
    """generate's prefill: a prefix already in the cache (left-padded), then queries written at slot
    w; keys after the written slots hold stale values that must not be seen."""
    b, s, t, w, h, k, f = 2, 160, 40, 30, 4, 2, 16
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (b, t, h, f))
    cache_k, cache_v = (jax.random.normal(key, (b, s, k, f)) for key in keys[1:])  # stale everywhere
    prefix = np.zeros((b, s), np.int32)
    prefix[:, 5:w] = 1  # slots 0..4 left padding, 5..29 the prefix
    rows = np.ones((b, t), np.int32)
    rows[1, :7] = 0  # row 1's own part is left-padded
    kv_seg = jax.lax.dynamic_update_slice_in_dim(jnp.asarray(prefix), jnp.asarray(rows), w, axis=1)
    mask = A.masking(jnp.asarray(rows), kv_seg, jnp.asarray(w))
    want = A.xla_attention(q, cache_k, cache_v, mask.dense_bts)
    got = jax.jit(lambda q, k, v, i: S.splash_attention(q, k, v, mask._replace(write_index=i), SMALL))(
        q, cache_k, cache_v, jnp.asarray(w))
    real = (rows != 0)[:, :, None, None]
    assert rel(np.where(real, got, 0), np.where(real, want, 0)) <= 1e-5


@pytest.mark.parametrize("mesh_shape, heads", [((4, 1, 2), (6, 3)), ((2, 2, 2), (4, 2))])
def test_sharded_splash_takes_the_kv_heads_its_query_heads_read(mesh_shape, heads):
    """Tensor parallel over heads: groups straddling devices (6/3 over 2: K/V whole on each device, each
    query head given its KV head there), KV heads sharded with their groups (4/2 over 2). One KV head per
    device (8/2 over 4): the LoRA step test below."""
    mesh = sharding.make_mesh(*mesh_shape)
    seg = jnp.tile(packed_segments(136), (2, 1))
    mask = A.masking(seg)
    q, k, v, g = qkvg(seg, *heads)
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))  # noqa: E731
    q, k, v, g, seg = map(put, (q, k, v, g, seg))

    def sharded(q, k, v):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return S.splash_attention(q, k, v, A.masking(seg))

    want = out_and_grads(lambda q, k, v: A.xla_attention(q, k, v, mask.dense_bts), q, k, v, g)
    for name, a, b in zip(("out", "dq", "dk", "dv"), out_and_grads(sharded, q, k, v, g), want):
        assert rel(a, b) <= 1e-5, name


def test_block_fitting_and_validation():
    assert S.padded_length(200) == 256 and S.padded_length(128) == 128 and S.padded_length(1) == 128
    assert S.fit_block(512, 256) == 256 and S.fit_block(512, 1280) == 256 and S.fit_block(512, 2048) == 512
    assert S.fit_block(384, 1536) == 384 and S.fit_block(128, 1280) == 128
    with pytest.raises(ValueError, match="splash block kv=100: must be a positive multiple of 128"):
        S.SplashBlocks(kv=100)


@pytest.fixture
def warnings_seen(monkeypatch, caplog):
    monkeypatch.setattr(S, "_warned_interpret", False)
    monkeypatch.setattr(A, "_logged_choices", set())
    monkeypatch.setattr(A, "_logged_fallbacks", set())  # another test in this process may have logged it
    caplog.set_level(logging.WARNING)
    return lambda: [r.getMessage() for r in caplog.records if r.name in (A.__name__, S.__name__)]


def test_attend_chooses_the_kernel(warnings_seen, monkeypatch):
    """splash, and auto on a TPU (the backend name simulated), run the splash kernel, except for one
    decoded token (XLA's attention over the cache) and an explicit mask (XLA's, logged once); a shape the kernel refuses is an error with splash and
    XLA's attention, logged once, with auto; interpret mode off a TPU is said once."""
    calls = []
    monkeypatch.setattr(S, "splash_attention", lambda q, k, v, mask, blocks: calls.append(
        (q.shape, mask.write_index is not None, blocks)) or jnp.zeros_like(q))
    seg = packed_segments(12)
    q, k, v, _ = qkvg(seg, 4, 2)
    blocks = S.SplashBlocks(q=256)
    A.attend("splash", q, k, v, A.masking(seg), blocks)
    cached = A.masking(seg, jnp.ones((2, 20), jnp.int32), jnp.asarray(3))
    cache_k, cache_v = (jnp.ones((2, 20, 2, 16)) for _ in range(2))
    A.attend("splash", q, cache_k, cache_v, cached, blocks)  # a prefill into a cache
    assert calls == [((2, 12, 4, 16), False, blocks), ((2, 12, 4, 16), True, blocks)]
    one = A.masking(seg[:, :1], jnp.ones((2, 20), jnp.int32), jnp.asarray(3))
    np.testing.assert_array_equal(A.attend("splash", q[:, :1], cache_k, cache_v, one),
                                  A.xla_attention(q[:, :1], cache_k, cache_v, one.dense_bts))
    assert len(calls) == 2
    explicit = A.explicit_masking(A.masking(seg).dense_bts)  # score.py's shared-context rows: no segment ids
    for _ in range(2):
        np.testing.assert_array_equal(A.attend("splash", q, k, v, explicit), A.xla_attention(q, k, v, explicit.dense_bts))
    assert len(calls) == 2 and sum("an explicit mask" in w for w in warnings_seen()) == 1
    A.attend("auto", q, k, v, A.masking(seg))  # on CPU: XLA's implementation (no cuDNN), logged
    assert len(calls) == 2 and "instead of cuDNN" in warnings_seen()[-1]
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    A.attend("auto", q, k, v, A.masking(seg))
    assert len(calls) == 3

    def refuse(*_):
        raise ValueError("q_block_size=128 should divide q_seq_len=200.\nmore")

    monkeypatch.setattr(S, "splash_attention", refuse)
    with pytest.raises(ValueError, match="should divide"):
        A.attend("splash", q, k, v, A.masking(seg))
    for _ in range(2):
        np.testing.assert_array_equal(A.attend("auto", q, k, v, A.masking(seg)),
                                      A.xla_attention(q, k, v, A.masking(seg).dense_bts))
    assert warnings_seen()[-1] == ("attention: XLA's implementation instead of splash attention: queries (2, 12, 4, 16) "
                                   "float32: q_block_size=128 should divide q_seq_len=200.")
    assert sum("should divide" in w for w in warnings_seen()) == 1
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert S._interpret() and S._interpret()
    assert sum("interpret mode on the cpu backend" in w for w in warnings_seen()) == 1
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert not S._interpret()


@pytest.fixture(scope="module")
def step_reference(tiny_model_dir):
    """The batch and the XLA attention's loss and LoRA gradients on one device."""
    model_dir, batch = tiny_model_dir("gqa"), make_batch(rows=8, seq=24)
    return model_dir, batch, loss_and_lora_grads(single_mesh(), model_dir, batch, "xla")


def loss_and_lora_grads(mesh, model_dir, batch, attention):  # the compiled step's loss and LoRA gradients
    model, frozen, trainable, _, _, p_shard, f_shard = setup(model_dir, mesh)
    model = model.clone(runtime=dataclasses.replace(model.runtime, attention=attention))
    b_sh = {key: sharding.batch_sharding(mesh) for key in step.BATCH_KEYS}
    fn = jax.jit(lambda t, f, b: step.loss_and_grads(model, t, f, b, loss_chunk=8, mesh=mesh)[:2],
                 in_shardings=(p_shard, f_shard, b_sh), out_shardings=(None, p_shard))
    return jax.device_get(fn(trainable, frozen, batch))


@pytest.mark.parametrize("mesh_shape", [None, (2, 1, 4)])
def test_lora_step_with_splash_equals_xla(step_reference, mesh_shape, monkeypatch):
    """One LoRA step's loss and every LoRA gradient, fp32, against XLA's attention on one device: splash
    on one device and on data 2 x tensor 4 (GQA 8/2: each device's two query heads read one KV head)."""
    model_dir, batch, (want_loss, want_grads) = step_reference
    mesh = single_mesh() if mesh_shape is None else sharding.make_mesh(*mesh_shape)
    shapes = []  # what the kernel saw: [rows, heads, padded length, head_dim] on each device
    monkeypatch.setattr(S, "_local", lambda *a, _f=S._local, **kw: shapes.append(a[0].shape) or _f(*a, **kw))
    loss, grads = loss_and_lora_grads(mesh, model_dir, batch, "splash")
    assert set(shapes) == {(8, 8, 128, 8) if mesh_shape is None else (4, 2, 128, 8)}
    assert abs(float(loss) - float(want_loss)) <= 1e-5 * abs(float(want_loss))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
        assert np.abs(b).max() > 0 and rel_err(a, b) <= 1e-5, jax.tree_util.keystr(path)


def test_generate_with_splash_prefill_equals_xla(tiny_model_dir, monkeypatch):
    """The inference tools' --attention splash: generate's prefill of a shared prefix (a cache filled from
    slot 0) and of each row's left-padded rest (written after the prefix: a traced write index) run the
    kernel; the greedy tokens equal the XLA attention's."""
    from flacuna_jax.generate import Generator
    from flacuna_jax.inference import add_model_args, load_from_args

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    rng = np.random.default_rng(3)
    prefix = rng.integers(3, 256, 40).tolist()
    prompts = [prefix + rng.integers(3, 256, n).tolist() for n in (5, 9)]
    tokens, offsets = {}, []
    monkeypatch.setattr(S, "_kernel", lambda *a, _f=S._kernel: offsets.append(a[3]) or _f(*a))
    for attention in ("splash", "xla"):
        model, params = load_from_args(parser.parse_args(["--model", str(tiny_model_dir("gqa")), "--attention", attention]))
        assert model.runtime.attention == attention
        tokens[attention] = Generator(model, params, eos_ids=(), batch_size=2).generate_ids(prompts, 6)
    assert tokens["splash"] == tokens["xla"] and all(len(t) == 6 for t in tokens["xla"])
    # causal offsets: the prefix (48 queries over its own 48 slots); the rests (16 queries over 48 + 16 + 6 slots)
    assert sorted(set(offsets)) == [0, 70]
