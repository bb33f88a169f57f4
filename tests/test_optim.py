"""Optimizer chain: schedules, clipping, weight decay, AdamW/SGD updates, state only for the trainable tree."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

from flacuna_jax.config import OptimConfig
from flacuna_jax.optim import make_optimizer, make_schedule


def test_warmup_then_cosine_linear_constant():
    cfg = OptimConfig(lr=2e-5, warmup_steps=3000, schedule="cosine")
    s = make_schedule(cfg, 10_000)
    assert float(s(0)) == pytest.approx(2e-5 / 3000)
    assert float(s(1499)) == pytest.approx(2e-5 * 1500 / 3000, rel=1e-5)
    assert float(s(2999)) == pytest.approx(2e-5)
    assert float(s(3000)) == pytest.approx(2e-5)
    assert float(s(3000 + 3500)) == pytest.approx(1e-5, rel=1e-5)  # cosine half-way
    assert float(s(10_000)) == pytest.approx(0.0, abs=1e-12)
    lin = make_schedule(dataclasses.replace(cfg, schedule="linear", warmup_steps=0), 100)
    assert [float(lin(i)) for i in (0, 50, 100)] == pytest.approx([2e-5, 1e-5, 0.0])
    const = make_schedule(dataclasses.replace(cfg, schedule="constant", warmup_steps=10), 100)
    assert [float(const(i)) for i in (0, 9, 10, 99)] == pytest.approx([2e-6, 2e-5, 2e-5, 2e-5])
    short = make_schedule(dataclasses.replace(cfg, warmup_steps=50), 20)  # warmup longer than the run
    assert float(short(19)) == pytest.approx(2e-5 * 20 / 50)


def _tree():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"a": {"lora_a": jax.random.normal(k[0], (3, 4)), "lora_b": jax.random.normal(k[1], (4, 2))}}
    grads = {"a": {"lora_a": jax.random.normal(k[2], (3, 4)), "lora_b": jax.random.normal(k[3], (4, 2))}}
    return params, grads


def test_adamw_clips_then_decays():
    params, grads = _tree()
    cfg = OptimConfig(name="adamw", lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.01, clip_norm=0.5)
    tx, _ = make_optimizer(cfg, 10)
    updates, state = tx.update(grads, tx.init(params), params)
    ref = optax.adamw(0.1, weight_decay=0.01)
    clipped = jax.tree.map(lambda g: g * 0.5 / optax.global_norm(grads), grads)
    ref_updates, _ = ref.update(clipped, ref.init(params), params)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref_updates)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # Optimizer state mirrors the trainable tree only: two moments per trainable leaf.
    adam_state = state[1][0]
    assert jax.tree.structure(adam_state.mu) == jax.tree.structure(params)
    n = sum(x.size for x in jax.tree.leaves(params))
    assert sum(x.size for x in jax.tree.leaves(state) if x.ndim) == 2 * n


def test_sgd_with_weight_decay_and_no_clip():
    params, grads = _tree()
    cfg = OptimConfig(name="sgd", lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.01, clip_norm=0.0)
    tx, _ = make_optimizer(cfg, 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    for u, g, p in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), jax.tree.leaves(params)):
        np.testing.assert_allclose(u, -0.1 * (g + 0.01 * p), rtol=1e-6)


def test_schedule_follows_applied_updates():
    params, grads = _tree()
    cfg = OptimConfig(name="sgd", lr=1.0, warmup_steps=4, schedule="constant", clip_norm=0.0)
    tx, schedule = make_optimizer(cfg, 10)
    state = tx.init(params)
    for i in range(3):
        updates, state = tx.update(grads, state, params)
        g = jax.tree.leaves(grads)[0]
        np.testing.assert_allclose(jax.tree.leaves(updates)[0], -float(schedule(i)) * g, rtol=1e-6)


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="optim.name"):
        make_optimizer(OptimConfig(name="lion"), 10)
    with pytest.raises(ValueError, match="optim.schedule"):
        make_schedule(OptimConfig(schedule="step"), 10)
