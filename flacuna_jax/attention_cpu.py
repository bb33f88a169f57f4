"""A decode step's attention on the CPU: one fused C++ kernel (`csrc/decode_attention.cc`) through XLA's FFI.

Why: at many rows a decode step's attention is bound by reading every layer's KV cache, and XLA's CPU
dots over each row's kv head ([g, f] x [f, s], g = 3 query heads on SmolLM2) read it at well under
memory speed; they also read every slot of the cache, where a row's queries see only its written
ones. The kernel reads each kv head's keys, then its values, once, for all its query heads, over the
slots the row's mask may reach, and does the softmax in between. SmolLM2 fp32, one step at 32 rows
x 512 slots half written: 176 -> 135 ms (`benchmarks/decode_profile.py`).

Numerics: those of `attention.cached_attention` (scores scaled after the dot, masked to the lowest
float, an fp32 softmax over the cache and the new keys together), up to the order of the sums and
an exp polynomial of ~1 ulp. A fully masked query (padding) attends uniformly over the slots it
could reach rather than all of them: no output of a padding query is ever used.

Build: `native.py` compiles it on first use for this CPU; where it cannot be built, `refusal` says
why and `attention.decode_attention` runs `cached_attention` instead.

Sharding: inside a mesh context the kernel runs under `shard_map`, rows over data x fsdp and kv heads
over tensor where it divides them; outside one, XLA gathers sharded operands before the call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from flacuna_jax import native
from flacuna_jax.sharding import fit_spec, logical_to_mesh_spec

Array = jax.Array
TARGET = "flacuna_decode_attention"


def _registration() -> str | None:
    """None once the kernel is built and registered, or why it cannot be."""
    return native.register("FlacunaDecodeAttention", TARGET)


def refusal(q_bthf: Array, k_bkfs: Array) -> str | None:
    """Why the kernel cannot run on these queries and cache, or None if it can: it needs the CPU
    backend, float32 queries and cache, and a C++ compiler."""
    if jax.default_backend() != "cpu":
        return f"it runs on the CPU, not {jax.default_backend()}"
    if q_bthf.dtype != jnp.float32 or k_bkfs.dtype != jnp.float32:
        return f"compute dtype {q_bthf.dtype}, cache {k_bkfs.dtype} (it takes float32)"
    return _registration()


def decode_attention(q_bthf: Array, k_bkfs: Array, v_bksf: Array, mask_bts: Array, k_bnkf: Array,
                     v_bnkf: Array, new_mask_btn: Array) -> Array:
    """`attention.cached_attention(q, k, v, mask, k_new, v_new, new_mask)` by the native kernel (check
    `refusal` first): queries [b, t, h, f] over a cache (keys [b, k, f, s], values [b, k, s, f]) and
    the new keys and values [b, n, k, f] not yet in it."""
    scale = np.float32(q_bthf.shape[-1] ** -0.5)

    def run(q_bthf, *cache_and_new):  # on each device's shard under a mesh
        return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q_bthf.shape, q_bthf.dtype))(q_bthf, *cache_and_new,
                                                                                           scale=scale)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        b, _, h, _ = q_bthf.shape
        k = k_bkfs.shape[1]
        rows = fit_spec(logical_to_mesh_spec(("batch",)), (b,), mesh)[0]
        heads = fit_spec(logical_to_mesh_spec((None, "heads")), (b, h), mesh)[1]
        heads = heads if heads is not None and k % mesh.shape[heads] == 0 else None  # kv heads split with them
        run = jax.shard_map(run, mesh=mesh, in_specs=(P(rows, None, heads), P(rows, heads), P(rows, heads), P(rows),
                                                      P(rows, None, heads), P(rows, None, heads), P(rows)),
                            out_specs=P(rows, None, heads), check_vma=False)
    return run(q_bthf, k_bkfs, v_bksf, mask_bts, k_bnkf, v_bnkf, new_mask_btn)
