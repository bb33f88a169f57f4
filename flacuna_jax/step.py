"""Loss, train step and eval step, jitted over the (data, fsdp, tensor) mesh.

Loss: the sum of the token cross-entropies over every trained token of the GLOBAL batch, divided
by the number of those tokens (not a mean of per-example or per-micro-batch means). The log-softmax
is fp32. It is computed from the final hidden states in chunks of `loss_chunk` positions, and its
gradient is fused into the forward pass (softmax - onehot, multiplied back through the output
projection chunk by chunk), so the fp32 [b, t, vocab] logits never exist at once, are never
stored for the backward pass and never recomputed.

Train step (`make_train_step`): one `jax.jit` with explicit in/out shardings; the `TrainState` is
donated. The global batch [B, T] (B = per_device x (data x fsdp) x accum) is viewed as
[accum, B/accum, T] so that every device keeps its own rows, and a `lax.scan` accumulates the
gradients of the micro-batches. Only the trainable tree is differentiated; the frozen base is an
argument without gradient. If the loss or the gradient norm is not finite, the update is skipped:
params and optimizer state stay as they were, `skipped` and `nonfinite_run` count it.

Array names: b batch, t length, d model, v vocab, c chunk, n chunks, a accumulation steps.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.custom_derivatives import SymbolicZero
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flacuna_jax.lora import merge_params
from flacuna_jax.model import Llama
from flacuna_jax.sharding import batch_sharding, fit_spec, logical_to_mesh_spec
from flacuna_jax.train_state import TrainState

Batch = dict[str, jax.Array]
BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


def abstract_batch(rows: int, seq_len: int, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The train step's global batch as ShapeDtypeStructs (the dtypes `train_data.DataFeed` feeds)."""
    return {k: jax.ShapeDtypeStruct((rows, seq_len), jnp.float32 if k == "loss_mask" else jnp.int32,
                                    sharding=batch_sharding(mesh)) for k in BATCH_KEYS}


def _split_chunks(hidden_btd: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array, chunk: int):
    """[b, t, ...] -> [n, b, c, ...] (the last chunk zero-padded, its padding masked out)."""
    b, t, d = hidden_btd.shape
    pad = -t % chunk
    if pad:
        hidden_btd = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
        mask_bt = jnp.pad(mask_bt, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    h_nbcd = hidden_btd.reshape(b, n, chunk, d).swapaxes(0, 1)
    y_nbc = targets_bt.reshape(b, n, chunk).swapaxes(0, 1)
    m_nbc = mask_bt.reshape(b, n, chunk).swapaxes(0, 1).astype(jnp.float32)
    return h_nbcd, y_nbc, m_nbc


def _chunk_loss(h_bcd, w_dv, y_bc, m_bc):
    """(Σ m · (log Z - logit[y]), fp32 logits [b, c, v], log Z [b, c]) of one chunk."""
    logits_bcv = jnp.einsum("bcd,dv->bcv", h_bcd, w_dv, preferred_element_type=jnp.float32)
    logz_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
    picked_bc = jnp.take_along_axis(logits_bcv, y_bc[..., None], axis=-1)[..., 0]
    return jnp.sum((logz_bc - picked_bc) * m_bc), logits_bcv, logz_bc


def _scan_chunks(body, init, xs, n: int):
    """lax.scan over the leading chunk axis, or one direct call when there is a single chunk."""
    if n == 1:
        carry, ys = body(init, jax.tree.map(lambda x: x[0], xs))
        return carry, jax.tree.map(lambda y: y[None], ys)
    return jax.lax.scan(body, init, xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _cross_entropy(hidden_btd, w_dv, targets_bt, mask_bt, chunk):
    """Σ m · (-log softmax(h W)[y]); `chunk` is static; h and W share one dtype."""
    h, y, m = _split_chunks(hidden_btd, targets_bt, mask_bt, chunk)
    total, _ = _scan_chunks(lambda acc, xs: (acc + _chunk_loss(xs[0], w_dv, xs[1], xs[2])[0], None),
                            jnp.zeros((), jnp.float32), (h, y, m), h.shape[0])
    return total


def _cross_entropy_fwd(hidden_btd, w_dv, targets_bt, mask_bt, chunk):
    """The loss and, chunk by chunk, its gradient: d loss / d logits = m · (softmax - onehot(y)).

    Only [b, t, d] (and [d, v] when the projection itself is trained) is kept for the backward
    pass: no logits are stored across chunks and none are recomputed.
    """
    hidden, w = hidden_btd.value, w_dv.value
    want_w = w_dv.perturbed
    h, y, m = _split_chunks(hidden, targets_bt.value, mask_bt.value, chunk)

    def body(carry, xs):
        loss_acc, dw_acc = carry
        h_bcd, y_bc, m_bc = xs
        loss, logits_bcv, logz_bc = _chunk_loss(h_bcd, w, y_bc, m_bc)
        onehot_bcv = jnp.arange(logits_bcv.shape[-1], dtype=y_bc.dtype) == y_bc[..., None]
        dlogits_bcv = ((jnp.exp(logits_bcv - logz_bc[..., None]) - onehot_bcv) * m_bc[..., None]).astype(w.dtype)
        dh_bcd = jnp.einsum("bcv,dv->bcd", dlogits_bcv, w, preferred_element_type=jnp.float32)
        if want_w:
            dw_acc = dw_acc + jnp.einsum("bcd,bcv->dv", h_bcd, dlogits_bcv, preferred_element_type=jnp.float32)
        return (loss_acc + loss, dw_acc), dh_bcd

    dw0 = jnp.zeros(w.shape, jnp.float32) if want_w else None
    (total, dw_dv), dh_nbcd = _scan_chunks(body, (jnp.zeros((), jnp.float32), dw0), (h, y, m), h.shape[0])
    n, b, c, d = dh_nbcd.shape
    dh_btd = dh_nbcd.swapaxes(0, 1).reshape(b, n * c, d)[:, :hidden.shape[1]]
    return total, (dh_btd, dw_dv, jnp.zeros((0,), hidden.dtype))


def _cross_entropy_bwd(chunk, res, g):
    dh_btd, dw_dv, dtype_0 = res  # dtype_0: an empty array carrying the dtype of h and W
    if isinstance(g, SymbolicZero):
        g = jnp.zeros((), jnp.float32)
    dw = None if dw_dv is None else (g * dw_dv).astype(dtype_0.dtype)
    return (g * dh_btd).astype(dtype_0.dtype), dw, None, None


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd, symbolic_zeros=True)


def chunked_cross_entropy(hidden_btd: jax.Array, kernel_dv: jax.Array, targets_bt: jax.Array,
                          mask_bt: jax.Array, chunk: int = 0) -> jax.Array:
    """Σ mask · (-log softmax(h W)[target]) in fp32, over chunks of `chunk` positions (0: one chunk).

    Differentiable in `hidden_btd` and `kernel_dv` with a fused rule: the forward pass also forms
    the gradient of each chunk (softmax - onehot, times the mask) and multiplies it straight back
    through W, so the backward pass neither stores nor recomputes the [b, t, vocab] logits.
    """
    t = hidden_btd.shape[1]
    chunk = t if chunk <= 0 or chunk >= t else chunk
    return _cross_entropy(hidden_btd, kernel_dv.astype(hidden_btd.dtype), targets_bt, mask_bt, chunk)


def loss_sum(model: Llama, trainable: Any, frozen: Any, batch: Batch, dropout_rng: jax.Array | None,
             loss_chunk: int = 0, mesh: Mesh | None = None, rows_b: jax.Array | None = None) -> jax.Array:
    """Σ over trained tokens of the token cross-entropy (fp32) for one (micro-)batch; `rows_b` are the
    rows' indices in the global batch (their dropout masks' seeds)."""
    params = merge_params(trainable, frozen)
    kernel_dv = model.output_embedding(params)
    if mesh is not None:  # gather the FSDP-sharded output projection once, not once per loss chunk
        spec = fit_spec(logical_to_mesh_spec((None, "vocab")), kernel_dv.shape, mesh)
        kernel_dv = jax.lax.with_sharding_constraint(kernel_dv, NamedSharding(mesh, spec))
    deterministic = dropout_rng is None
    # The mesh in context lets the model pin its activations (model.constrain).
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if mesh is not None else contextlib.nullcontext():
        hidden_btd = model.apply({"params": params}, batch["input_ids"], batch["positions"], batch["segment_ids"],
                                 deterministic=deterministic, rngs=None if deterministic else {"dropout": dropout_rng},
                                 return_hidden=True, rows_b=rows_b)
    return chunked_cross_entropy(hidden_btd, kernel_dv, batch["targets"], batch["loss_mask"], loss_chunk)


def _micro_batches(batch: Batch, accum: int, mesh: Mesh | None) -> Batch:
    """[B, T] -> [accum, B/accum, T] keeping each device's rows on it (row i -> (i % accum, i // accum));
    "rows" [accum, B/accum] holds each row's index in the global batch."""
    def split(x):
        b = x.shape[0]
        if b % accum:
            raise ValueError(f"batch of {b} rows is not divisible into {accum} micro-batches")
        x = x.reshape(b // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        if mesh is not None:
            spec = PartitionSpec(None, *logical_to_mesh_spec(("batch",) + (None,) * (x.ndim - 2)))
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
        return x
    rows = jnp.arange(batch["input_ids"].shape[0], dtype=jnp.int32)
    if mesh is not None:
        rows = jax.lax.with_sharding_constraint(rows, NamedSharding(mesh, logical_to_mesh_spec(("batch",))))
    return {**{k: split(batch[k]) for k in BATCH_KEYS}, "rows": split(rows)}


def loss_and_grads(model: Llama, trainable: Any, frozen: Any, batch: Batch, *, accum: int = 1,
                   dropout_rng: jax.Array | None = None, loss_chunk: int = 0,
                   mesh: Mesh | None = None) -> tuple[jax.Array, Any, jax.Array]:
    """(mean loss over the trained tokens of `batch`, its gradient w.r.t. `trainable`, #trained tokens).

    The batch is split into `accum` micro-batches scanned one after another; each contributes
    grad(Σ its token losses) / N with N counted over the whole batch first, so the result equals the
    single-batch gradient up to summation order. Every micro-batch uses the same `dropout_rng`: a row's
    mask is seeded by its index in the global batch, so it does not depend on `accum` or the mesh.
    """
    n_tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    denom = jnp.maximum(n_tokens, 1.0)
    micro = _micro_batches(batch, accum, mesh)

    def micro_grad(mb):
        f = lambda p: loss_sum(model, p, frozen, mb, dropout_rng, loss_chunk, mesh, mb["rows"]) / denom
        return jax.value_and_grad(f)(trainable)

    if accum == 1:
        loss, grads = micro_grad(jax.tree.map(lambda x: x[0], micro))
        return loss, grads, n_tokens

    def body(carry, mb):
        loss_acc, grad_acc = carry
        loss, grads = micro_grad(mb)
        return (loss_acc + loss, jax.tree.map(jnp.add, grad_acc, grads)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32 if p.dtype != jnp.float64 else p.dtype), trainable)
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)
    return loss, grads, n_tokens


def train_step(state: TrainState, frozen: Any, batch: Batch, *, model: Llama, tx: optax.GradientTransformation,
               schedule: optax.Schedule, accum: int, loss_chunk: int, mesh: Mesh | None,
               dropout: bool) -> tuple[TrainState, dict]:
    """One optimizer step on one global batch; a non-finite loss or gradient skips the update."""
    rng = jax.random.fold_in(state.rng, state.step) if dropout else None
    loss, grads, n_tokens = loss_and_grads(model, state.params, frozen, batch, accum=accum, dropout_rng=rng,
                                           loss_chunk=loss_chunk, mesh=mesh)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    applied = state.step - state.skipped  # optax's update count: the schedule's index
    new_state = state.replace(
        step=state.step + 1, params=keep(new_params, state.params), opt_state=keep(new_opt, state.opt_state),
        skipped=state.skipped + (~finite).astype(jnp.int32),
        nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1).astype(jnp.int32),
    )
    metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": n_tokens, "lr": schedule(applied),
               "finite": finite, "skipped_steps": new_state.skipped, "nonfinite_run": new_state.nonfinite_run}
    return new_state, metrics


def make_train_step(model: Llama, tx: optax.GradientTransformation, schedule: optax.Schedule, mesh: Mesh,
                    state_shardings: TrainState, frozen_shardings: Any, *, accum: int = 1, loss_chunk: int = 0,
                    dropout: bool = True) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict]]:
    """`step(state, frozen, batch) -> (state, metrics)`, jitted with explicit shardings, state donated."""
    def step(state, frozen, batch):
        return train_step(state, frozen, batch, model=model, tx=tx, schedule=schedule, accum=accum,
                          loss_chunk=loss_chunk, mesh=mesh, dropout=dropout)

    batch_sh = {k: batch_sharding(mesh) for k in BATCH_KEYS}
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch_sh),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def make_eval_step(model: Llama, mesh: Mesh, param_shardings: Any, frozen_shardings: Any, *,
                   loss_chunk: int = 0) -> Callable[[Any, Any, Batch], tuple[jax.Array, jax.Array]]:
    """`eval_step(trainable, frozen, batch) -> (Σ token losses, #trained tokens)` without dropout."""
    def step(trainable, frozen, batch):
        total = loss_sum(model, trainable, frozen, batch, None, loss_chunk, mesh)
        return total, jnp.sum(batch["loss_mask"].astype(jnp.float32))

    batch_sh = {k: batch_sharding(mesh) for k in BATCH_KEYS}
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step, in_shardings=(param_shardings, frozen_shardings, batch_sh),
                   out_shardings=(replicated, replicated))
