"""Orbax checkpoints: exact round trip with shardings, keep-K, leftovers of a crashed save, load_trainable,
JAX's preemption counter left to the training loop."""

import numpy as np
import jax
import pytest

from flacuna_jax import checkpoint, optim, sharding, train_state
from flacuna_jax.config import Config, OptimConfig, dump_config
from flacuna_jax.lora import init_lora_params, split_params
from flacuna_jax.model import Llama, LoraSpec, abstract_params
from flacuna_jax.tiny import PRESETS


def _state(mesh, seed=0):
    model = Llama(PRESETS["mha"], lora=LoraSpec(rank=4, targets=("q_proj", "v_proj")))
    shapes, names = abstract_params(model)
    p_shapes, p_names = split_params(shapes)[0], split_params(names)[0]
    p_shard = sharding.tree_shardings(mesh, p_names, p_shapes)
    tx, _ = optim.make_optimizer(OptimConfig(), 10)
    shardings = train_state.state_shardings(mesh, tx, p_shapes, p_shard)
    params = init_lora_params(model, jax.random.PRNGKey(seed), p_shard)
    params = jax.tree.map(lambda x: x + 0.5, params)  # B nonzero too
    state = jax.jit(lambda p: train_state.init_train_state(p, tx, seed), out_shardings=shardings)(params)
    return state, train_state.abstract_state(tx, p_shapes, shardings)


def test_round_trip_keeps_values_and_shardings(tmp_path):
    mesh = sharding.make_mesh(2, 2, 2)
    state, target = _state(mesh)
    ck = checkpoint.Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        ck.save(step, state.replace(step=state.step + step), {"pos": step, "nested": [1, "x"]})
    ck.wait()
    assert ck.all_steps() == [2, 3]  # keep 2
    restored, data = ck.restore(3, target)
    ck.close()
    assert data == {"pos": 3, "nested": [1, "x"]}
    assert int(restored.step) == 3
    for a, b in zip(jax.tree.leaves(state.replace(step=state.step + 3)), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)


def test_crashed_save_leftover_is_ignored(tmp_path):
    mesh = sharding.make_mesh(1, -1, 1)
    state, target = _state(mesh)
    ck = checkpoint.Checkpointer(tmp_path, keep=3)
    ck.save(4, state, {"pos": 4})
    ck.close()
    # A save killed half-way leaves only a temporary directory behind.
    (checkpoint.checkpoint_dir(tmp_path) / "8.orbax-checkpoint-tmp-123").mkdir()
    ck = checkpoint.Checkpointer(tmp_path, keep=3)
    assert ck.latest_step() == 4
    restored, data = ck.restore(4, target)
    assert data == {"pos": 4}
    ck.close()


def test_load_trainable(tmp_path):
    mesh = sharding.make_mesh(1, 4, 2)
    state, _ = _state(mesh, seed=3)
    (tmp_path / "config.yaml").write_text(dump_config(Config(output_dir=str(tmp_path))))
    ck = checkpoint.Checkpointer(tmp_path)
    ck.save(5, state, {})
    ck.save(7, state.replace(params=jax.tree.map(lambda x: x * 2, state.params)), {})
    ck.close()
    step, params, cfg = checkpoint.load_trainable(tmp_path)
    assert step == 7 and cfg.output_dir == str(tmp_path)
    expect = jax.tree.map(lambda x: np.asarray(x) * 2, state.params)
    assert jax.tree.structure(params) == jax.tree.structure(expect)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expect)):
        assert isinstance(a, np.ndarray)
        np.testing.assert_array_equal(a, b)
    step, params, _ = checkpoint.load_trainable(tmp_path, step=5)
    assert step == 5
    with pytest.raises(checkpoint.CheckpointNotFound, match="step 6"):
        checkpoint.load_trainable(tmp_path, step=6)
    with pytest.raises(checkpoint.CheckpointNotFound, match="config.yaml"):
        checkpoint.load_trainable(tmp_path / "nothing")


def test_saving_leaves_jax_preemption_counter_alone(tmp_path, monkeypatch):
    """orbax's own manager asks JAX's preemption sync point with the global step on every save (and from its
    finalize thread); ours must not: JAX keeps the last value per process, and the training loop's count
    (steps of this launch, preemption.py) would be overwritten."""
    from jax.experimental import multihost_utils

    asked = []
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: asked.append(step) or False)
    state, _ = _state(sharding.make_mesh(1, -1, 1))
    ck = checkpoint.Checkpointer(tmp_path, keep=2)
    for step in (3, 4):
        ck.save(step, state, {})
    ck.close()
    assert ck.all_steps() == [3, 4] and asked == []
