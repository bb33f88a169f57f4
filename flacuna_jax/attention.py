"""Attention kernels over [b, t, h, f] queries and [b, s, k, f] keys/values (GQA: h = k * g).

`masking` describes which keys each query sees (causal + segment ids: packed rows never attend
across examples; padding is segment 0) in the forms the kernels take: a dense [b, t, s] mask and the
segment ids with the queries' offset in a KV cache. `attend` is the one place `model.attention`
chooses a kernel:

- `xla_attention`, the reference (transformers' eager numerics), with a custom gradient that
  recomputes the probabilities from q, k and per-row softmax statistics instead of storing
  [b, h, t, s] arrays;
- `fused_attention`: `jax.nn.dot_product_attention` asking for cuDNN flash attention where it can
  run, saying why when it cannot;
- `splash_attention` (`attention_splash.py`): JAX's Pallas splash attention kernel for TPUs, which
  takes the segment ids and grouped KV heads directly, wrapped in `shard_map` over the mesh.

What a padding query (segment 0) attends to differs between kernels (no loss, score or cache
read ever uses it): compare kernels on the real rows.

Array names carry their shapes: b batch, t query length, s key length, h query heads,
k kv heads, f head dim.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flacuna_jax import attention_cpu, attention_splash

Array = jax.Array
KERNELS = ("xla", "dot_product", "splash", "auto")  # model.attention
DECODE_KERNELS = ("native", "xla")  # Runtime.decode_attention


def attention_mask(q_segment_bt: Array, q_index_bt: Array, kv_segment_bs: Array) -> Array:
    """[b, t, s] True where query t may attend key s: same non-padding segment, not in the future."""
    kv_index_s = jnp.arange(kv_segment_bs.shape[1])
    same = (q_segment_bt[:, :, None] == kv_segment_bs[:, None, :]) & (kv_segment_bs[:, None, :] != 0)
    return same & (kv_index_s[None, None, :] <= q_index_bt[:, :, None])


class Masking(NamedTuple):
    """Which keys each query may attend, in the forms the kernels take."""

    dense_bts: Array  # True where query t sees key s (XLA, cuDNN)
    q_segment_bt: Array | None  # the queries' segment ids (0: padding); None: `explicit_masking`
    kv_segment_bs: Array | None  # the keys' segment ids (for a cache: the cache's, this call's queries written in)
    write_index: Array | None  # queries sit at key slots write_index + 0..t-1 of a cache; None: keys = queries


def masking(segment_ids_bt: Array, kv_segment_bs: Array | None = None, write_index: Array | None = None) -> Masking:
    """Self-attention over `segment_ids_bt`, or (both given) queries written into a cache at `write_index`."""
    b, t = segment_ids_bt.shape
    if kv_segment_bs is None:
        dense = attention_mask(segment_ids_bt, jnp.broadcast_to(jnp.arange(t), (b, t)), segment_ids_bt)
        return Masking(dense, segment_ids_bt, segment_ids_bt, None)
    q_index_bt = jnp.broadcast_to(jnp.reshape(write_index, (-1, 1)) + jnp.arange(t), (b, t))  # one index or one per row
    dense = attention_mask(segment_ids_bt, q_index_bt, kv_segment_bs)
    return Masking(dense, segment_ids_bt, kv_segment_bs, write_index)


def explicit_masking(mask_bts: Array) -> Masking:
    """A given causal [b, t, t] mask that segment ids cannot express (`score.py`'s shared-context rows,
    whose continuations see the context and themselves only): the dense kernels take it; splash,
    which reads only segment ids, runs XLA's attention on it instead (`attend`)."""
    return Masking(mask_bts, None, None, None)


def _masked_scores(q_bthf: Array, k_bshf: Array, mask_bts: Array) -> Array:
    """fp32 [b, h, t, s]: q·k / sqrt(f) in the compute dtype, then fp32, masked to the fp32 minimum."""
    scores = jnp.einsum("bthf,bshf->bhts", q_bthf, k_bshf) * (q_bthf.shape[-1] ** -0.5)
    return jnp.where(mask_bts[:, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)


def _softmax_stats(scores_bhts: Array) -> tuple[Array, Array, Array]:
    """(probs, row max, row sum of exp): the same operations as `jax.nn.softmax`."""
    max_bht1 = jnp.max(scores_bhts, axis=-1, keepdims=True)
    unnormalized = jnp.exp(scores_bhts - max_bht1)
    sum_bht1 = jnp.sum(unnormalized, axis=-1, keepdims=True)
    return unnormalized / sum_bht1, max_bht1, sum_bht1


@jax.custom_vjp
def _attention(q_bthf: Array, k_bshf: Array, v_bshf: Array, mask_bts: Array) -> Array:
    return _attention_fwd(q_bthf, k_bshf, v_bshf, mask_bts)[0]


def _attention_fwd(q_bthf, k_bshf, v_bshf, mask_bts):
    probs, max_bht1, sum_bht1 = _softmax_stats(_masked_scores(q_bthf, k_bshf, mask_bts))
    out = jnp.einsum("bhts,bshf->bthf", probs.astype(v_bshf.dtype), v_bshf)
    return out, (q_bthf, k_bshf, v_bshf, mask_bts, max_bht1, sum_bht1)


def _attention_bwd(res, g_bthf):
    """The probabilities are recomputed from q, k and the saved row max and sum (bit-identical to
    the forward's); only [b, h, t] statistics are kept, not the [b, h, t, s] probabilities."""
    q_bthf, k_bshf, v_bshf, mask_bts, max_bht1, sum_bht1 = res
    probs = jnp.exp(_masked_scores(q_bthf, k_bshf, mask_bts) - max_bht1) / sum_bht1
    dv_bshf = jnp.einsum("bhts,bthf->bshf", probs.astype(v_bshf.dtype), g_bthf.astype(v_bshf.dtype))
    dprobs = jnp.einsum("bthf,bshf->bhts", g_bthf.astype(v_bshf.dtype), v_bshf, preferred_element_type=jnp.float32)
    dscores = probs * (dprobs - jnp.sum(probs * dprobs, axis=-1, keepdims=True))
    dscores = jnp.where(mask_bts[:, None], dscores, 0.0)
    dscores = (dscores.astype(q_bthf.dtype) * (q_bthf.shape[-1] ** -0.5)).astype(q_bthf.dtype)
    dq_bthf = jnp.einsum("bhts,bshf->bthf", dscores, k_bshf)
    dk_bshf = jnp.einsum("bhts,bthf->bshf", dscores, q_bthf)
    return dq_bthf, dk_bshf, dv_bshf, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def xla_attention(q_bthf: Array, k_bskf: Array, v_bskf: Array, mask_bts: Array) -> Array:
    """Reference attention: scores in the compute dtype, softmax in fp32 (as transformers' eager).

    KV heads are repeated up to the query heads (as transformers' `repeat_kv`): plain 4-D batched
    matmuls run ~1.8x faster on XLA:CPU than the grouped 5-D einsum. The gradient is a custom rule
    that recomputes the probabilities instead of saving them (see `_attention_bwd`).
    """
    h, k = q_bthf.shape[2], k_bskf.shape[2]
    if k != h:
        k_bshf, v_bshf = jnp.repeat(k_bskf, h // k, axis=2), jnp.repeat(v_bskf, h // k, axis=2)
    else:
        k_bshf, v_bshf = k_bskf, v_bskf
    return _attention(q_bthf, k_bshf, v_bshf, mask_bts)


def cached_attention(q_bthf: Array, k_bkfs: Array, v_bksf: Array, mask_bts: Array, k_btkf: Array | None = None,
                     v_btkf: Array | None = None, new_mask_btt: Array | None = None) -> Array:
    """Attention over a KV cache (`kv_cache.init_cache`: keys [b, k, f, s], values [b, k, s, f]), and,
    when given, over keys and values [b, t, k, f] not in it (`new_mask_btt`): each group of g = h / k
    query heads attends its kv head's keys where they lie. `xla_attention` would repeat the keys and
    values up to h heads, a copy of g times the cache in every layer of every decode step. The same
    numerics as `xla_attention` (scores in the compute dtype, softmax in fp32); no gradient rule."""
    b, t, h, f = q_bthf.shape
    k, s = k_bkfs.shape[1], k_bkfs.shape[-1]
    q_bkgtf = q_bthf.reshape(b, t, k, h // k, f).transpose(0, 2, 3, 1, 4)
    lowest = jnp.finfo(jnp.float32).min
    scores = jnp.einsum("bkgtf,bkfs->bkgts", q_bkgtf, k_bkfs) * (f ** -0.5)
    scores = jnp.where(mask_bts[:, None, None], scores.astype(jnp.float32), lowest)
    if k_btkf is not None:
        new = jnp.einsum("bkgtf,bjkf->bkgtj", q_bkgtf, k_btkf) * (f ** -0.5)
        scores = jnp.concatenate([scores, jnp.where(new_mask_btt[:, None, None], new.astype(jnp.float32), lowest)], -1)
    probs = _softmax_stats(scores)[0].astype(v_bksf.dtype)
    out_bkgtf = jnp.einsum("bkgts,bksf->bkgtf", probs[..., :s], v_bksf)
    if k_btkf is not None:
        out_bkgtf = out_bkgtf + jnp.einsum("bkgtj,bjkf->bkgtf", probs[..., s:], v_btkf)
    return out_bkgtf.transpose(0, 3, 1, 2, 4).reshape(b, t, h, f)


PREFILL_CHUNK = 128  # query rows per chunk of `cached_prefill_attention`


def cached_prefill_attention(q_bthf: Array, k_bkfs: Array, v_bksf: Array, mask_bts: Array,
                             chunk: int = PREFILL_CHUNK) -> Array:
    """`cached_attention` for t queries written into the cache from a slot <= s - t (a prefill), in
    chunks of `chunk` queries: query j sees no slot after s - t + j, so the chunk ending at query e
    reads only the first s - t + e slots, and a long prompt's causal attention skips most of the
    masked upper triangle (SmolLM2 fp32, a 384-token prefill: ~435 -> ~393 ms; smaller chunks cost
    more than they save). The same outputs for every query that sees a key; a fully masked one
    (padding) attends uniformly over fewer slots."""
    t, s = q_bthf.shape[1], k_bkfs.shape[-1]
    if t <= chunk:
        return cached_attention(q_bthf, k_bkfs, v_bksf, mask_bts)
    outs = []
    for start in range(0, t, chunk):
        end = min(start + chunk, t)
        seen = s - t + end
        outs.append(cached_attention(q_bthf[:, start:end], k_bkfs[..., :seen], v_bksf[:, :, :seen],
                                     mask_bts[:, start:end, :seen]))
    return jnp.concatenate(outs, axis=1)


def before_write_masks(mask: Masking, slots: int) -> tuple[Array, Array]:
    """`mask` (queries written into a cache at `mask.write_index`) split for `cached_attention` over the
    cache as it was before the write and the written keys apart: ([b, t, slots] the slots before
    write_index, [b, t, t] the written keys). A decode step that reads what it has just written makes
    XLA's CPU compiler copy every layer's keys and values (SmolLM2 fp32, 1 row x 1024 slots, both
    compiled with `kv_cache.in_place_options`: 59 vs 40 ms a step); reading the cache as it was
    lets XLA write it in place."""
    b, t = mask.q_segment_bt.shape
    before_bts = mask.dense_bts & (jnp.arange(slots) < jnp.reshape(mask.write_index, (-1, 1, 1)))
    return before_bts, attention_mask(mask.q_segment_bt, jnp.broadcast_to(jnp.arange(t), (b, t)), mask.q_segment_bt)


def decode_attention(kind: str, q_bthf: Array, k_bkfs: Array, v_bksf: Array, mask_bts: Array, k_btkf: Array,
                     v_btkf: Array, new_mask_btt: Array) -> Array:
    """A decode step's attention (`cached_attention` over the cache as it was plus the new keys), by
    `kind` (`Runtime.decode_attention`): native, the fused CPU kernel of `attention_cpu` where it
    can run (else this, the reason logged once, unless the backend is not a CPU); xla, XLA's."""
    if kind not in DECODE_KERNELS:
        raise ValueError(f"decode attention {kind!r}: not one of {', '.join(DECODE_KERNELS)}")
    if kind == "native":
        reason = attention_cpu.refusal(q_bthf, k_bkfs)
        if reason is None:
            return attention_cpu.decode_attention(q_bthf, k_bkfs, v_bksf, mask_bts, k_btkf, v_btkf, new_mask_btt)
        if jax.default_backend() == "cpu":
            _log_once(f"attention: XLA's decode attention instead of the native CPU kernel: {reason}")
    return cached_attention(q_bthf, k_bkfs, v_bksf, mask_bts, k_btkf, v_btkf, new_mask_btt)


def cudnn_refusal(q_bthf: Array) -> str | None:
    """Why cuDNN flash attention cannot run on these queries, or None if it may (it can still
    refuse the shapes at trace time): it needs a GPU, half precision, head_dim a multiple of 8 <= 128."""
    f = q_bthf.shape[-1]
    if jax.default_backend() != "gpu":
        return f"no cuDNN on the {jax.default_backend()} backend"
    if q_bthf.dtype not in (jnp.bfloat16, jnp.float16):
        return f"compute dtype {q_bthf.dtype} (cuDNN needs bfloat16 or float16)"
    if f % 8 or f > 128:
        return f"head_dim {f} (cuDNN needs a multiple of 8 up to 128)"
    return None


_logged_fallbacks: set[str] = set()


def fused_attention(q_bthf: Array, k_bskf: Array, v_bskf: Array, mask_bts: Array, causal: bool = False,
                    *, fallback: bool = True) -> Array:
    """`jax.nn.dot_product_attention`, asking for cuDNN flash attention where it can run.

    JAX's default implementation is XLA's even on GPU, so cuDNN is requested explicitly. Where
    cuDNN cannot run (`cudnn_refusal`) or refuses the shapes at trace time, XLA's implementation is
    used and the reason logged once (`fallback`), or, on a GPU with `fallback=False`
    (`model.attention=dot_product`), that is an error. `causal` (queries at the key positions, i.e.
    not decoding into a cache) lets cuDNN skip the masked-out upper triangle; the mask already holds
    causality, so both implementations compute the same thing.
    """
    kw = dict(mask=mask_bts[:, None], is_causal=causal)
    reason = cudnn_refusal(q_bthf)
    if reason is None:
        try:
            return jax.nn.dot_product_attention(q_bthf, k_bskf, v_bskf, implementation="cudnn", **kw)
        except (ValueError, NotImplementedError, RuntimeError) as e:  # a shape or cuDNN version it refuses
            first_line = (str(e).splitlines() or [type(e).__name__])[0]
            reason = f"cuDNN refused queries {tuple(q_bthf.shape)} {q_bthf.dtype}: {first_line}"
    if not fallback and jax.default_backend() == "gpu":
        raise ValueError(f"model.attention=dot_product: cuDNN flash attention cannot run: {reason} "
                         "(model.attention=auto falls back to XLA's implementation; xla is the reference kernel)")
    if reason not in _logged_fallbacks:
        _logged_fallbacks.add(reason)
        logging.getLogger(__name__).warning("attention: XLA's implementation instead of cuDNN flash attention: %s", reason)
    return jax.nn.dot_product_attention(q_bthf, k_bskf, v_bskf, **kw)


def splash_refusal(mask: Masking) -> str | None:
    """Why the splash kernel cannot take this masking, or None: it reads only segment ids and one cache
    offset for all rows."""
    if mask.q_segment_bt is None:  # `explicit_masking`
        return "an explicit mask (shared-context scoring rows) that segment ids cannot express"
    if mask.write_index is not None and jnp.ndim(mask.write_index) > 0:
        return "a cache written at one index per row"
    return None


_logged_choices: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged_choices:
        _logged_choices.add(message)
        logging.getLogger(__name__).warning(message)


def attend(kind: str, q_bthf: Array, k_bskf: Array, v_bskf: Array, mask: Masking, splash_blocks=None) -> Array:
    """`model.attention` = `kind` on these queries and keys: xla | dot_product | splash | auto.

    auto: splash on a TPU, cuDNN flash attention on a GPU, XLA's implementation elsewhere (the reason
    logged once). splash (or auto on a TPU) decoding ONE token into a cache runs `xla_attention`
    (a single query row has nothing to tile), as does an explicit mask (logged once); a shape the kernel refuses is an error with splash,
    XLA's attention (logged once) with auto.
    """
    if kind == "xla":
        return xla_attention(q_bthf, k_bskf, v_bskf, mask.dense_bts)
    if kind == "dot_product" or (kind == "auto" and jax.default_backend() != "tpu"):
        return fused_attention(q_bthf, k_bskf, v_bskf, mask.dense_bts, causal=mask.write_index is None,
                               fallback=kind == "auto")
    if kind not in ("splash", "auto"):
        raise ValueError(f"model.attention={kind!r}: not one of {', '.join(KERNELS)}")
    if q_bthf.shape[1] == 1:
        return xla_attention(q_bthf, k_bskf, v_bskf, mask.dense_bts)
    if (reason := splash_refusal(mask)) is not None:
        _log_once(f"attention: XLA's implementation instead of splash attention: {reason}")
        return xla_attention(q_bthf, k_bskf, v_bskf, mask.dense_bts)
    blocks = splash_blocks or attention_splash.SplashBlocks()
    if kind == "splash":
        return attention_splash.splash_attention(q_bthf, k_bskf, v_bskf, mask, blocks)
    try:
        return attention_splash.splash_attention(q_bthf, k_bskf, v_bskf, mask, blocks)
    except (ValueError, NotImplementedError) as e:  # a shape the TPU kernel refuses at trace time
        first_line = (str(e).splitlines() or [type(e).__name__])[0]
        _log_once(f"attention: XLA's implementation instead of splash attention: queries {tuple(q_bthf.shape)} "
                  f"{q_bthf.dtype}: {first_line}")
        return xla_attention(q_bthf, k_bskf, v_bskf, mask.dense_bts)
