"""Greedy tokens on the CPU from a half-precision screen of the output projection, exactly.

Why: at batch 1 a decode step reads every weight once, and the output projection is a fifth of them
(SmolLM2: 113 MB of 538). A greedy step needs only the argmax of the logits, not the logits. The
kernel (`csrc/greedy.cc`) multiplies the hidden state by a half-precision copy of the projection
(half the bytes), bounds how far each screened logit can be from the float one the model computes,
and recomputes in float, with the same arithmetic and so the same bits, only the columns that could
still be the maximum (almost always one or two). The token is the one the float logits' first-index
argmax gives; a step the screen cannot settle (more than 48 candidates, or a value that is not
finite) computes its logits in full instead.

`model.pack_output` adds the screen's weights to a packed tree (`screen_weights`, under
"output_screen") where half precision can hold the projection; `generate`'s decoder uses it for
greedy steps where it is there and the kernel builds (`usable`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flacuna_jax import matmul_cpu, native

Array = jax.Array
TARGET = "flacuna_greedy"
HALF_MAX = float(np.finfo(np.float16).max)


def screen_weights(packed_pkc: Array, output_kv: Array) -> dict | None:
    """{"half": the packed output projection rounded to half, "norms": each column's 2-norm, rounded
    up}, or None where a weight is beyond half's range."""
    k = output_kv.shape[0]
    if float(jnp.max(jnp.abs(output_kv))) >= HALF_MAX:
        return None
    squares = jnp.sum(jnp.square(output_kv.astype(jnp.float32)), axis=0)
    # A float32 sum of k squares is within k 2^-24 of itself; twice that, and the norm is an upper bound.
    norms = jnp.sqrt(squares) * np.float32(1 + (k + 4) * 2.0 ** -23)
    return {"half": packed_pkc.astype(jnp.float16), "norms": norms}


def usable(params: dict) -> str | None:
    """None where `params` has the screen and the kernel runs, else why not."""
    if "output_screen" not in params:
        return "the params have no output screen (model.pack_output)"
    return native.register("FlacunaGreedy", TARGET)


def screen_tokens(h_bd: Array, params: dict) -> Array:
    """[b] int32: each row's greedy token, or -1 where the screen could not settle it."""
    screen = params["output_screen"]
    out = jax.ShapeDtypeStruct(h_bd.shape[:1], jnp.int32)
    return jax.ffi.ffi_call(TARGET, out)(h_bd.astype(jnp.float32), screen["half"], params["output_packed"],
                                         screen["norms"])


def logits(h_bd: Array, params: dict, vocab_size: int) -> Array:
    """The float logits, as the model computes them from `output_packed` (`model.Llama`)."""
    return matmul_cpu.project(h_bd.astype(jnp.float32), params["output_packed"], vocab_size)
