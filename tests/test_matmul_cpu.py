"""matmul_cpu.py: the native projection kernel against float64 and XLA, its packed layout, callers on
several threads, a model that runs it (`unrolled`), where it does not (XLA's instead, said once), and
bad shapes."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flacuna_jax import hf, matmul_cpu, tiny
from flacuna_jax.model import (PROJECTION_GROUPS, AdapterBank, LoraSpec, pack_output, pack_projections,
                               packed_group_name, unrolled, unstack_layers)
from tests.helpers import needs_compiler


def operands(shape_x, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape_x).astype(np.float32)
    w = rng.normal(size=(shape_x[-1], n)).astype(np.float32)
    return x, w


# rows x depth x columns: one row and many, rows past a block of 8, depth past a chunk of 128 and not a
# multiple of the vector width, columns short of a panel, one panel and a ragged last panel; no depth
@pytest.mark.parametrize("shape_x, n", [((1, 5), 1), ((3, 100), 96), ((2, 9, 130), 50), ((300, 70), 17),
                                        ((17, 600), 200), ((4, 0), 7), ((0, 8), 48)])
@needs_compiler
def test_native_product_equals_float64(shape_x, n):
    x, w = operands(shape_x, n)
    assert matmul_cpu.refusal(jnp.float32) is None
    got = np.asarray(jax.jit(matmul_cpu.matmul, static_argnums=2)(x, matmul_cpu.pack(w), n))
    assert got.shape == shape_x[:-1] + (n,)
    want = x.astype(np.float64) @ w.astype(np.float64)
    # fp32 sums of at most 128 products, then of the chunks' sums: a bound on the rounding of either
    bound = (128 + shape_x[-1] // 128 + 2) * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(w))
    assert np.all(np.abs(got - want) <= bound)
    np.testing.assert_allclose(got, np.asarray(jnp.matmul(x, w)), rtol=0, atol=2e-4 * max(1, shape_x[-1]) ** 0.5)


@needs_compiler
def test_a_rows_product_does_not_depend_on_the_batch():
    """The same bits for a row alone and among 37 others: the server's rows do not change each other."""
    x, w = operands((37, 300), 100, seed=1)
    packed = matmul_cpu.pack(w)
    together = np.asarray(matmul_cpu.matmul(jnp.asarray(x), packed, 100))
    for i in (0, 8, 36):
        alone = np.asarray(matmul_cpu.matmul(jnp.asarray(x[i:i + 1]), packed, 100))
        np.testing.assert_array_equal(alone[0], together[i])


def test_packing_round_trips_and_xla_reads_the_packed_layout():
    x, w = operands((5, 70), 100, seed=2)
    packed = matmul_cpu.pack(w)
    assert packed.shape == matmul_cpu.packed_shape(70, 100) == (3, 70, 48)
    assert np.all(np.asarray(packed)[-1, :, 100 - 96:] == 0)  # the last panel's padding
    np.testing.assert_array_equal(np.asarray(matmul_cpu.unpack(packed, 100)), w)
    np.testing.assert_allclose(np.asarray(matmul_cpu.xla_project(jnp.asarray(x), packed, 100)), x @ w, rtol=0, atol=1e-4)


@needs_compiler
def test_kernels_called_from_several_threads_at_once_give_each_its_own_result():
    """The kernels' helpers join whatever job is on the shared board (`csrc/parallel_for.h`): callers
    on four threads at once, their jobs replacing each other there, still get their own products,
    bit for bit the ones of a call alone (short jobs, so helpers linger between them)."""
    import threading

    assert matmul_cpu.refusal(jnp.float32) is None  # built and registered
    product = jax.jit(matmul_cpu.matmul, static_argnums=2)
    cases = [operands((8, 96), 200, seed) for seed in range(4)]
    packed = [(jnp.asarray(x), matmul_cpu.pack(w)) for x, w in cases]
    alone = [np.asarray(product(x, w, 200)) for x, w in packed]
    failures = []

    def call(i):
        for _ in range(50):
            got = np.asarray(product(*packed[i], 200))
            if not np.array_equal(got, alone[i]):
                failures.append(i)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(packed))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads) and failures == []


def tiny_model(tmp_path, **changes):
    config = dataclasses.replace(tiny.PRESETS["gqa"], num_layers=2, **changes)
    return hf.load_pretrained(tiny.write_tiny_model(tmp_path / "model", config, seed=0))


@needs_compiler
@pytest.mark.parametrize("tied", [True, False])
def test_an_unrolled_model_runs_the_kernel_in_every_projection(tmp_path, tied):
    """Packed by `unrolled`: one call per group of projections that read the same input (q/k/v, o,
    gate/up, down: 4 a layer) and one for the output projection's packed copy, tied or not; each group
    unpacks to its kernels; the same logits as the model as loaded, and no call with matmul="xla"."""
    model, params = tiny_model(tmp_path, tie_word_embeddings=tied)
    assert ("lm_head" in params) != tied
    ids = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (3, 11)), jnp.int32)
    want = np.asarray(model.apply({"params": params}, ids))
    plain = unstack_layers(jax.tree.map(jnp.copy, params))["layers_1"]
    for matmul, calls in (("native", 4 * 2 + 1), ("xla", 0)):
        m, p = unrolled(model, jax.tree.map(jnp.copy, params), matmul)
        assert m.runtime.matmul == matmul
        if matmul == "native":
            for block, groups in PROJECTION_GROUPS.items():
                assert sorted(p["layers_1"][block]) == sorted(packed_group_name(names) for names in groups)
                for names in groups:
                    kernels = [plain[block][name]["kernel"] for name in names]
                    packed = p["layers_1"][block][packed_group_name(names)]
                    assert packed.shape == matmul_cpu.group_shape(kernels[0].shape[0], [k.shape[1] for k in kernels])
                    for got, kernel in zip(matmul_cpu.unpack_group(packed, [k.shape[1] for k in kernels]), kernels):
                        np.testing.assert_array_equal(got, kernel)
            assert p["output_packed"].shape == matmul_cpu.packed_shape(model.config.hidden_size, model.config.vocab_size)
            np.testing.assert_array_equal(matmul_cpu.unpack(p["output_packed"], model.config.vocab_size),
                                          model.output_embedding(p))  # a copy: the plain weights stay
        else:
            assert "output_packed" not in p and p["layers_1"]["attn"]["k_proj"]["kernel"].ndim == 2
        forward = jax.jit(lambda p, i, m=m: m.apply({"params": p}, i))
        assert forward.lower(p, ids).as_text().count(matmul_cpu.TARGET) == calls, matmul
        np.testing.assert_allclose(np.asarray(forward(p, ids)), want, rtol=0, atol=2e-5)


@needs_compiler
def test_grouped_projections_keep_each_projections_lora_and_adapter_deltas(tmp_path):
    """A projection in a packed group keeps its own LoRA factors and adapter bank (q_proj and v_proj of
    the q/k/v group; down_proj alone): the packed model's logits equal the unpacked model's, per adapter."""
    model, params = tiny_model(tmp_path)
    plain = jax.tree.map(jnp.copy, params)
    targets = ("q_proj", "v_proj", "down_proj")
    rng = np.random.default_rng(1)
    bank = AdapterBank(count=3, rank=2, targets=targets)
    model = model.clone(lora=LoraSpec(rank=4, alpha=8.0, targets=targets), bank=bank)
    layers = model.config.num_layers

    def deltas(name, fan_in, fan_out):  # random, nonzero: a zero factor would hide a dropped delta
        return {"lora_a": rng.normal(size=(layers, fan_in, 4)).astype(np.float32) * 0.1,
                "lora_b": rng.normal(size=(layers, 4, fan_out)).astype(np.float32) * 0.1,
                "bank_a": rng.normal(size=(layers, 3, fan_in, 2)).astype(np.float32) * 0.1,
                "bank_b": rng.normal(size=(layers, 3, 2, fan_out)).astype(np.float32) * 0.1,
                "bank_scale": np.tile(np.array([0.0, 1.0, 2.0], np.float32), (layers, 1))}
    c = model.config
    params["layers"]["attn"]["q_proj"].update(deltas("q_proj", c.hidden_size, c.num_heads * c.head_dim))
    params["layers"]["attn"]["v_proj"].update(deltas("v_proj", c.hidden_size, c.num_kv_heads * c.head_dim))
    params["layers"]["mlp"]["down_proj"].update(deltas("down_proj", c.intermediate_size, c.hidden_size))
    ids = jnp.asarray(rng.integers(0, c.vocab_size, (3, 9)), jnp.int32)
    adapter_b = jnp.asarray([0, 1, 2], jnp.int32)
    forwards = {}
    for matmul in ("xla", "native"):
        m, p = unrolled(model, jax.tree.map(jnp.copy, params), matmul)
        assert m.runtime.matmul == matmul
        forwards[matmul] = np.asarray(jax.jit(lambda p, i, m=m: m.apply({"params": p}, i, adapter_b=adapter_b))(p, ids))
    assert sorted(p["layers_0"]["attn"]) == ["packed(o_proj)", "packed(q_proj,k_proj,v_proj)", "q_proj", "v_proj"]
    assert sorted(p["layers_0"]["attn"]["q_proj"]) == ["bank_a", "bank_b", "bank_scale", "lora_a", "lora_b"]
    no_deltas = np.asarray(model.clone(lora=None, bank=None).apply({"params": plain}, ids))
    assert np.abs(forwards["xla"] - no_deltas).max() > 1e-2  # the deltas change the logits
    np.testing.assert_allclose(forwards["native"], forwards["xla"], rtol=0, atol=2e-5)


def test_where_the_kernel_cannot_run_the_weights_stay_as_they_are(tmp_path, caplog):
    """bfloat16 weights, weights over several devices, a quantized base: not packed, the reason logged."""
    model, params = tiny_model(tmp_path)
    with caplog.at_level(logging.INFO, logger="flacuna_jax.model"):
        half = model.clone(runtime=dataclasses.replace(model.runtime, compute_dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
        m, p = unrolled(half, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
        assert m.runtime.matmul == "xla" and p["layers_0"]["mlp"]["up_proj"]["kernel"].ndim == 2
        mesh = jax.make_mesh((2,), ("tensor",), devices=jax.devices()[:2])
        spread = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), params)
        m, p = unrolled(model, spread)
        assert m.runtime.matmul == "xla" and p["layers_0"]["mlp"]["up_proj"]["kernel"].ndim == 2
    assert [r.getMessage() for r in caplog.records] == [
        "matmul: the projections stay XLA's: weights bfloat16, compute bfloat16 (the kernel takes float32)",
        "matmul: the projections stay XLA's: the weights span several devices (the kernel runs on one)"]
    quantized = model.clone(runtime=dataclasses.replace(model.runtime, base_quant="int8"))
    assert unrolled(quantized, {"layers": {}})[0].runtime.matmul == "xla"
    with pytest.raises(ValueError, match="matmul 'mkl': not one of native, xla"):
        unrolled(model, params, "mkl")


def test_without_the_kernel_packed_weights_run_xla_and_say_why_once(tmp_path, monkeypatch, caplog):
    model, params = tiny_model(tmp_path)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 7)), jnp.int32)
    want = np.asarray(model.apply({"params": params}, ids))
    m, p = unrolled(model, params, "xla")
    m = m.clone(runtime=dataclasses.replace(m.runtime, matmul="native"))
    p = pack_output(m, pack_projections(p))
    reason = "the csrc/ kernels could not be built: no C++ compiler 'c++' on PATH (set CXX)"
    monkeypatch.setattr(matmul_cpu, "_registration", lambda: reason)
    monkeypatch.setattr(matmul_cpu, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="flacuna_jax.matmul_cpu"):
        forward = jax.jit(lambda p, i: m.apply({"params": p}, i))
        assert matmul_cpu.TARGET not in forward.lower(p, ids).as_text()
        got = np.asarray(forward(p, ids))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    assert [r.getMessage() for r in caplog.records] == [
        f"matmul: XLA's product over packed kernels instead of the native CPU kernel: {reason}"]


@needs_compiler
def test_shapes_that_disagree_are_an_error():
    x, w = operands((2, 10), 100)
    packed = matmul_cpu.pack(w)
    with pytest.raises(Exception, match="matmul: x \\[..., k\\], w \\[ceil\\(n / 48\\), k, 48\\], y \\[..., n\\]"):
        jax.block_until_ready(matmul_cpu.matmul(jnp.asarray(x), packed, 200))  # 3 panels hold at most 144 columns
    with pytest.raises(Exception, match="matmul: x"):
        jax.block_until_ready(matmul_cpu.matmul(jnp.asarray(x[:, :9]), packed, 100))
