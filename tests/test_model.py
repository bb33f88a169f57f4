"""The Flax LLaMA against transformers' LlamaForCausalLM, layer by layer and end to end (fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks.parity import logit_delta
from flacuna_jax import hf
from flacuna_jax.model import (Attention, Mlp, RMSNorm, Runtime, apply_rope, init_cache, rope_inv_freq)
from tests.helpers import hf_logits, hf_reference, needs_compiler

LOGIT_TOL = 1e-4  # max |delta logits|, fp32
LAYER_TOL = 1e-5  # max |delta| of one layer's output, fp32


def _ids(vocab, shape, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


@pytest.mark.parametrize("preset", ["mha", "gqa", "llama3", "linear_rope", "tied", "odd"])
def test_logits_match_transformers(tiny_model_dir, preset):
    """The measurement `python -m benchmarks.parity` prints."""
    path = tiny_model_dir(preset)
    assert logit_delta(path, _ids(hf.load_hf_config(path).vocab_size, (2, 45))) <= LOGIT_TOL


def _layer0(params):
    return jax.tree.map(lambda x: x[0], params["layers"])


def test_rmsnorm_matches(tiny_model_dir):
    path = tiny_model_dir("odd")
    model, params = hf.load_pretrained(path)
    ref = hf_reference(path).model.layers[0].input_layernorm
    x = np.random.default_rng(0).standard_normal((2, 5, model.config.hidden_size)).astype(np.float32) * 3
    ours = RMSNorm(model.config.rms_norm_eps, Runtime()).apply({"params": _layer0(params)["input_norm"]}, x)
    with torch.no_grad():
        theirs = ref(torch.from_numpy(x)).numpy()
    assert np.abs(np.asarray(ours) - theirs).max() <= LAYER_TOL


@pytest.mark.parametrize("preset", ["mha", "llama3", "linear_rope"])
def test_rope_matches(tiny_model_dir, preset):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    path = tiny_model_dir(preset)
    model, _ = hf.load_pretrained(path)
    c = model.config
    rotary = hf_reference(path).model.rotary_emb
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 7, c.num_heads, c.head_dim)).astype(np.float32)
    k = rng.standard_normal((2, 7, c.num_kv_heads, c.head_dim)).astype(np.float32)
    pos = np.stack([np.arange(7), np.arange(100, 107)]).astype(np.int32)
    with torch.no_grad():
        cos, sin = rotary(torch.from_numpy(q), torch.from_numpy(pos).long())
        tq, tk = apply_rotary_pos_emb(torch.from_numpy(q).transpose(1, 2), torch.from_numpy(k).transpose(1, 2), cos, sin)
    inv = rope_inv_freq(c)
    assert np.abs(np.asarray(apply_rope(q, pos, inv)) - tq.transpose(1, 2).numpy()).max() <= LAYER_TOL
    assert np.abs(np.asarray(apply_rope(k, pos, inv)) - tk.transpose(1, 2).numpy()).max() <= LAYER_TOL


@pytest.mark.parametrize("preset", ["mha", "gqa"])
def test_attention_matches(tiny_model_dir, preset):
    from flacuna_jax.attention import masking

    path = tiny_model_dir(preset)
    model, params = hf.load_pretrained(path)
    c = model.config
    ref = hf_reference(path).model
    x = np.random.default_rng(0).standard_normal((2, 9, c.hidden_size)).astype(np.float32)
    pos = np.broadcast_to(np.arange(9, dtype=np.int32), (2, 9))
    seg = np.ones((2, 9), np.int32)
    ours, _ = Attention(c, Runtime()).apply({"params": _layer0(params)["attn"]}, x, pos, masking(seg))
    with torch.no_grad():
        tx = torch.from_numpy(x)
        pe = ref.rotary_emb(tx, torch.from_numpy(pos.copy()).long())
        causal = torch.full((9, 9), float("-inf")).triu(1)[None, None].expand(2, 1, 9, 9)
        theirs, _ = ref.layers[0].self_attn(tx, position_embeddings=pe, attention_mask=causal)
    assert np.abs(np.asarray(ours) - theirs.numpy()).max() <= LAYER_TOL


def test_mlp_matches(tiny_model_dir):
    path = tiny_model_dir("odd")
    model, params = hf.load_pretrained(path)
    ref = hf_reference(path).model.layers[0].mlp
    x = np.random.default_rng(0).standard_normal((2, 5, model.config.hidden_size)).astype(np.float32)
    ours = Mlp(model.config, Runtime()).apply({"params": _layer0(params)["mlp"]}, x)
    with torch.no_grad():
        theirs = ref(torch.from_numpy(x)).numpy()
    assert np.abs(np.asarray(ours) - theirs).max() <= LAYER_TOL


def test_packed_segments_equal_separate_runs(tiny_model_dir):
    model, params = hf.load_pretrained(tiny_model_dir("gqa"))
    a, b = _ids(model.config.vocab_size, (1, 11), 1), _ids(model.config.vocab_size, (1, 6), 2)
    width = 20  # 11 + 6 tokens, 3 padding
    packed = np.zeros((1, width), np.int32)
    packed[0, :11], packed[0, 11:17] = a[0], b[0]
    seg = np.array([[1] * 11 + [2] * 6 + [0] * 3], np.int32)
    pos = np.array([list(range(11)) + list(range(6)) + [0] * 3], np.int32)
    out = np.asarray(model.apply({"params": params}, packed, pos, seg))
    alone_a = np.asarray(model.apply({"params": params}, a))
    alone_b = np.asarray(model.apply({"params": params}, b))
    assert np.abs(out[:, :11] - alone_a).max() <= LOGIT_TOL
    assert np.abs(out[:, 11:17] - alone_b).max() <= LOGIT_TOL


@pytest.mark.parametrize("attention", ["xla", "dot_product"])
def test_kv_cache_decoding_equals_full_forward(tiny_model_dir, attention):
    model, params = hf.load_pretrained(tiny_model_dir("gqa"))
    model = model.clone(runtime=Runtime(attention=attention))
    ids = _ids(model.config.vocab_size, (2, 12))
    full = np.asarray(model.apply({"params": params}, ids))
    cache = init_cache(model.config, batch=2, max_len=16)
    step = jax.jit(lambda p, x, pos, c: model.apply({"params": p}, x, pos, jnp.ones_like(x), cache=c))
    logits, cache = step(params, ids[:, :5], np.broadcast_to(np.arange(5, dtype=np.int32), (2, 5)), cache)  # prefill
    got = [np.asarray(logits)]
    for t in range(5, 12):  # then one token at a time
        logits, cache = step(params, ids[:, t:t + 1], np.full((2, 1), t, np.int32), cache)
        got.append(np.asarray(logits))
    assert int(cache["index"]) == 12
    assert np.abs(np.concatenate(got, axis=1) - full).max() <= LOGIT_TOL


def test_dot_product_attention_equals_xla(tiny_model_dir):
    model, params = hf.load_pretrained(tiny_model_dir("gqa"))
    ids = _ids(model.config.vocab_size, (2, 10))
    seg = np.array([[1] * 6 + [2] * 4, [1] * 8 + [0] * 2], np.int32)
    pos = np.array([list(range(6)) + list(range(4)), list(range(8)) + [0, 0]], np.int32)
    xla = np.asarray(model.apply({"params": params}, ids, pos, seg))
    fused = np.asarray(model.clone(runtime=Runtime(attention="dot_product")).apply({"params": params}, ids, pos, seg))
    real = seg > 0
    assert np.abs(xla - fused)[real].max() <= LOGIT_TOL


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_keeps_values_and_gradients(tiny_model_dir, remat):
    model, params = hf.load_pretrained(tiny_model_dir("mha"))
    ids = _ids(model.config.vocab_size, (2, 8))

    def loss(p, m):
        return jnp.mean(m.apply({"params": p}, ids) ** 2)

    g_plain = jax.grad(loss)(params, model)
    g_remat = jax.grad(loss)(params, model.clone(runtime=Runtime(remat=remat)))
    for x, y in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def test_bf16_compute_close_to_fp32(tiny_model_dir):
    """bf16 weights and compute: logits within 5% of the fp32 logits' range, same argmax mostly."""
    path = tiny_model_dir("gqa")
    model, params32 = hf.load_pretrained(path)
    model16, params16 = hf.load_pretrained(path, Runtime(compute_dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params16))
    ids = _ids(model.config.vocab_size, (2, 32))
    l32 = np.asarray(jax.jit(model.apply)({"params": params32}, ids))
    l16 = np.asarray(jax.jit(model16.apply)({"params": params16}, ids)).astype(np.float32)  # jitted: eager bf16 is slow
    assert np.isfinite(l16).all()
    assert np.abs(l16 - l32).max() <= 0.05 * np.abs(l32).max()
    assert (l16.argmax(-1) == l32.argmax(-1)).mean() >= 0.9


def _dot_generals(jaxpr):
    """(operand dtypes, rhs shape) of every dot_general in a jaxpr, nested ones (scan, remat, custom vjp) included."""
    from jax._src import core

    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append((tuple(jnp.dtype(v.aval.dtype) for v in eqn.invars), tuple(eqn.invars[1].aval.shape)))
        for sub in core.jaxprs_in_params(eqn.params):
            found += _dot_generals(sub)
    return found


@pytest.mark.parametrize("compute, stored", [(jnp.bfloat16, jnp.float32), (jnp.float32, jnp.bfloat16)])
def test_every_matmul_runs_in_compute_dtype(tiny_model_dir, compute, stored):
    """The traced forward (what XLA compiles) with LoRA on q_proj and v_proj (fp32 factors, as
    training keeps them): every dot_general, projections, LoRA factors, attention and lm_head, takes
    both operands in model.compute_dtype, whatever dtype the weights are stored in."""
    from flacuna_jax.model import Llama, LoraSpec, abstract_params

    model = Llama(hf.load_hf_config(tiny_model_dir("gqa")), Runtime(compute_dtype=compute, param_dtype=stored),
                  LoraSpec(rank=2, alpha=4.0, targets=("q_proj", "v_proj")))
    shapes, _ = abstract_params(model)
    shapes = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.ShapeDtypeStruct(x.shape, jnp.float32 if "lora" in str(path[-1]) else x.dtype), shapes)
    assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(stored), jnp.dtype(jnp.float32)}
    traced = jax.make_jaxpr(lambda p: model.apply({"params": p}, np.zeros((2, 8), np.int32)))(shapes)
    dots = _dot_generals(traced.jaxpr)
    # 7 projections + 2 x 2 LoRA factors + q.k and p.v + lm_head
    assert len(dots) == 7 + 4 + 2 + 1
    assert [d for d in dots if d[0] != (jnp.dtype(compute),) * 2] == []
    assert traced.out_avals[0].dtype == jnp.dtype(compute)


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_gradient_equals_autodiff(kv_heads):
    """xla_attention's custom gradient (probabilities recomputed from the saved row max and sum)
    against autodiff through the plain softmax, with packed segments and padding rows."""
    from flacuna_jax.attention import attention_mask, xla_attention

    def reference(q, k, v, mask):
        k, v = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2), jnp.repeat(v, q.shape[2] // v.shape[2], axis=2)
        s = jnp.einsum("bthf,bshf->bhts", q, k) * (q.shape[-1] ** -0.5)
        p = jax.nn.softmax(jnp.where(mask[:, None], s, jnp.finfo(jnp.float32).min), axis=-1)
        return jnp.einsum("bhts,bshf->bthf", p, v)

    rng = np.random.default_rng(0)
    seg = np.array([[1] * 5 + [2] * 5 + [0] * 2, [1] * 12], np.int32)
    mask = attention_mask(seg, np.broadcast_to(np.arange(12), (2, 12)), seg)
    q = rng.standard_normal((2, 12, 4, 8)).astype(np.float32)
    k, v = (rng.standard_normal((2, 12, kv_heads, 8)).astype(np.float32) for _ in range(2))
    w = rng.standard_normal((2, 12, 4, 8)).astype(np.float32)
    ours = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(xla_attention(*a, mask) * w), (0, 1, 2)))(q, k, v)
    theirs = jax.value_and_grad(lambda *a: jnp.sum(reference(*a, mask) * w), (0, 1, 2))(q, k, v)
    np.testing.assert_array_equal(jax.jit(xla_attention)(q, k, v, mask), jax.jit(reference)(q, k, v, mask))
    assert _rel_err(ours[0], theirs[0]) <= 1e-6
    for a, b in zip(ours[1], theirs[1]):
        assert np.abs(b).max() > 0 and _rel_err(a, b) <= 1e-5


def test_swiglu_gradient_equals_autodiff():
    from flacuna_jax.model import swiglu

    rng = np.random.default_rng(0)
    gate, up, w = (rng.standard_normal((3, 7, 16)).astype(np.float32) * 3 for _ in range(3))
    ours = jax.grad(lambda g, u: jnp.sum(swiglu(g, u) * w), (0, 1))(gate, up)
    theirs = jax.grad(lambda g, u: jnp.sum(jax.nn.silu(g) * u * w), (0, 1))(gate, up)
    np.testing.assert_array_equal(swiglu(gate, up), jax.nn.silu(gate) * up)
    for a, b in zip(ours, theirs):
        assert _rel_err(a, b) <= 1e-6


def _unrolled(model, params, matmul="native"):
    from flacuna_jax.model import unrolled

    return unrolled(model, dict(params), matmul)  # a shallow copy: `unrolled` consumes the stacked tree it is given


@pytest.mark.parametrize("preset, matmul", [("gqa", "xla"), ("tied", "xla"), pytest.param("gqa", "native", marks=needs_compiler)])
def test_unrolled_layers_equal_the_scan_and_transformers(tiny_model_dir, preset, matmul):
    """Runtime(layers="unrolled"): one module and one weight buffer per layer, for decoding (with XLA's
    projections, or packed for the native kernel); the same logits as the scan and as transformers, and
    a KV cache decode written in place equal to the full forward. unstack_layers / stack_layers
    round-trip exactly."""
    from flacuna_jax.model import stack_layers

    path = tiny_model_dir(preset)
    model, params = hf.load_pretrained(path)
    umodel, uparams = _unrolled(model, params, matmul)
    assert umodel.runtime.layers == "unrolled" and "layers" not in uparams
    assert sorted(k for k in uparams if k.startswith("layers_")) == [f"layers_{i}" for i in range(model.config.num_layers)]
    if matmul == "xla":
        assert jax.tree.all(jax.tree.map(np.array_equal, stack_layers(uparams), params))
    else:
        assert umodel.runtime.matmul == "native" and uparams["layers_0"]["mlp"]["packed(gate_proj,up_proj)"].ndim == 3
    ids = _ids(model.config.vocab_size, (2, 12))
    full = np.asarray(jax.jit(umodel.apply)({"params": uparams}, ids))
    assert np.abs(full - np.asarray(jax.jit(model.apply)({"params": params}, ids))).max() <= LOGIT_TOL
    assert np.abs(full - hf_logits(hf_reference(path), ids)).max() <= LOGIT_TOL
    with pytest.raises(ValueError, match="one array per layer"):
        umodel.apply({"params": uparams}, ids[:, :2], cache=init_cache(model.config, batch=2, max_len=16))
    cache = init_cache(model.config, batch=2, max_len=16, layers="unrolled")
    step = jax.jit(lambda p, x, pos, c: umodel.apply({"params": p}, x, pos, jnp.ones_like(x), cache=c))
    logits, cache = step(uparams, ids[:, :5], np.broadcast_to(np.arange(5, dtype=np.int32), (2, 5)), cache)
    got = [np.asarray(logits)]
    for t in range(5, 12):
        logits, cache = step(uparams, ids[:, t:t + 1], np.full((2, 1), t, np.int32), cache)
        got.append(np.asarray(logits))
    assert int(cache["index"]) == 12 and len(cache["k"]) == model.config.num_layers
    assert np.abs(np.concatenate(got, axis=1) - full).max() <= LOGIT_TOL


def test_unrolled_keeps_a_quantized_base_scanned(tiny_model_dir):
    """A quantized kernel is dequantized into a new buffer inside its matmul either way: no layout change."""
    from flacuna_jax.model import unrolled

    model, params = hf.load_pretrained(tiny_model_dir("mha"), Runtime(base_quant="int8"))
    same_model, same = unrolled(model, params)
    assert same_model is model and same is params and "layers" in same


def test_logits_at_and_an_explicit_mask(tiny_model_dir):
    """logits_at_bm returns exactly the logits of those positions; mask_bts replaces the causal +
    segment mask: a context with two continuations that each see the context and themselves gives
    each continuation the logits it has after the context alone."""
    model, params = hf.load_pretrained(tiny_model_dir("gqa"))
    v = model.config.vocab_size
    apply = jax.jit(lambda ids, pos=None, mask=None, at=None: model.apply({"params": params}, ids, pos, mask_bts=mask,
                                                                          logits_at_bm=at))
    ctx, a, b = _ids(v, (1, 7), 1)[0], _ids(v, (1, 3), 2)[0], _ids(v, (1, 4), 3)[0]
    alone_a, alone_b = np.asarray(apply(np.stack([np.concatenate([ctx, a, b[:1]]), np.concatenate([ctx, b])])))
    picked = np.asarray(apply(np.concatenate([ctx, b])[None], at=np.array([[6, 2, 0]], np.int32)))
    np.testing.assert_array_equal(picked[0], alone_b[[6, 2, 0]])

    row = np.concatenate([ctx, a, b])[None]
    branch = np.array([0] * 7 + [1] * 3 + [2] * 4)
    pos = np.concatenate([np.arange(7), np.arange(7, 10), np.arange(7, 11)])[None].astype(np.int32)
    causal = np.tril(np.ones((14, 14), bool))
    mask = causal & ((branch[None, :] == 0) | (branch[None, :] == branch[:, None]))
    shared = np.asarray(apply(row, pos, mask[None]))[0]
    assert np.abs(shared[:10] - alone_a[:10]).max() <= LOGIT_TOL
    assert np.abs(shared[10:] - alone_b[7:]).max() <= LOGIT_TOL
    with pytest.raises(ValueError, match="mask_bts is not taken with a cache"):
        model.apply({"params": params}, ctx[None], mask_bts=causal[None, :7, :7], cache=init_cache(model.config, 1, 8))
