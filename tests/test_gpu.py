"""GPU-only checks (skipped elsewhere): cuDNN flash attention is really used, and equals XLA's.

    JAX_PLATFORMS=cuda python -m pytest tests/test_gpu.py      # scripts/gpu_session.sh runs it

`attention.fused_attention` asks for cuDNN and falls back to XLA when cuDNN refuses at trace time, so a
refusal would only show as a slower run: these tests make it visible, and compare cuDNN with the
reference attention in bf16 on packed rows (several segments, padding) with grouped-query heads,
forward and backward, and one whole LoRA train step.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flacuna_jax import attention as A
from flacuna_jax import model as M
from tests.test_step import make_batch, rel_err

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu",
                                reason="needs a GPU: JAX_PLATFORMS=cuda python -m pytest tests/test_gpu.py")

BF16_TOL = 2e-2  # relative; a mask that let segments see each other is off by O(1)


def packed_qkv(b: int, t: int, h: int, k: int, f: int):
    batch = make_batch(rows=b, seq=t, seed=1)
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, h, f), jnp.bfloat16)
    kk = jax.random.normal(keys[1], (b, t, k, f), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, k, f), jnp.bfloat16)
    seg = jnp.asarray(batch["segment_ids"])
    mask = A.attention_mask(seg, jnp.broadcast_to(jnp.arange(t), (b, t)), seg)
    # Only real query rows are compared (a padding row sees no key: each implementation fills it
    # differently, and nothing reads it); a random cotangent weighs every output.
    cotangent = jax.random.normal(keys[3], q.shape, jnp.float32) * (seg != 0)[:, :, None, None]
    return q, kk, v, mask, cotangent


SHAPES = [(4, 256, 8, 8, 64), (4, 512, 8, 2, 128)]  # (b, t, heads, kv heads, head dim): MHA; GQA


@pytest.mark.parametrize("shape", SHAPES)
def test_cudnn_is_what_runs(shape):
    q, k, v, mask, _ = packed_qkv(*shape)
    grad = jax.grad(lambda q, k, v: A.fused_attention(q, k, v, mask, causal=True).astype(jnp.float32).sum(),
                    argnums=(0, 1, 2))
    text = jax.jit(grad).lower(q, k, v).as_text()
    assert "__cudnn$fmha" in text and "Backward" in text, "fused_attention fell back to XLA"


@pytest.mark.parametrize("shape", SHAPES)
def test_cudnn_equals_xla_attention_forward_and_backward(shape):
    q, k, v, mask, cotangent = packed_qkv(*shape)

    def forward_and_grads(attend):
        def run(q, k, v):
            out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, mask), q, k, v)
            return out, vjp(cotangent.astype(out.dtype))
        return jax.jit(run)(q, k, v)

    cudnn = functools.partial(A.fused_attention, causal=True)  # as in training
    (out_c, grads_c), (out_x, grads_x) = forward_and_grads(cudnn), forward_and_grads(A.xla_attention)
    real = np.asarray(cotangent[..., 0, 0] != 0)  # [b, t]
    assert rel_err(np.asarray(out_c, np.float32)[real], np.asarray(out_x, np.float32)[real]) < BF16_TOL
    for name, gc, gx in zip("qkv", grads_c, grads_x):
        assert rel_err(np.asarray(gc, np.float32), np.asarray(gx, np.float32)) < BF16_TOL, name


def test_lora_train_step_with_cudnn_equals_xla():
    from benchmarks.common import all_trained_batch, random_lora_step
    from flacuna_jax.config import OptimConfig

    config = M.LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1376, num_layers=2, num_heads=8,
                           num_kv_heads=2, head_dim=64)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 257)).astype(np.int32)
    metrics = {}
    for attention in ("dot_product", "xla"):
        runtime = M.Runtime(jnp.bfloat16, jnp.bfloat16, "dots_saveable", attention)
        model = M.Llama(config, runtime, M.LoraSpec(8, 16.0, 0.0, ("q_proj", "v_proj")))
        step, state, frozen, mesh = random_lora_step(model, OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"),
                                                     dropout=False)
        batch = all_trained_batch(ids, mesh)
        state, _ = step(state, frozen, batch)  # B != 0 from here on: both factors get gradients
        _, m = step(state, frozen, batch)
        metrics[attention] = {k: float(m[k]) for k in ("loss", "grad_norm")}
    for key in ("loss", "grad_norm"):
        assert metrics["dot_product"][key] == pytest.approx(metrics["xla"][key], rel=BF16_TOL), metrics
