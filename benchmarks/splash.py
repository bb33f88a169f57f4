"""Splash attention against the XLA reference attention on packed rows: parity (fp32, and bf16 against
the XLA path's own bf16 error) and, on a TPU, forward + backward time.

    python -m benchmarks.splash [--batch 2] [--seq 1000] [--heads 8] [--kv-heads 2] [--head-dim 64] [--repeats 5]

Rows are packed with several segments and trailing padding; errors are max |a - b| / max |b| over the
real rows' outputs and over dq, dk, dv of sum(out * g) (g zero on padding). Off a TPU the kernel runs in
Pallas interpret mode: the parity is the kernel's, the times are not (`interpret: true`, no speed ratio).
One JSON line.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.common import best_seconds, emit

NAMES = ("out", "dq", "dk", "dv")


def packed_segments(batch: int, seq: int, seed: int = 0) -> np.ndarray:
    """Each row: segments of random lengths (seq/8 .. seq/3), then ~5% padding."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((batch, seq), np.int32)
    for r in range(batch):
        start, s, end = 0, 1, int(seq * 0.95)
        while start < end:
            n = int(rng.integers(seq // 8, seq // 3 + 1))
            seg[r, start:min(start + n, end)] = s
            start, s = start + n, s + 1
    return seg


def errors(got: list, want: list) -> dict:
    return {n: float(np.abs(a - b).max() / np.abs(b).max()) for n, a, b in zip(NAMES, got, want)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=1000)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from flacuna_jax.attention import masking, xla_attention
    from flacuna_jax.attention_splash import splash_attention

    seg = jnp.asarray(packed_segments(a.batch, a.seq))
    mask = masking(seg)
    keys = jax.random.split(jax.random.key(0), 4)
    shapes = [(a.batch, a.seq, n, a.head_dim) for n in (a.heads, a.kv_heads, a.kv_heads)]
    q, k, v = (jax.random.normal(key, s) for key, s in zip(keys, shapes))
    g = jnp.where((seg != 0)[:, :, None, None], jax.random.normal(keys[3], shapes[0]), 0.0)
    real = (seg != 0)[:, :, None, None]
    kernels = {"splash": lambda q, k, v: splash_attention(q, k, v, mask),
               "xla": lambda q, k, v: xla_attention(q, k, v, mask.dense_bts)}

    def forward_backward(kernel):
        def run(q, k, v):
            out, pullback = jax.vjp(kernel, q, k, v)
            return (jnp.where(real, out, 0), *pullback(g.astype(out.dtype)))
        return jax.jit(run)

    def measured(name, dtype):
        xs = [x.astype(dtype) for x in (q, k, v)]
        return [np.asarray(x, np.float32) for x in forward_backward(kernels[name])(*xs)]

    bf16_inputs = [x.astype(jnp.bfloat16).astype(jnp.float32) for x in (q, k, v)]
    exact_bf16_inputs = [np.asarray(x) for x in forward_backward(kernels["xla"])(*bf16_inputs)]
    xla_bf16, splash_bf16 = measured("xla", jnp.bfloat16), measured("splash", jnp.bfloat16)
    xla_err, splash_err = errors(xla_bf16, exact_bf16_inputs), errors(splash_bf16, exact_bf16_inputs)
    fp32 = errors(measured("splash", jnp.float32), measured("xla", jnp.float32))
    backend = jax.default_backend()
    result = {"benchmark": "splash", "backend": backend, "device_kind": jax.devices()[0].device_kind,
              "interpret": backend != "tpu", "shape": vars(a), "fp32_rel": fp32,
              "bf16_rel_to_fp32": {"xla": xla_err, "splash": splash_err},
              "bf16_ratio": {n: splash_err[n] / xla_err[n] for n in NAMES},
              "tolerance": {"fp32": 1e-5, "bf16_ratio": 2.0}}
    result["parity_ok"] = max(fp32.values()) <= 1e-5 and max(result["bf16_ratio"].values()) <= 2.0
    if backend == "tpu":  # a time is only the kernel's on a TPU
        xs = [x.astype(jnp.bfloat16) for x in (q, k, v)]
        secs = {n: best_seconds(forward_backward(kernels[n]), tuple(xs), a.repeats) for n in kernels}
        result["bf16_fwd_bwd_ms"] = {n: 1e3 * s for n, s in secs.items()}
        result["speedup_vs_xla"] = secs["xla"] / secs["splash"]
    return emit(result)


if __name__ == "__main__":
    main()
