"""A frozen base in NF4 or int8, as bitsandbytes stores it: quantized on the host, dequantized in the matmul.

Quantization (numpy, on the host while a checkpoint loads) reproduces bitsandbytes' CPU code paths
operation by operation, so the dequantized weights equal bitsandbytes' bit for bit:

- NF4 (`functional.quantize_4bit(quant_type="nf4", blocksize=64)`): the weight, flattened row by row
  in HF's [out, in] layout, in blocks of 64; absmax per block (fp32); each value scaled by the
  reciprocal `x * (1 / absmax)`, clipped to [-1, 1] and given the index of the NF4 code-book bucket
  between midpoints (a value on a midpoint takes the lower code); two codes a byte, the first in the
  high nibble. Dequantized: `code[q] * absmax` in fp32, then cast to the weight's dtype.
- Double quantization (`compress_statistics=True`): the absmax minus their mean, quantized in blocks
  of 256 with bitsandbytes' signed 8-bit dynamic map through its CPU kernel's 65536-point lookup
  table (`nested_quantize`); dequantized `dynamic[q2] * absmax2 + offset`. Given the same offset the
  codes and absmax2 are bitsandbytes' bit for bit; our offset is the correctly rounded mean, where
  torch's fp32 mean may differ in the last bit.
- int8 (`nn.Int8Params`): the weight cast to fp16, `CB = round(W * ((1 / max|W_row|) * 127))` (half
  to even; torch's `127 / x` is a reciprocal times 127), `SCB = max|W_row|` (fp32); dequantized `CB * SCB * (1/127)` (`int8_vectorwise_dequant`).

In the model a quantized kernel is one more kind of frozen leaf (`NF4Weight`, `Int8Weight`: pytrees
of arrays in HF's [out, in] layout) that `dequantize`s itself to the [in, out] kernel inside the
jitted matmul; its fields carry the kernel's logical axes, so the sharding table, the LoRA split and
the planner see only arrays with dtypes and shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BASE_QUANTS = ("none", "int8", "nf4")
NF4_BLOCK = 64
NESTED_BLOCK = 256

# QLoRA's NormalFloat4 code book (bitsandbytes `get_4bit_type("nf4")`, Dettmers et al. 2023, App. E).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
_NF4_MIDPOINTS = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)
_INV_127 = np.float32(7.874015718698502e-3)  # bitsandbytes' 1/127


class QuantError(ValueError):
    """A weight cannot be quantized as asked."""


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32), bit for bit (from both ends, one rounding)."""
    step = np.float32((np.float32(end) - np.float32(start)) / np.float32(steps - 1))
    i = np.arange(steps)
    lo = (np.float64(np.float32(start)) + np.float64(step) * i).astype(np.float32)
    hi = (np.float64(np.float32(end)) - np.float64(step) * (steps - 1 - i)).astype(np.float32)
    return np.where(i < steps // 2, lo, hi)


def dynamic_code() -> np.ndarray:
    """bitsandbytes' `create_dynamic_map(signed=True)`: the 256-entry code of the nested absmax."""
    data: list[np.float32] = []
    for i in range(7):
        bounds = _linspace_f32(0.1, 1.0, 2 ** i + 1)
        means = ((bounds[:-1] + bounds[1:]) / np.float32(2)).astype(np.float32)
        scale = np.float32(10.0 ** (i - 6))
        data += list((scale * means).astype(np.float32)) + list((-scale * means).astype(np.float32))
    return np.sort(np.array(data + [0.0, 1.0], np.float32))


DYNAMIC_CODE = dynamic_code()


# ------------------------------------------------------------------------------- host quantizers

def _blocks(flat: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(values zero-padded to whole blocks [n_blocks, block], absmax per block fp32)."""
    n = flat.size
    padded = np.zeros(-(-n // block) * block, np.float32)
    padded[:n] = flat
    padded = padded.reshape(-1, block)
    return padded, np.abs(padded).max(axis=1)


def nf4_quantize_flat(w: np.ndarray, block: int = NF4_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 [ceil(n/2)], absmax fp32 [ceil(n/block)]) of `w` flattened row-major."""
    flat = np.asarray(w, np.float32).reshape(-1)
    padded, absmax = _blocks(flat, block)
    inv = (np.float32(1.0) / np.maximum(absmax, np.float32(1e-38))).astype(np.float32)
    scaled = np.clip(padded * inv[:, None], -1.0, 1.0).reshape(-1)[:flat.size]
    q = np.searchsorted(_NF4_MIDPOINTS, scaled, side="left").astype(np.uint8)
    if q.size % 2:  # bitsandbytes pads an odd count with a scaled 0.0
        q = np.append(q, np.uint8(np.searchsorted(_NF4_MIDPOINTS, np.float32(0.0), side="left")))
    return (q[0::2] << 4) | q[1::2], absmax


def _lookup_table(code: np.ndarray) -> np.ndarray:
    """bitsandbytes' CPU `build_quantize_lut`: for each of 65536 evenly spaced points of [-1, 1], the
    index of the code whose midpoints bracket it (a point on a midpoint takes the lower code)."""
    midpoints = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    grid = (np.float32(-1.0) + (np.float32(2.0) * np.arange(_LUT_SIZE, dtype=np.float32)) / np.float32(_LUT_SIZE - 1))
    return np.searchsorted(midpoints, grid.astype(np.float32), side="left").astype(np.uint8)


_LUT_SIZE = 65536
_DYNAMIC_LUT = _lookup_table(DYNAMIC_CODE)


def nested_quantize(absmax: np.ndarray, offset: np.float32 | None = None) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """(codes uint8 like absmax, absmax2 fp32 [ceil(n/256)], offset): absmax - mean in dynamic 8 bit.

    bitsandbytes' CPU `quantize_blockwise`: each value times the block's reciprocal absmax, clipped,
    mapped to one of 65536 grid points, `uint16((x + 1) * 0.5 * 65535 + 0.5)`, and the grid point to
    its code (`_lookup_table`). `offset` defaults to the correctly rounded mean; bitsandbytes takes
    torch's fp32 mean, whose summation order (its vector width) can move the last bit.
    """
    flat = np.asarray(absmax, np.float32).reshape(-1)
    if offset is None:
        offset = np.float32(flat.astype(np.float64).mean())
    shifted = (flat - np.float32(offset)).astype(np.float32)
    padded, absmax2 = _blocks(shifted, NESTED_BLOCK)
    inv = (np.float32(1.0) / np.maximum(absmax2, np.float32(1e-38))).astype(np.float32)
    normed = np.clip((padded * inv[:, None]).astype(np.float32), -1.0, 1.0).reshape(-1)[:flat.size]
    half = ((normed + np.float32(1.0)) * np.float32(0.5)).astype(np.float32)
    grid = ((half * np.float32(_LUT_SIZE - 1)).astype(np.float32) + np.float32(0.5)).astype(np.uint16)
    codes = np.where(np.repeat(absmax2, NESTED_BLOCK)[:flat.size] == 0, 0, _DYNAMIC_LUT[grid])
    return codes.astype(np.uint8).reshape(np.shape(absmax)), absmax2, np.float32(offset)


def int8_quantize(w_oi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(CB int8 [out, in], SCB fp32 [out]) as `bitsandbytes.nn.Int8Params` stores a weight [out, in]."""
    half = np.asarray(w_oi, np.float32).astype(np.float16)
    scb = np.abs(half).max(axis=1).astype(np.float32)
    # torch evaluates `127.0 / row_stats` as `row_stats.reciprocal() * 127.0`: two fp32 roundings.
    scale = ((np.float32(1.0) / scb).astype(np.float32) * np.float32(127.0)).astype(np.float32)
    cb = np.round(half * scale[:, None])
    return cb.astype(np.int8), scb


# --------------------------------------------------------------------------------- frozen leaves

def _register(cls):
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=[f for f in fields if f != "dtype"], meta_fields=["dtype"])


@_register
@dataclasses.dataclass(frozen=True)
class NF4Weight:
    """An NF4 kernel: `codes` uint8 [out, in/2], `absmax` fp32 [out, in/64] (or, double-quantized,
    uint8 codes with `absmax2` [ceil(out*in/64/256)] and `offset` []), any leading (layer) axes.
    `dtype`: the weight's dtype before quantization (bitsandbytes' `quant_state.dtype`)."""

    codes: Any
    absmax: Any
    absmax2: Any = None
    offset: Any = None
    dtype: str = "float32"

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def shape(self) -> tuple[int, ...]:
        """The kernel's logical shape [.., in, out] (what the weight is, not how it is stored)."""
        *lead, out, half = self.codes.shape
        return (*lead, 2 * half, out)

    def dequantize(self, dtype: Any) -> jax.Array:
        """The [.., in, out] kernel in `dtype`: fp32 `code[q] * absmax`, cast to the weight's dtype, then `dtype`."""
        *lead, out, half = self.codes.shape
        absmax = self.absmax
        if self.nested:
            n = absmax.shape[-2] * absmax.shape[-1]
            scale = jnp.repeat(self.absmax2, NESTED_BLOCK, axis=-1)[..., :n].reshape(absmax.shape)
            absmax = jnp.take(jnp.asarray(DYNAMIC_CODE), absmax.astype(jnp.int32)) * scale
            absmax = absmax + jnp.asarray(self.offset, jnp.float32)[..., None, None]
        idx = jnp.stack([self.codes >> 4, self.codes & 15], axis=-1).reshape(*lead, out, -1, NF4_BLOCK)
        w = jnp.take(jnp.asarray(NF4_CODE), idx.astype(jnp.int32)) * absmax[..., None]
        w = w.reshape(*lead, out, 2 * half).astype(self.dtype).astype(dtype)
        return jnp.swapaxes(w, -1, -2)


@_register
@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """An int8 kernel as `Int8Params`: `cb` int8 [out, in], `scb` fp32 [out], any leading axes."""

    cb: Any
    scb: Any
    dtype: str = "float32"

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, out, inp = self.cb.shape
        return (*lead, inp, out)

    def dequantize(self, dtype: Any) -> jax.Array:
        w = (self.cb.astype(jnp.float32) * self.scb[..., None]) * _INV_127
        return jnp.swapaxes(w.astype(self.dtype).astype(dtype), -1, -2)


def is_quantized(x: Any) -> bool:
    return isinstance(x, (NF4Weight, Int8Weight))


def quantize_oi(w_oi: np.ndarray, kind: str, dtype: Any, double_quant: bool = False) -> NF4Weight | Int8Weight:
    """One HF weight [out, in] (cast to `dtype` first, as transformers loads it) as a frozen leaf of numpy arrays."""
    dtype = jnp.dtype(dtype)
    w = np.asarray(w_oi).astype(dtype).astype(np.float32)
    out, inp = w.shape
    if kind == "int8":
        cb, scb = int8_quantize(w)
        return Int8Weight(cb, scb, dtype.name)
    if kind != "nf4":
        raise QuantError(f"base_quant {kind!r}: not one of {', '.join(BASE_QUANTS)}")
    if inp % NF4_BLOCK:
        raise QuantError(f"nf4 needs input sizes that are multiples of {NF4_BLOCK} (blocks within rows); got [out={out}, in={inp}]")
    packed, absmax = nf4_quantize_flat(w)
    codes, absmax = packed.reshape(out, inp // 2), absmax.reshape(out, inp // NF4_BLOCK)
    if not double_quant:
        return NF4Weight(codes, absmax, dtype=dtype.name)
    q2, absmax2, offset = nested_quantize(absmax)
    return NF4Weight(codes, q2, absmax2, np.asarray(offset, np.float32), dtype.name)


def stack_leaves(leaves: list) -> NF4Weight | Int8Weight:
    """Per-layer leaves stacked on a new leading (layer) axis."""
    return jax.tree.map(lambda *xs: np.stack(xs), *leaves)


# ------------------------------------------------------------------------ shapes and logical axes

def abstract_leaf(kind: str, in_out: tuple[int, int], axes: tuple[str, str], dtype: Any,
                  double_quant: bool = False) -> tuple[Any, Any]:
    """(leaf of ShapeDtypeStructs, leaf of logical-axis tuples) for a kernel [in, out] with `axes`."""
    inp, out = in_out
    a_in, a_out = axes
    name = jnp.dtype(dtype).name
    sds = jax.ShapeDtypeStruct
    if kind == "int8":
        return (Int8Weight(sds((out, inp), jnp.int8), sds((out,), jnp.float32), name),
                Int8Weight((a_out, a_in), (a_out,), name))
    if kind != "nf4":
        raise QuantError(f"base_quant {kind!r}: not one of {', '.join(BASE_QUANTS)}")
    if inp % NF4_BLOCK:
        raise QuantError(f"model.base_quant=nf4 needs every quantized projection's input size to be a multiple of "
                         f"{NF4_BLOCK}; a projection has {inp}")
    blocks = inp // NF4_BLOCK
    if not double_quant:
        return (NF4Weight(sds((out, inp // 2), jnp.uint8), sds((out, blocks), jnp.float32), dtype=name),
                NF4Weight((a_out, a_in), (a_out, a_in), dtype=name))
    n2 = -(-out * blocks // NESTED_BLOCK)
    return (NF4Weight(sds((out, inp // 2), jnp.uint8), sds((out, blocks), jnp.uint8), sds((n2,), jnp.float32),
                      sds((), jnp.float32), name),
            NF4Weight((a_out, a_in), (a_out, a_in), (None,), (), name))


def kernel_param(module: Any, in_out: tuple[int, int], axes: tuple[str, str], runtime: Any) -> NF4Weight | Int8Weight:
    """The quantized `kernel` param of a flax Linear: each field boxed with its logical axes (so
    `model.abstract_params` yields the quantized shapes and names, and nn.scan adds the layer axis).
    Initialised to zeros: a quantized base only ever comes from a checkpoint (`load_quantized`)."""
    import flax.linen as nn

    abstract, names = abstract_leaf(runtime.base_quant, in_out, axes, runtime.param_dtype, runtime.double_quant)

    def init(_):
        return jax.tree.map(lambda s, n: nn.LogicallyPartitioned(jnp.zeros(s.shape, s.dtype), n), abstract, names)

    return module.param("kernel", init)


def load_quantized(read: Any, hf_names: list[str], abstract: Any, shardings: Any) -> Any:
    """A stacked quantized kernel from HF tensors [out, in], quantized one layer at a time on the host.

    `read(name)` gives one layer's tensor; `abstract`/`shardings`: the leaf's ShapeDtypeStructs and
    shardings. Host memory: one layer in fp32 plus this projection's quantized stack (1/4 to 1/2 of it
    in bf16), never the whole model; each device then gets its shard of every field.
    """
    layers = [quantize_oi(read(name), _kind(abstract), abstract.dtype, abstract_nested(abstract))
              for name in hf_names]
    host = stack_leaves(layers)
    return jax.tree.map(lambda h, s, sh: jax.make_array_from_callback(s.shape, sh, lambda idx: h[idx]),
                        host, abstract, shardings)


def _kind(leaf: Any) -> str:
    return "nf4" if isinstance(leaf, NF4Weight) else "int8"


def abstract_nested(leaf: Any) -> bool:
    return isinstance(leaf, NF4Weight) and leaf.absmax2 is not None
