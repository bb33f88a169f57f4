"""Splash attention: JAX's Pallas flash-attention kernel for TPUs, on packed rows, sharded over the mesh.

`jax.experimental.pallas.ops.tpu.splash_attention` (installed with JAX; MaxText and EasyDeL train
with it) takes per-row segment ids, a static causal mask whose fully masked blocks it skips, and
grouped-query attention as it is: query head i reads KV head i // (h / k), so K and V are never
repeated. It keeps only the per-row log-sum-exp for the backward pass, never [b, h, t, s] scores.

How our attention maps onto it:

- Packing: segment ids go in as they are (padding is segment 0, so a real query never sees it);
  the kernel's own tail padding and a cache's unwritten slots get segment -1.
- Lengths: queries and keys are padded up to a multiple of 128 (the TPU lane width), and each
  configured block shrinks to the largest multiple of 128 dividing that length (`fit_block`).
- Scale: q is multiplied by 1/sqrt(head_dim) before the kernel (it applies none itself).
- A KV cache (generate's prefill): queries sit at key slots w..w+t-1, w traced. The keys are rolled
  by s - t - w so those slots end the row, which makes the mask the static causal mask with offset
  s - t; the cache's empty slots wrap to the front with segment -1.
- Sharding: inside a mesh context (the train and eval steps) the kernel runs under `shard_map`,
  batch over data x fsdp and heads over tensor. When the tensor axis does not divide the KV heads,
  K/V stay whole on each device and each device takes the KV heads its query heads read.
- Off a TPU the same kernel runs in Pallas interpret mode (for tests: exact but slow), with a
  one-time warning.

Array names carry their shapes: b batch, t query length, s key length, h query heads, k kv heads,
f head dim.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from flacuna_jax.sharding import fit_spec, logical_to_mesh_spec

Array = jax.Array
LANES = 128  # the kernel's lane width: every block and padded length is a multiple of it
EMPTY = -1  # segment id of the kernel's padding and a cache's unwritten slots: no real query matches it


@dataclass(frozen=True)
class SplashBlocks:
    """Tile sizes (MaxText's sa_block_*; multiples of 128). Forward: q rows x kv columns per grid step,
    kv columns per inner matmul; backward (dK/dV and dQ kernels): q rows x kv columns."""

    q: int = 512
    kv: int = 512
    kv_compute: int = 512
    q_bwd: int = 512
    kv_bwd: int = 512

    def __post_init__(self):
        for name in ("q", "kv", "kv_compute", "q_bwd", "kv_bwd"):
            value = getattr(self, name)
            if value <= 0 or value % LANES:
                raise ValueError(f"splash block {name}={value}: must be a positive multiple of {LANES}")


def padded_length(n: int) -> int:
    return -(-n // LANES) * LANES


def fit_block(block: int, length: int) -> int:
    """The largest multiple of 128 that is <= `block` and divides `length` (a multiple of 128)."""
    return max(b for b in range(LANES, min(block, length) + 1, LANES) if length % b == 0)


_warned_interpret = False


def _interpret() -> bool:
    """Off a TPU the kernel runs in Pallas interpret mode; said once per process."""
    global _warned_interpret
    backend = jax.default_backend()
    if backend == "tpu":
        return False
    if not _warned_interpret:
        _warned_interpret = True
        logging.getLogger(__name__).warning(
            "attention: splash attention runs in Pallas interpret mode on the %s backend (exact but slow: for tests; "
            "on a GPU use model.attention=auto or dot_product)", backend)
    return True


def _kernel(heads: int, t: int, s: int, offset: int, blocks: SplashBlocks, interpret: bool):
    """The splash kernel for `heads` query heads over padded lengths t x s, causal with `offset`
    (query i sees key j <= i + offset). Built at each trace (its block masks: numpy work, ~0.1 s for
    40 heads x 1280): the kernel holds arrays made in the trace, so it cannot be kept across traces."""
    bq, bkv, bq_bwd, bkv_bwd = (fit_block(blocks.q, t), fit_block(blocks.kv, s), fit_block(blocks.q_bwd, t),
                                fit_block(blocks.kv_bwd, s))
    sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=fit_block(blocks.kv_compute, bkv),
                              block_q_dkv=bq_bwd, block_kv_dkv=bkv_bwd, block_kv_dkv_compute=bkv_bwd,
                              block_q_dq=bq_bwd, block_kv_dq=bkv_bwd)
    mask = splash.MultiHeadMask([splash.CausalMask((t, s), offset=offset) for _ in range(heads)])
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q_bhtf, k_bksf, v_bksf, q_segment_bt, kv_segment_bs, *, offset, blocks, interpret, kv_groups=None):
    """The kernel over this device's rows and heads. `kv_groups` (tensor-parallel, K/V whole here):
    (axis name, total query heads, total kv heads), to pick the KV heads these query heads read."""
    h = q_bhtf.shape[1]
    if kv_groups is not None:
        axis, h_total, k_total = kv_groups
        g = h_total // k_total  # query heads per KV head
        first = jax.lax.axis_index(axis) * h  # this device's first query head
        if h % g == 0:  # whole groups: their h / g KV heads
            k_bksf, v_bksf = (jax.lax.dynamic_slice_in_dim(x, first // g, h // g, axis=1) for x in (k_bksf, v_bksf))
        elif g % h == 0:  # part of one group: one KV head
            k_bksf, v_bksf = (jax.lax.dynamic_slice_in_dim(x, first // g, 1, axis=1) for x in (k_bksf, v_bksf))
        else:  # groups straddle devices: each local query head gets its own KV head (repeated here only)
            index = (first + jnp.arange(h)) // g
            k_bksf, v_bksf = jnp.take(k_bksf, index, axis=1), jnp.take(v_bksf, index, axis=1)
    kernel = _kernel(h, q_bhtf.shape[2], k_bksf.shape[2], offset, blocks, interpret)
    return jax.vmap(kernel)(q_bhtf, k_bksf, v_bksf, splash.SegmentIds(q_segment_bt, kv_segment_bs))


def splash_attention(q_bthf: Array, k_bskf: Array, v_bskf: Array, mask, blocks: SplashBlocks = SplashBlocks()) -> Array:
    """Causal attention with segment ids (`attention.Masking`) through the splash kernel."""
    b, t, h, f = q_bthf.shape
    s, k = k_bskf.shape[1], k_bskf.shape[2]
    kv_segment_bs = mask.kv_segment_bs
    if mask.write_index is None:
        offset = 0
    else:  # roll the cache so this call's key slots end the row (see the module docstring)
        written = jnp.arange(s)[None, :] < mask.write_index + t
        kv_segment_bs = jnp.where(written, kv_segment_bs, EMPTY)
        shift = s - t - mask.write_index
        k_bskf, v_bskf, kv_segment_bs = (jnp.roll(x, shift, axis=1) for x in (k_bskf, v_bskf, kv_segment_bs))
        offset = s - t
    tp, sp = padded_length(t), padded_length(s)
    q_bthf = q_bthf * jnp.asarray(f ** -0.5, q_bthf.dtype)
    pad = lambda x, n, value=0: jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2),  # noqa: E731
                                        constant_values=value)
    q_bhtf = pad(q_bthf, tp).transpose(0, 2, 1, 3)
    k_bksf, v_bksf = (pad(x, sp).transpose(0, 2, 1, 3) for x in (k_bskf, v_bskf))
    q_segment_bt = pad(mask.q_segment_bt.astype(jnp.int32), tp, EMPTY)
    kv_segment_bs = pad(kv_segment_bs.astype(jnp.int32), sp, EMPTY)
    run = functools.partial(_local, offset=offset, blocks=blocks, interpret=_interpret())

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        rows = fit_spec(logical_to_mesh_spec(("batch",)), (b,), mesh)[0]
        heads = fit_spec(logical_to_mesh_spec((None, "heads")), (b, h), mesh)[1]
        kv_heads = heads if heads is not None and k % mesh.shape[heads] == 0 else None
        if heads is not None and kv_heads is None:
            run = functools.partial(run, kv_groups=(heads, h, k))
        run = jax.shard_map(run, mesh=mesh, in_specs=(P(rows, heads), P(rows, kv_heads), P(rows, kv_heads), P(rows),
                                                      P(rows)),
                            out_specs=P(rows, heads), check_vma=False)
    out_bhtf = run(q_bhtf, k_bksf, v_bksf, q_segment_bt, kv_segment_bs)
    return out_bhtf.transpose(0, 2, 1, 3)[:, :t]
