"""Flax LLaMA decoder, numerically equal to transformers' LlamaForCausalLM.

LLaMA 1/2/3: RMSNorm, rotary embeddings (default, linear and llama3 scaling), grouped-query
attention, SwiGLU MLP, tied or untied embeddings. Attention masks are causal plus segment ids, with
per-segment positions, so several examples packed in one row never see each other. An optional KV
cache (`kv_cache.py`) supports decoding. Layers are `nn.scan`-ned (one compiled layer, a leading `layers`
axis on every layer parameter) and optionally rematerialised; for decoding, `Runtime(layers="unrolled")`
runs one module per layer on one weight buffer per layer (`unrolled`). The attention kernels live in `attention.py`;
like its XLA attention, the SwiGLU product here has a custom gradient that keeps fewer activations
than autodiff would (only its two inputs; same values, gradients equal up to rounding).

Every parameter is created with logical axis names; `sharding.LOGICAL_AXIS_RULES` maps them onto
the mesh. Kernels use the [in, out] layout (HF's [out, in] transposed). LoRA factors live next to
the kernel they adapt (`lora_a` [in, r], `lora_b` [r, out], fp32); `lora.py` splits them off as the
trainable tree. With `Runtime.base_quant` (nf4 | int8) the decoder layers' projection kernels are
quantized frozen leaves (`quant.py`, bitsandbytes' formats) that dequantize inside the matmul. An
inference model on the CPU may hold them packed for a native kernel instead, the projections that
read the same input side by side in one array on their block (`PROJECTION_GROUPS`; `Runtime.matmul`,
`matmul_cpu.py`, set by `unrolled`).

Serving several adapters on one base (`AdapterBank`): every adapter's factors are stacked beside the
kernel (`bank_a` [n, in, r], `bank_b` [n, r, out], `bank_scale` [n]; index 0 the all-zero adapter,
the base) and each row of the batch applies the adapter its index `adapter_b` names. The KV cache's
write index is one for the whole batch (`generate`: left-padded rows written in step) or one per row
(the server's decode slots, each at its own length).

Array names carry their shapes: b batch, t query length, s key length, d model, h query heads,
k kv heads, g query heads per kv head, f head dim, l layers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flacuna_jax import attention, greedy_cpu, matmul_cpu, quant
from flacuna_jax.attention_splash import SplashBlocks
from flacuna_jax.kv_cache import init_cache, write_cache, write_slots  # noqa: F401  init_cache: re-exported, model.init_cache
from flacuna_jax.sharding import fit_spec, logical_to_mesh_spec

Array = jax.Array
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RopeScaling:
    kind: str  # linear | llama3
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    """The architecture (what config.json says)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}")


@dataclass(frozen=True)
class LoraSpec:
    """Which projections carry LoRA factors, and how they are scaled (PEFT's semantics)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class AdapterBank:
    """LoRA adapters stacked for per-row selection (the server's multi-adapter batches, Punica's BGMV
    idea as one einsum over gathered factors). Index 0 is the all-zero adapter (the base); an adapter
    of a smaller rank, or one that does not target a projection, is zero-padded there (zero rank
    columns add exactly nothing)."""

    count: int  # stacked adapters, the zero adapter included
    rank: int  # the largest rank of any adapter
    targets: tuple[str, ...] = ()  # projections any adapter targets


@dataclass(frozen=True)
class Runtime:
    """How the model runs (not what it is)."""

    compute_dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"  # none | full | dots_saveable
    attention: str = "xla"  # attention.KERNELS: xla | dot_product (cuDNN) | splash (Pallas, TPU) | auto (attention.attend)
    base_quant: str = "none"  # none | int8 | nf4: the decoder layers' projections (quant.py)
    double_quant: bool = False  # nf4: the block absmax quantized too
    splash_blocks: SplashBlocks = SplashBlocks()  # splash attention's tile sizes
    layers: str = "scan"  # scan | unrolled (inference: each layer's weights its own buffer, see `unstack_layers`)
    decode_attention: str = "native"  # native | xla: a decode step's attention (attention.decode_attention)
    matmul: str = "xla"  # xla | native: the decoder's projection kernels as [in, out], or packed for matmul_cpu (`unrolled`)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [f/2] in float32, computed as transformers does."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv
    if s.kind == "linear":
        return (inv / s.factor).astype(np.float32)
    if s.kind == "llama3":
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope scaling type {s.kind!r} (supported: linear, llama3)")


def apply_rope(x_btnf: Array, positions_bt: Array, inv_freq: np.ndarray) -> Array:
    """Rotary embedding, rotate-half convention (HF checkpoints are permuted for it)."""
    freqs_btf = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs_btf, freqs_btf], axis=-1)
    cos = jnp.cos(emb).astype(x_btnf.dtype)[:, :, None, :]
    sin = jnp.sin(emb).astype(x_btnf.dtype)[:, :, None, :]
    half = x_btnf.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnf[..., half:], x_btnf[..., :half]], axis=-1)
    return x_btnf * cos + rotated * sin


def constrain(x: Array, names: tuple[str | None, ...]) -> Array:
    """Pins an activation to its logical axes on the mesh in context (the train/eval step sets it
    with `jax.sharding.use_abstract_mesh`); a no-op without one (inference, single-device use).

    Without it XLA may propagate the FSDP sharding of the weights (`embed` over fsdp) into the
    activations and replicate the batch instead: every device then computes the whole global batch.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, fit_spec(logical_to_mesh_spec(names), x.shape, mesh))


BTD = ("batch", "length", "act_embed")


def _lora_a_init(key, shape, dtype):
    # PEFT: kaiming_uniform_(a=sqrt(5)) on [r, in] -> U(-1/sqrt(in), 1/sqrt(in)).
    bound = 1.0 / math.sqrt(shape[-2])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _packed_init(key, shape, dtype):
    """A packed kernel's init (its shape, for `abstract_params`; `unrolled` packs the real weights)."""
    p, k, c = shape
    return matmul_cpu.pack(nn.initializers.normal(0.02)(key, (k, p * c), dtype))


def row_dropout(x_btd: Array, rate: float, key: Array, rows_b: Array | None) -> Array:
    """Dropout whose mask for row i is drawn from fold_in(key, rows_b[i]): with global row ids, the
    masks do not depend on how the batch is split over devices or micro-batches."""
    rows_b = jnp.arange(x_btd.shape[0]) if rows_b is None else rows_b
    keep = jax.vmap(lambda r: jax.random.bernoulli(jax.random.fold_in(key, r), 1.0 - rate, x_btd.shape[1:]))(rows_b)
    return jnp.where(keep, x_btd / (1.0 - rate), 0).astype(x_btd.dtype)


class Linear(nn.Module):
    """y = x W (+ scale * dropout(x) A B when this projection carries LoRA). `base`: x W already computed
    (a group's one kernel call, `_projections`): then this module holds no kernel, only its deltas."""

    features: int
    axes: tuple[str, str]
    runtime: Runtime
    lora: LoraSpec | None = None
    deterministic: bool = True
    quantizable: bool = False  # runtime.base_quant applies (the decoder layers' projections, not lm_head)
    bank: AdapterBank | None = None

    @nn.compact
    def __call__(self, x: Array, rows_b: Array | None = None, adapter_b: Array | None = None,
                 base: Array | None = None) -> Array:
        rt = self.runtime
        if base is not None:
            y = base
        elif self.quantizable and rt.base_quant != "none":
            kernel = quant.kernel_param(self, (x.shape[-1], self.features), self.axes, rt)
            y = x @ kernel.dequantize(rt.compute_dtype)  # inside the jitted matmul: XLA fuses it
        else:
            kernel = self.param(
                "kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes),
                (x.shape[-1], self.features), rt.param_dtype,
            )
            y = x @ kernel.astype(rt.compute_dtype)
        if self.bank is not None:
            y = y + self._bank_delta(x, adapter_b)
        if self.lora is None:
            return y
        a = self.param("lora_a", nn.with_logical_partitioning(_lora_a_init, (self.axes[0], "lora_rank")),
                       (x.shape[-1], self.lora.rank), jnp.float32)
        b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", self.axes[1])),
                       (self.lora.rank, self.features), jnp.float32)
        if not self.deterministic and self.lora.dropout > 0:
            x = row_dropout(x, self.lora.dropout, self.make_rng("dropout"), rows_b)
        return y + ((x @ a.astype(rt.compute_dtype)) @ b.astype(rt.compute_dtype)) * self.lora.scale

    def _bank_delta(self, x_bti: Array, adapter_b: Array | None) -> Array:
        """Row b's (x A_i) B_i * scale_i with i = adapter_b[b]: PEFT's order of operations, per row."""
        n, r, cd = self.bank.count, self.bank.rank, self.runtime.compute_dtype
        a = self.param("bank_a", nn.with_logical_partitioning(nn.initializers.zeros, ("adapters", self.axes[0], "lora_rank")),
                       (n, x_bti.shape[-1], r), jnp.float32)
        b = self.param("bank_b", nn.with_logical_partitioning(nn.initializers.zeros, ("adapters", "lora_rank", self.axes[1])),
                       (n, r, self.features), jnp.float32)
        scale = self.param("bank_scale", nn.with_logical_partitioning(nn.initializers.zeros, ("adapters",)), (n,), jnp.float32)
        if adapter_b is None:
            adapter_b = jnp.zeros((x_bti.shape[0],), jnp.int32)
        x_btr = jnp.einsum("bti,bir->btr", x_bti, jnp.take(a, adapter_b, axis=0).astype(cd))
        y_bto = jnp.einsum("btr,bro->bto", x_btr, jnp.take(b, adapter_b, axis=0).astype(cd))
        return y_bto * jnp.take(scale, adapter_b).astype(cd)[:, None, None]


class RMSNorm(nn.Module):
    eps: float
    runtime: Runtime

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.runtime.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.runtime.compute_dtype) * normed.astype(self.runtime.compute_dtype)


def _linear(module: nn.Module, name: str, features: int, axes: tuple[str, str]) -> Linear:
    lora = module.lora if module.lora is not None and name in module.lora.targets else None
    bank = module.bank if module.bank is not None and name in module.bank.targets else None
    return Linear(features, axes, module.runtime, lora, module.deterministic, quantizable=True, bank=bank, name=name)


# The decoder's projections by the input they read: with Runtime.matmul = "native" each group is one
# packed kernel (`pack_projections`) and one call of the CPU kernel.
PROJECTION_GROUPS = {"attn": (("q_proj", "k_proj", "v_proj"), ("o_proj",)),
                     "mlp": (("gate_proj", "up_proj"), ("down_proj",))}


def packed_group_name(names: tuple[str, ...]) -> str:
    return f"packed({','.join(names)})"


def _projections(module: nn.Module, x: Array, specs: dict[str, tuple[int, tuple[str, str]]],
                 rows_b: Array | None, adapter_b: Array | None) -> list[Array]:
    """x through each projection of one group of `PROJECTION_GROUPS` (name -> features, axes): each
    its own product, or, with Runtime.matmul = "native", one kernel call for the group, each
    projection's LoRA and adapter deltas added to its share."""
    rt = module.runtime
    bases = [None] * len(specs)
    if rt.matmul == "native" and rt.base_quant == "none":  # packed by `unrolled`, never trained
        widths = [features for features, _ in specs.values()]
        axis_in = next(iter(specs.values()))[1][0]
        packed = module.param(packed_group_name(tuple(specs)),
                              nn.with_logical_partitioning(_packed_init, (None, axis_in, None)),
                              matmul_cpu.group_shape(x.shape[-1], widths), rt.param_dtype)
        bases = matmul_cpu.project_group(x.astype(rt.compute_dtype), packed.astype(rt.compute_dtype), widths)
    return [_linear(module, name, features, axes)(x, rows_b, adapter_b, base)
            for (name, (features, axes)), base in zip(specs.items(), bases)]


class Attention(nn.Module):
    config: LlamaConfig
    runtime: Runtime
    lora: LoraSpec | None = None
    deterministic: bool = True
    bank: AdapterBank | None = None

    @nn.compact
    def __call__(self, x_btd: Array, positions_bt: Array, mask: attention.Masking, cache: dict | None = None,
                 write_index: Array | None = None, rows_b: Array | None = None,
                 adapter_b: Array | None = None) -> tuple[Array, dict | None]:
        """`cache`: this layer's keys [b, k, f, s] and values [b, k, s, f] (`init_cache`)."""
        c = self.config
        b, t, _ = x_btd.shape
        q, k, v = _projections(self, x_btd, {"q_proj": (c.num_heads * c.head_dim, ("embed", "heads")),
                                             "k_proj": (c.num_kv_heads * c.head_dim, ("embed", "kv_heads")),
                                             "v_proj": (c.num_kv_heads * c.head_dim, ("embed", "kv_heads"))},
                               rows_b, adapter_b)
        q_bthf = q.reshape(b, t, c.num_heads, c.head_dim)
        k_btkf = k.reshape(b, t, c.num_kv_heads, c.head_dim)
        v_btkf = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        inv_freq = rope_inv_freq(c)
        q_bthf, k_btkf = apply_rope(q_bthf, positions_bt, inv_freq), apply_rope(k_btkf, positions_bt, inv_freq)
        if cache is not None:  # write this step's keys/values at write_index, attend over the whole cache
            new = {"k": k_btkf.astype(cache["k"].dtype), "v": v_btkf.astype(cache["v"].dtype)}  # as the cache holds them
            written = write_cache(cache, new, write_index)
            as_q = lambda x: x.astype(q_bthf.dtype)  # noqa: E731
            if self.runtime.attention != "xla":  # the other kernels take keys and values [b, s, k, f]
                o = attention.attend(self.runtime.attention, q_bthf, as_q(written["k"]).transpose(0, 3, 1, 2),
                                     as_q(written["v"]).transpose(0, 2, 1, 3), mask, self.runtime.splash_blocks)
            elif t == 1:  # a decode step: the cache as it was, then the new key (in place: `before_write_masks`)
                before_bts, new_btt = attention.before_write_masks(mask, cache["k"].shape[-1])
                o = attention.decode_attention(self.runtime.decode_attention, q_bthf, as_q(cache["k"]),
                                               as_q(cache["v"]), before_bts, as_q(new["k"]), as_q(new["v"]), new_btt)
            else:  # a prefill: over the written cache (its own keys among them), causal chunks
                o = attention.cached_prefill_attention(q_bthf, as_q(written["k"]), as_q(written["v"]), mask.dense_bts)
            cache = written
        else:
            o = attention.attend(self.runtime.attention, q_bthf, k_btkf, v_btkf, mask, self.runtime.splash_blocks)
        out, = _projections(self, o.reshape(b, t, c.num_heads * c.head_dim), {"o_proj": (c.hidden_size, ("heads", "embed"))},
                            rows_b, adapter_b)
        return out, cache


@jax.custom_vjp
def swiglu(gate: Array, up: Array) -> Array:
    """silu(gate) * up. Its gradient keeps only gate and up (autodiff kept the sigmoid, silu and
    their product too: three more [b, t, intermediate] arrays per layer) and recomputes the sigmoid."""
    return nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, g):
    gate, up = res
    sig = jax.nn.sigmoid(gate)
    return g * up * (sig * (1 + gate * (1 - sig))), g * (gate * sig)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class Mlp(nn.Module):
    config: LlamaConfig
    runtime: Runtime
    lora: LoraSpec | None = None
    deterministic: bool = True
    bank: AdapterBank | None = None

    @nn.compact
    def __call__(self, x_btd: Array, rows_b: Array | None = None, adapter_b: Array | None = None) -> Array:
        c = self.config
        gate, up = _projections(self, x_btd, {"gate_proj": (c.intermediate_size, ("embed", "mlp")),
                                              "up_proj": (c.intermediate_size, ("embed", "mlp"))}, rows_b, adapter_b)
        down, = _projections(self, swiglu(gate, up), {"down_proj": (c.hidden_size, ("mlp", "embed"))}, rows_b, adapter_b)
        return down


class DecoderLayer(nn.Module):
    config: LlamaConfig
    runtime: Runtime
    lora: LoraSpec | None = None
    deterministic: bool = True
    bank: AdapterBank | None = None

    @nn.compact
    def __call__(self, h_btd: Array, cache: dict | None, positions_bt: Array, mask: attention.Masking, write_index: Array | None,
                 rows_b: Array | None = None, adapter_b: Array | None = None):
        c, rt = self.config, self.runtime
        x = RMSNorm(c.rms_norm_eps, rt, name="input_norm")(h_btd)  # h_btd: pinned by the embedding or the last layer
        attn = Attention(c, rt, self.lora, self.deterministic, self.bank, name="attn")
        attn_out, cache = attn(x, positions_bt, mask, cache, write_index, rows_b, adapter_b)
        h_btd = h_btd + attn_out
        x = RMSNorm(c.rms_norm_eps, rt, name="post_attention_norm")(h_btd)
        h_btd = h_btd + Mlp(c, rt, self.lora, self.deterministic, self.bank, name="mlp")(x, rows_b, adapter_b)
        return constrain(h_btd, BTD), cache


_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the layer in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Llama(nn.Module):
    """LLaMA causal LM. `__call__` returns logits [b, t, vocab] (and the updated cache if given)."""

    config: LlamaConfig
    runtime: Runtime = Runtime()
    lora: LoraSpec | None = None
    bank: AdapterBank | None = None

    @nn.compact
    def __call__(self, input_ids_bt: Array, positions_bt: Array | None = None, segment_ids_bt: Array | None = None,
                 *, cache: dict | None = None, deterministic: bool = True, return_hidden: bool = False,
                 rows_b: Array | None = None, mask_bts: Array | None = None, logits_at_bm: Array | None = None,
                 adapter_b: Array | None = None):
        """`rows_b`: the global index of each row, which seeds its LoRA dropout mask (default 0..b-1).
        `adapter_b`: each row's adapter in `bank` (default 0, the base). `cache["index"]`: where this
        call's keys/values are written, a scalar or one index per row.
        `mask_bts`: an attention mask [b, t, t] (True: query t sees key s) instead of the causal +
        segment one, e.g. a shared context whose continuations do not see each other (`score.py`); it
        must be causal (no key after its query), and is not taken with a cache.
        `logits_at_bm`: positions [b, m]; the logits (or hidden states) returned are those at these
        positions only, [b, m, vocab]: the output projection runs where it is read."""
        c, rt = self.config, self.runtime
        b, t = input_ids_bt.shape
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones((b, t), jnp.int32)
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if mask_bts is not None and cache is not None:
            raise ValueError("mask_bts is not taken with a cache (the cache's mask comes from its segment ids)")
        if cache is None:
            write_index = None
            mask = attention.masking(segment_ids_bt) if mask_bts is None else attention.explicit_masking(mask_bts)
            layer_cache = None
        else:
            write_index = cache["index"]
            kv_segments = write_slots(cache["segment_ids"], segment_ids_bt, write_index, slot_axis=1)
            mask = attention.masking(segment_ids_bt, kv_segments, write_index)
            layer_cache = {"k": cache["k"], "v": cache["v"]}

        embedding = self.param("embed_tokens", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                               (c.vocab_size, c.hidden_size), rt.param_dtype)
        h = constrain(jnp.take(embedding, input_ids_bt, axis=0).astype(rt.compute_dtype), BTD)

        layer_cls = DecoderLayer
        if rt.remat != "none":
            layer_cls = nn.remat(layer_cls, policy=_REMAT_POLICIES[rt.remat], prevent_cse=False)
        if rt.layers == "unrolled":
            # One module per layer (params "layers_0", "layers_1", ...: `unstack_layers`), and a cache of one
            # array per layer (`init_cache(..., layers="unrolled")`). A scanned layer's weights and cache are
            # sliced out of stacked arrays, and XLA copies each slice before its matmuls, in every layer of
            # every decode step; here each matmul reads them where they lie, and each cache is written in place.
            if layer_cache is not None and not isinstance(layer_cache["k"], (tuple, list)):
                raise ValueError("an unrolled model's cache holds one array per layer: init_cache(..., layers='unrolled')")
            new_k, new_v = [], []
            for i in range(c.num_layers):
                layer = layer_cls(c, rt, self.lora, deterministic, self.bank, name=f"layers_{i}")
                one = None if layer_cache is None else {"k": layer_cache["k"][i], "v": layer_cache["v"][i]}
                h, one = layer(h, one, positions_bt, mask, write_index, rows_b, adapter_b)
                if one is not None:
                    new_k.append(one["k"])
                    new_v.append(one["v"])
            new_layer_cache = None if layer_cache is None else {"k": tuple(new_k), "v": tuple(new_v)}
        else:
            layers = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, rt, self.lora, deterministic, self.bank, name="layers")
            h, new_layer_cache = layers(h, layer_cache, positions_bt, mask, write_index, rows_b, adapter_b)
        h = constrain(RMSNorm(c.rms_norm_eps, rt, name="norm")(h), BTD)
        if logits_at_bm is not None:
            h = jnp.take_along_axis(h, logits_at_bm[:, :, None].astype(jnp.int32), axis=1)
        if return_hidden:
            out = h
        elif rt.matmul == "native":  # a packed copy of the output projection (`pack_output`)
            packed = self.param("output_packed", nn.with_logical_partitioning(_packed_init, (None, "embed", None)),
                                matmul_cpu.packed_shape(c.hidden_size, c.vocab_size), rt.param_dtype)
            out = matmul_cpu.project(h.astype(rt.compute_dtype), packed.astype(rt.compute_dtype), c.vocab_size)
        elif c.tie_word_embeddings:
            out = h @ embedding.astype(rt.compute_dtype).T
        else:
            out = Linear(c.vocab_size, ("embed", "vocab"), rt, name="lm_head")(h)
        if cache is None:
            return out
        return out, {**new_layer_cache, "segment_ids": kv_segments, "index": write_index + t}

    def output_embedding(self, params: dict) -> Array:
        """The [d, vocab] output projection (for losses computed from hidden states)."""
        if self.config.tie_word_embeddings:
            return params["embed_tokens"].T
        return params["lm_head"]["kernel"]


def unstack_layers(tree: dict) -> dict:
    """A tree with a stacked "layers" subtree (every leaf [l, ...]: params, LoRA factors, shardings'
    shapes) -> one subtree per layer, "layers_0" ... "layers_{l-1}", what `Runtime(layers="unrolled")`
    reads. The stacked leaves are dropped from `tree` as they are split (`tree` is emptied of "layers"),
    so a model is never twice in memory when nothing else holds them."""
    stacked = tree.pop("layers")
    leaves, treedef = jax.tree.flatten(stacked)
    del stacked
    n = leaves[0].shape[0]
    per_layer: list[list[Any]] = [[] for _ in range(n)]
    while leaves:
        leaf = leaves.pop(0)
        for i in range(n):
            per_layer[i].append(leaf[i])
        del leaf
    return {**tree, **{f"layers_{i}": jax.tree.unflatten(treedef, per_layer[i]) for i in range(n)}}


def unrolled(model: "Llama", params: dict, matmul: str = "native") -> tuple["Llama", dict]:
    """(model, params) for decoding and scoring: one module and one weight buffer per layer
    (`Runtime.layers`), the stacked `params` consumed (`unstack_layers`). Decode steps read each weight
    once instead of copying it out of the stack first (measured on SmolLM2, CPU: ~1.6-2x the tokens/s
    at batch 1-8); compiling the unrolled layers takes longer (~5x for a 30-layer decoder), which a
    long evaluation or a server repays many times over. A quantized base stays scanned: its kernels
    are dequantized into new buffers inside each matmul either way, so unrolling would only add
    compile time.

    `matmul="native"`: the decoder's projection kernels are also packed for the CPU kernel of
    `matmul_cpu` (`Runtime.matmul`) where it runs: float32 weights on one CPU device and a compiler,
    and the output projection gets a packed copy (`pack_output`). Elsewhere (or with "xla") they stay
    as they are, the reason logged."""
    if matmul not in matmul_cpu.KERNELS:
        raise ValueError(f"matmul {matmul!r}: not one of {', '.join(matmul_cpu.KERNELS)}")
    if model.runtime.base_quant != "none":
        return model, params
    if model.runtime.layers != "unrolled":
        model, params = model.clone(runtime=dataclasses.replace(model.runtime, layers="unrolled")), unstack_layers(params)
    if matmul == "native" and model.runtime.matmul != "native":
        reason = _packing_refusal(model, params)
        if reason is None:
            model = model.clone(runtime=dataclasses.replace(model.runtime, matmul="native"))
            params = pack_output(model, pack_projections(params))
        else:
            log.info("matmul: the projections stay XLA's: %s", reason)
    return model, params


def _packing_refusal(model: "Llama", params: dict) -> str | None:
    rt = model.runtime
    if jnp.dtype(rt.param_dtype) != jnp.float32 or jnp.dtype(rt.compute_dtype) != jnp.float32:
        return f"weights {jnp.dtype(rt.param_dtype).name}, compute {jnp.dtype(rt.compute_dtype).name} (the kernel takes float32)"
    if any(isinstance(k, jax.Array) and len(k.sharding.device_set) > 1 for _, k in _projection_kernels(params)):
        return "the weights span several devices (the kernel runs on one)"
    return matmul_cpu.refusal()


def _projection_kernels(params: dict):
    """(path, kernel) of every decoder layer projection of an unrolled tree."""
    for layer, tree in params.items():
        if layer.startswith("layers_"):
            for block, modules in tree.items():
                for name, leaves in modules.items():
                    if isinstance(leaves, dict) and "kernel" in leaves:
                        yield (layer, block, name), leaves["kernel"]


def pack_projections(params: dict) -> dict:
    """An unrolled tree with its decoder projection kernels packed, by `PROJECTION_GROUPS`
    (`matmul_cpu.pack_group`, under `packed_group_name`), a new tree. A projection keeps its own entry
    only for what else it holds (LoRA factors, an adapter bank). Each plain kernel is released as soon
    as its group is packed unless the caller still holds `params`."""
    out = {name: jax.tree.map(lambda x: x, tree) if name.startswith("layers_") else tree for name, tree in params.items()}
    pack = jax.jit(matmul_cpu.pack_group)
    for layer in (name for name in out if name.startswith("layers_")):
        for block, groups in PROJECTION_GROUPS.items():
            modules = out[layer][block]
            for names in groups:  # popped, not held across groups
                modules[packed_group_name(names)] = pack([jnp.asarray(modules[name].pop("kernel")) for name in names])
                for name in names:
                    if not modules[name]:
                        del modules[name]
    return out


def pack_output(model: "Llama", params: dict) -> dict:
    """`params` with a packed copy of the output projection, "output_packed", what `Runtime.matmul =
    "native"` computes the logits with, and, where half precision holds it, the greedy screen's half
    copy of it, "output_screen" (`greedy_cpu`: greedy decode steps read that instead). Copies: the
    embedding lookup and `output_embedding`'s callers (the server's prefill, the evaluations' answer
    columns) keep the plain weights. They cost the output projection's size again and half of it
    (SmolLM2: 113 + 57 MB on 538). The packed copy buys the step at 8-16 rows: SmolLM2's tied output
    projection in the server's decode step at 8 rows took 8.0 ms as XLA's `x E^T`, 6.7 packed
    (profiled per thunk; `benchmarks/decode_profile.py` times the steps)."""
    output = jnp.asarray(model.output_embedding(params))
    packed = jax.jit(matmul_cpu.pack)(output)
    screen = greedy_cpu.screen_weights(packed, output)
    return {**params, "output_packed": packed, **({"output_screen": screen} if screen is not None else {})}


def stack_layers(tree: dict) -> dict:
    """The inverse of `unstack_layers` (a new tree; `tree` is left as it is)."""
    names = sorted((k for k in tree if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
    rest = {k: v for k, v in tree.items() if not k.startswith("layers_")}
    return {**rest, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *[tree[k] for k in names])}


def abstract_params(model: Llama, seq_len: int = 8) -> tuple[Any, Any]:
    """(shapes, logical axis names) of every parameter, without allocating any weight."""
    ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    boxed = jax.eval_shape(lambda i: model.init(jax.random.key(0), i), ids)["params"]
    names = nn.get_partition_spec(boxed)
    names = jax.tree.map(tuple, names, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return nn.meta.unbox(boxed), names
