"""Loss, train step and eval step, jitted over the (data, fsdp, tensor) mesh.

Loss: the sum of the token cross-entropies over every trained token of the GLOBAL batch, divided
by the number of those tokens (not a mean of per-example or per-micro-batch means). The log-softmax
is fp32. It is computed from the final hidden states in chunks of `loss_chunk` positions, each
chunk rematerialised, so the fp32 [b, t, vocab] logits never exist at once.

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
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flacuna_jax.lora import merge_params
from flacuna_jax.model import Llama
from flacuna_jax.sharding import batch_sharding, fit_spec, logical_to_mesh_spec
from flacuna_jax.train_state import TrainState

Batch = dict[str, jax.Array]
BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


def chunked_cross_entropy(hidden_btd: jax.Array, kernel_dv: jax.Array, targets_bt: jax.Array,
                          mask_bt: jax.Array, chunk: int = 0) -> jax.Array:
    """Σ mask · (-log softmax(h W)[target]) in fp32, over chunks of `chunk` positions (0: one chunk)."""
    b, t, d = hidden_btd.shape
    chunk = t if chunk <= 0 or chunk >= t else chunk
    pad = -t % chunk
    if pad:
        hidden_btd = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
        mask_bt = jnp.pad(mask_bt, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    h_nbcd = hidden_btd.reshape(b, n, chunk, d).swapaxes(0, 1)
    y_nbc = targets_bt.reshape(b, n, chunk).swapaxes(0, 1)
    m_nbc = mask_bt.reshape(b, n, chunk).swapaxes(0, 1).astype(jnp.float32)
    w_dv = kernel_dv.astype(hidden_btd.dtype)

    @jax.checkpoint
    def chunk_loss(h_bcd, y_bc, m_bc):
        logits_bcv = jnp.einsum("bcd,dv->bcv", h_bcd, w_dv, preferred_element_type=jnp.float32)
        logz_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
        picked_bc = jnp.take_along_axis(logits_bcv, y_bc[..., None], axis=-1)[..., 0]
        return jnp.sum((logz_bc - picked_bc) * m_bc)

    if n == 1:
        return chunk_loss(h_nbcd[0], y_nbc[0], m_nbc[0])
    total, _ = jax.lax.scan(lambda acc, xs: (acc + chunk_loss(*xs), None), jnp.zeros((), jnp.float32),
                            (h_nbcd, y_nbc, m_nbc))
    return total


def loss_sum(model: Llama, trainable: Any, frozen: Any, batch: Batch, dropout_rng: jax.Array | None,
             loss_chunk: int = 0, mesh: Mesh | None = None) -> jax.Array:
    """Σ over trained tokens of the token cross-entropy (fp32) for one (micro-)batch."""
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
                                 return_hidden=True)
    return chunked_cross_entropy(hidden_btd, kernel_dv, batch["targets"], batch["loss_mask"], loss_chunk)


def _micro_batches(batch: Batch, accum: int, mesh: Mesh | None) -> Batch:
    """[B, T] -> [accum, B/accum, T] keeping each device's rows on it (row i -> (i % accum, i // accum))."""
    def split(x):
        b = x.shape[0]
        if b % accum:
            raise ValueError(f"batch of {b} rows is not divisible into {accum} micro-batches")
        x = x.reshape(b // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        if mesh is not None:
            spec = PartitionSpec(None, *logical_to_mesh_spec(("batch",) + (None,) * (x.ndim - 2)))
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
        return x
    return {k: split(batch[k]) for k in BATCH_KEYS}


def loss_and_grads(model: Llama, trainable: Any, frozen: Any, batch: Batch, *, accum: int = 1,
                   dropout_rng: jax.Array | None = None, loss_chunk: int = 0,
                   mesh: Mesh | None = None) -> tuple[jax.Array, Any, jax.Array]:
    """(mean loss over the trained tokens of `batch`, its gradient w.r.t. `trainable`, #trained tokens).

    The batch is split into `accum` micro-batches scanned one after another; each contributes
    grad(Σ its token losses) / N with N counted over the whole batch first, so the result equals the
    single-batch gradient up to summation order.
    """
    n_tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    denom = jnp.maximum(n_tokens, 1.0)
    micro = _micro_batches(batch, accum, mesh)

    def micro_grad(i, mb):
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
        f = lambda p: loss_sum(model, p, frozen, mb, rng, loss_chunk, mesh) / denom
        return jax.value_and_grad(f)(trainable)

    if accum == 1:
        loss, grads = micro_grad(0, jax.tree.map(lambda x: x[0], micro))
        return loss, grads, n_tokens

    def body(carry, xs):
        loss_acc, grad_acc = carry
        i, mb = xs
        loss, grads = micro_grad(i, mb)
        return (loss_acc + loss, jax.tree.map(jnp.add, grad_acc, grads)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32 if p.dtype != jnp.float64 else p.dtype), trainable)
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), (jnp.arange(accum), micro))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)
    return loss, grads, n_tokens


def train_step(state: TrainState, frozen: Any, batch: Batch, *, model: Llama, tx: optax.GradientTransformation,
               schedule: optax.Schedule, accum: int, loss_chunk: int, mesh: Mesh | None,
               dropout: bool) -> tuple[TrainState, dict]:
    """One optimizer step on one global batch; a non-finite loss or gradient skips the update."""
    rng = jax.random.fold_in(state.rng, state.step) if dropout else None
    loss, grads, n_tokens = loss_and_grads(model, state.params, frozen, batch, accum=accum, dropout_rng=rng,
                                           loss_chunk=loss_chunk, mesh=mesh)
    grad_norm = optax.global_norm(grads)
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
