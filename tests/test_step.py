"""Loss and train step: global-batch token mean, mesh invariance, accumulation, non-finite skip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flacuna_jax import optim, sharding, step, train_state
from flacuna_jax.config import OptimConfig
from flacuna_jax.hf import load_pretrained
from flacuna_jax.lora import init_lora_params, merge_params, split_params
from flacuna_jax.model import LoraSpec, Runtime, abstract_params

LORA = LoraSpec(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"))


def make_batch(rows=8, seq=24, vocab=256, seed=0):
    """Packed rows with uneven numbers of segments and trained tokens (one row trains nothing)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (rows, seq)).astype(np.int32)
    seg = np.zeros((rows, seq), np.int32)
    pos = np.zeros((rows, seq), np.int32)
    mask = np.zeros((rows, seq), np.float32)
    targets = np.zeros((rows, seq), np.int32)
    for r in range(rows):
        start, s = 0, 1
        while start < seq - 2:
            n = int(rng.integers(3, seq // 2))
            end = min(start + n, seq - int(rng.integers(0, 3)))
            if end - start < 2:
                break
            seg[r, start:end] = s
            pos[r, start:end] = np.arange(end - start)
            targets[r, start:end - 1] = ids[r, start + 1:end]
            mask[r, start:end - 1] = rng.random(end - start - 1) < (0.2 + 0.1 * r)
            start, s = end, s + 1
    mask[3] = 0.0
    return {"input_ids": ids, "targets": targets, "loss_mask": mask, "segment_ids": seg, "positions": pos}


def setup(model_dir, mesh, dtype=jnp.float32, lora=LORA):
    model, frozen = load_pretrained(model_dir, Runtime(dtype, dtype), lora, mesh)
    shapes, names = abstract_params(model)
    p_shapes, p_names = split_params(shapes)[0], split_params(names)[0]
    p_shard = sharding.tree_shardings(mesh, p_names, p_shapes)
    trainable = init_lora_params(model, jax.random.PRNGKey(0), p_shard)
    # B = 0 would make every A-gradient zero; give B values so both factors have real gradients.
    trainable = jax.jit(lambda t: jax.tree.map(lambda x: x + 0.01 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), t),
                        out_shardings=p_shard)(trainable)
    f_shard = sharding.tree_shardings(mesh, split_params(names)[1], split_params(shapes)[1])
    return model, frozen, trainable, p_shapes, p_names, p_shard, f_shard


def single_mesh():
    return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_loss_is_mean_over_trained_tokens_of_global_batch(tiny_model_dir):
    mesh = single_mesh()
    model, frozen, trainable, *_ = setup(tiny_model_dir("mha"), mesh)
    batch = make_batch()
    logits = model.apply({"params": merge_params(trainable, frozen)}, batch["input_ids"], batch["positions"],
                         batch["segment_ids"])
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    tok = -np.take_along_axis(np.asarray(logp), batch["targets"][..., None], -1)[..., 0]
    expect = (tok * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    per_example_means = np.mean([(tok[r] * batch["loss_mask"][r]).sum() / batch["loss_mask"][r].sum()
                                 for r in range(8) if batch["loss_mask"][r].sum()])
    assert abs(per_example_means - expect) > 1e-3  # the masks really are uneven
    loss, _, n = jax.jit(lambda t, f, b: step.loss_and_grads(model, t, f, b, loss_chunk=5))(trainable, frozen, batch)
    assert int(n) == int(batch["loss_mask"].sum())
    assert rel_err(loss, expect) <= 1e-5  # 5 does not divide 24: the last chunk is padded
    total = jax.jit(lambda t, f, b: step.loss_sum(model, t, f, b, None, 0))(trainable, frozen, batch)
    assert rel_err(total / n, expect) <= 1e-5  # unchunked


def grads_on(mesh, model_dir, batch, accum=1, lora=LORA, dropout_rng=None):
    model, frozen, trainable, p_shapes, p_names, p_shard, f_shard = setup(model_dir, mesh, lora=lora)
    b_sh = {k: sharding.batch_sharding(mesh) for k in step.BATCH_KEYS}
    fn = jax.jit(lambda t, f, b: step.loss_and_grads(model, t, f, b, accum=accum, loss_chunk=8, mesh=mesh,
                                                     dropout_rng=dropout_rng)[:2],
                 in_shardings=(p_shard, f_shard, b_sh), out_shardings=(None, p_shard))
    loss, grads = fn(trainable, frozen, batch)
    return loss, grads, (model, frozen, trainable, p_shapes, p_names, p_shard, f_shard)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    batch = make_batch()
    loss, grads, _ = grads_on(single_mesh(), tiny_model_dir("mha"), batch)
    return batch, loss, jax.device_get(grads)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (1, 4, 2)])
def test_mesh_matches_single_device(tiny_model_dir, reference, shape):
    batch, ref_loss, ref_grads = reference
    mesh = sharding.make_mesh(*shape)
    loss, grads, ctx = grads_on(mesh, tiny_model_dir("mha"), batch)
    assert rel_err(loss, ref_loss) <= 1e-5
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        ref = ref_grads
        for k in path:
            ref = ref[k.key]
        assert np.abs(ref).max() > 0, path
        assert rel_err(g, ref) <= 1e-5, (shape, jax.tree_util.keystr(path))

    # The train step's output state is placed exactly as the rules say.
    model, frozen, trainable, p_shapes, p_names, p_shard, f_shard = ctx
    tx, schedule = optim.make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0), 10)
    s_shard = train_state.state_shardings(mesh, tx, p_shapes, p_shard)
    state = jax.jit(lambda p: train_state.init_train_state(p, tx, 0), out_shardings=s_shard)(trainable)
    train = step.make_train_step(model, tx, schedule, mesh, s_shard, f_shard, accum=2, loss_chunk=8)
    state, metrics = train(state, frozen, batch)
    flat_names = dict(jax.tree_util.tree_leaves_with_path(p_names, is_leaf=lambda x: isinstance(x, tuple)))
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
        want = sharding.fit_spec(sharding.logical_to_mesh_spec(flat_names[path]), leaf.shape, mesh)
        assert leaf.sharding.spec == want, (jax.tree_util.keystr(path), leaf.sharding.spec, want)
        assert leaf.sharding.mesh.shape == mesh.shape
    mu = state.opt_state[1][0].mu  # clip -> adamw(scale_by_adam): moments sharded like their params
    for (path, m), p in zip(jax.tree_util.tree_leaves_with_path(mu), jax.tree.leaves(state.params)):
        assert m.sharding.spec == p.sharding.spec, path
    shapes, names = abstract_params(model)
    frozen_names = dict(jax.tree_util.tree_leaves_with_path(split_params(names)[1],
                                                            is_leaf=lambda x: isinstance(x, tuple)))
    for path, leaf in jax.tree_util.tree_leaves_with_path(frozen):  # the base, as the step received it
        want = sharding.fit_spec(sharding.logical_to_mesh_spec(frozen_names[path]), leaf.shape, mesh)
        assert leaf.sharding.spec == want and leaf.sharding.mesh.shape == mesh.shape, jax.tree_util.keystr(path)
    assert rel_err(metrics["loss"], ref_loss) <= 1e-5  # the jitted, accumulating step's own loss
    if shape == (1, 4, 2):
        q_a = state.params["layers"]["attn"]["q_proj"]["lora_a"]
        q_b = state.params["layers"]["attn"]["q_proj"]["lora_b"]
        assert q_a.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
        assert q_b.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
    assert bool(metrics["finite"])


def test_accumulation_equals_one_big_batch(tiny_model_dir):
    batch = make_batch(seed=1)
    mesh = single_mesh()
    loss1, g1, _ = grads_on(mesh, tiny_model_dir("mha"), batch, accum=1)
    loss4, g4, _ = grads_on(mesh, tiny_model_dir("mha"), batch, accum=4)  # 4 micro-batches of 2
    assert rel_err(loss4, loss1) <= 1e-5
    for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
        assert np.abs(b).max() > 0
        assert rel_err(a, b) <= 1e-5


def test_dropout_masks_do_not_depend_on_the_mesh_or_accumulation(tiny_model_dir):
    """LoRA dropout on: a row's mask is seeded by its global row index, so 1 device x 8 accumulation
    steps and 2 x 2 devices x 2 compute the same loss and gradients (summation order aside), and the
    dropout does change them."""
    import dataclasses

    batch, lora, key = make_batch(), dataclasses.replace(LORA, dropout=0.3), jax.random.PRNGKey(7)
    layouts = [(single_mesh(), 8), (sharding.make_mesh(2, 2, 1, devices=jax.devices()[:4]), 2)]
    results = [grads_on(mesh, tiny_model_dir("mha"), batch, accum, lora, key)[:2] for mesh, accum in layouts]
    (loss0, g0), (_, plain) = results[0], grads_on(single_mesh(), tiny_model_dir("mha"), batch, 8, lora)[:2]
    g0, plain = jax.device_get(g0), jax.device_get(plain)
    assert min(rel_err(a, b) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(plain))) > 1e-2  # masks applied
    for loss, grads in results[1:]:
        assert rel_err(loss, loss0) <= 1e-6
        for a, b in zip(jax.tree.leaves(jax.device_get(grads)), jax.tree.leaves(jax.device_get(g0))):
            assert rel_err(a, b) <= 1e-5


def test_nonfinite_update_is_skipped_and_counted(tiny_model_dir):
    mesh = sharding.make_mesh(2, 2, 2)
    model, frozen, trainable, p_shapes, p_names, p_shard, f_shard = setup(tiny_model_dir("mha"), mesh)
    tx, schedule = optim.make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"), 10)
    s_shard = train_state.state_shardings(mesh, tx, p_shapes, p_shard)
    state = jax.jit(lambda p: train_state.init_train_state(p, tx, 0), out_shardings=s_shard)(trainable)
    before = jax.device_get(state)
    train = step.make_train_step(model, tx, schedule, mesh, s_shard, f_shard)
    batch = make_batch()
    bad = dict(frozen, norm={"scale": frozen["norm"]["scale"].at[0].set(jnp.nan)})
    for i in range(2):
        state, m = train(state, bad, batch)
        assert not bool(m["finite"]) and int(m["skipped_steps"]) == i + 1 and int(m["nonfinite_run"]) == i + 1
    after = jax.device_get(state)
    assert int(after.step) == 2
    for a, b in zip(jax.tree.leaves((before.params, before.opt_state)), jax.tree.leaves((after.params, after.opt_state))):
        np.testing.assert_array_equal(a, b)
    state, m = train(state, frozen, batch)  # a good step applies the first update and resets the run
    assert bool(m["finite"]) and int(m["nonfinite_run"]) == 0 and int(m["skipped_steps"]) == 2
    assert float(m["lr"]) == pytest.approx(1e-2)
    assert int(jax.device_get(state.opt_state[1][0].count)) == 1
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(jax.device_get(state.params)))]
    assert all(changed)


@pytest.mark.parametrize("chunk", [0, 5, 8])
def test_cross_entropy_gradient_equals_autodiff(chunk):
    """The fused rule (softmax - onehot formed in the forward pass) against plain log_softmax autodiff."""
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(3, 24, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 50)) * 0.3, jnp.float32)
    y = jnp.asarray(rng.integers(0, 50, (3, 24)), jnp.int32)
    m = jnp.asarray(rng.random((3, 24)) < 0.6, jnp.float32)

    def reference(h, w):
        logp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, w), axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0] * m) * 0.37

    fused = jax.jit(jax.value_and_grad(lambda h, w: step.chunked_cross_entropy(h, w, y, m, chunk) * 0.37, (0, 1)))
    (loss, (gh, gw)), (ref_loss, (ref_gh, ref_gw)) = fused(h, w), jax.value_and_grad(reference, (0, 1))(h, w)
    assert rel_err(loss, ref_loss) <= 1e-5
    assert rel_err(gh, ref_gh) <= 1e-5 and rel_err(gw, ref_gw) <= 1e-5
    only_h = jax.jit(jax.grad(lambda h: step.chunked_cross_entropy(h, w, y, m, chunk)))(h)  # W frozen (LoRA)
    assert rel_err(only_h * 0.37, ref_gh) <= 1e-5


def _dot_output_shapes(jaxpr) -> list[tuple[int, ...]]:
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    shapes += _dot_output_shapes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    shapes += _dot_output_shapes(sub)
    return shapes


def test_frozen_weights_get_no_gradient_matmul(tiny_model_dir):
    """Every 2-D matmul output of the LoRA gradient is a LoRA factor's gradient ([in, r] or [r, out]):
    no frozen kernel (lm_head included) has its weight gradient computed. Forward and activation
    gradient matmuls are [b, t, ...] (3-D and up)."""
    model, frozen, trainable, *_ = setup(tiny_model_dir("mha"), single_mesh())
    batch = make_batch()
    jaxpr = jax.make_jaxpr(lambda t, f, b: step.loss_and_grads(model, t, f, b, loss_chunk=8,
                                                              dropout_rng=jax.random.PRNGKey(0)))(trainable, frozen, batch)
    two_d = [s for s in _dot_output_shapes(jaxpr.jaxpr) if len(s) == 2]
    assert two_d and all(LORA.rank in s for s in two_d), two_d
