"""The projections of an inference model on the CPU: one C++ kernel (`csrc/matmul.cc`) over packed weights.

Why: a decode step multiplies a few rows by every weight of the model. XLA's CPU dots read a [k, n]
kernel in blocks of strided pieces and, at 8-32 rows, run far below both the memory's speed and the
cores' peak. Packed once into panels of 48 columns ([ceil(n / 48), k, 48], each panel contiguous),
the kernel streams each panel once, a chunk or two ahead, while multiplying an earlier chunk by
every block of 8 rows from L1. SmolLM2 fp32, all the model's matmuls at 1 / 8 / 16 / 32 rows:
see `benchmarks/decode_profile.py --matmul-rows` (README, "The projections on a CPU").

Projections that read the same input (q/k/v, gate/up) are packed side by side (`pack_group`) and
run as one call: SmolLM2's decode step makes 4 calls a layer instead of 7, ~0.8 ms less a step at 1
and at 8 rows (each call's start: its helper joining, its first chunk read before any prefetch).

Numerics: each output is an fp32 sum of chunk sums, each chunk 128 products added in order with fused
multiply-adds: within XLA's own rounding of the same product, and the same bits whatever the other
rows of the batch.

`model.unrolled` packs the kernels of the decoder layers' projections, grouped, and adds a packed
copy of the output projection (and the greedy screen's, `greedy_cpu`), when the model runs on one
CPU device in float32 (`Runtime.matmul = "native"`);
`project` then runs the kernel, or, where it cannot be built, an XLA contraction over the packed
layout (`xla_project`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flacuna_jax import native

log = logging.getLogger(__name__)

Array = jax.Array
KERNELS = ("native", "xla")  # model.unrolled(matmul=...): packed for this kernel, or as they are
PANEL = 48  # columns per panel: 3 x 16 floats, the kernel's register block
TARGET = "flacuna_matmul"


def panel_count(n: int) -> int:
    """Panels that hold n columns: ceil(n / 48)."""
    return -(-n // PANEL)


def packed_shape(k: int, n: int) -> tuple[int, int, int]:
    return (panel_count(n), k, PANEL)


def pack(kernel_kn: Array) -> Array:
    """[k, n] -> [ceil(n / 48), k, 48]: column j of panel p is column 48 p + j (zeros past n)."""
    k, n = kernel_kn.shape
    p = panel_count(n)
    padded = jnp.pad(kernel_kn, ((0, 0), (0, p * PANEL - n)))
    return padded.reshape(k, p, PANEL).transpose(1, 0, 2)


def unpack(packed_pkc: Array, n: int) -> Array:
    """The inverse of `pack`: [k, n]."""
    p, k, c = packed_pkc.shape
    return packed_pkc.transpose(1, 0, 2).reshape(k, p * c)[:, :n]


def group_shape(k: int, widths: Sequence[int]) -> tuple[int, int, int]:
    """The shape of `pack_group` over kernels [k, n] for n in `widths`."""
    return (sum(map(panel_count, widths)), k, PANEL)


def pack_group(kernels_kn: Sequence[Array]) -> Array:
    """Kernels that read the same input, packed side by side, each from a panel boundary: one call of
    `project_group` reads them all (a decode step's q/k/v, gate/up), instead of one call each."""
    return jnp.concatenate([pack(kernel) for kernel in kernels_kn], axis=0)


def unpack_group(packed_pkc: Array, widths: Sequence[int]) -> list[Array]:
    """The inverse of `pack_group`: the kernels [k, n] for n in `widths`."""
    starts = np.cumsum([0, *map(panel_count, widths)])
    return [unpack(packed_pkc[a:b], n) for a, b, n in zip(starts, starts[1:], widths)]


def project_group(x: Array, packed_pkc: Array, widths: Sequence[int]) -> list[Array]:
    """x @ each kernel of a `pack_group`, in one call: [..., n] for n in `widths`."""
    panels = list(map(panel_count, widths))
    y = project(x, packed_pkc, PANEL * sum(panels))
    starts = PANEL * np.cumsum([0, *panels])
    return [y[..., a:a + n] for a, n in zip(starts, widths)]


def _registration() -> str | None:
    return native.register("FlacunaMatmul", TARGET)


def refusal(dtype: jnp.dtype | None = None) -> str | None:
    """Why the kernel cannot run, or None if it can: it needs the CPU backend, float32 and a C++ compiler."""
    if jax.default_backend() != "cpu":
        return f"it runs on the CPU, not {jax.default_backend()}"
    if dtype is not None and jnp.dtype(dtype) != jnp.float32:
        return f"dtype {jnp.dtype(dtype).name} (it takes float32)"
    return _registration()


def matmul(x: Array, packed_pkc: Array, n: int) -> Array:
    """x [..., k] @ the packed kernel -> [..., n], by the native kernel (check `refusal` first)."""
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (n,), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x, packed_pkc, n=np.int64(n))


def xla_project(x: Array, packed_pkc: Array, n: int) -> Array:
    """The same product by XLA, over the packed layout (no unpacked copy of the kernel)."""
    y = jnp.einsum("...k,pkc->...pc", x, packed_pkc)
    return y.reshape(x.shape[:-1] + (-1,))[..., :n]


_logged: set[str] = set()


def project(x: Array, packed_pkc: Array, n: int) -> Array:
    """x @ kernel for a packed kernel: the native kernel where it runs, else XLA's (the reason logged once)."""
    reason = refusal(x.dtype) or refusal(packed_pkc.dtype)
    if reason is None:
        return matmul(x, packed_pkc, n)
    if reason not in _logged:
        _logged.add(reason)
        log.warning("matmul: XLA's product over packed kernels instead of the native CPU kernel: %s", reason)
    return xla_project(x, packed_pkc, n)
