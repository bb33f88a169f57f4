"""What training carries from step to step (the frozen base is passed separately, never here).

`TrainState` holds the trainable tree, its optimizer state, the base RNG key (raw uint32 [2],
so it checkpoints as a plain array), the number of completed steps and the non-finite counters.
`state_shardings` gives every leaf an explicit `NamedSharding`: parameters by the logical-axis
rules, optimizer moments like their parameters, scalars replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: completed steps (batches consumed), skipped ones included
    params: Any  # the trainable tree (fp32 LoRA factors, or every weight for finetune=full)
    opt_state: Any
    rng: jax.Array  # uint32 [2]: base key; step k's dropout key is fold_in(rng, k)
    skipped: jax.Array  # int32 []: updates skipped because the loss or a gradient was not finite
    nonfinite_run: jax.Array  # int32 []: consecutive skipped updates ending at this step

    def items(self) -> dict:
        """The checkpoint items: `params` alone (for export) and everything else."""
        return {"params": self.params, "opt_state": self.opt_state,
                "misc": {"step": self.step, "rng": self.rng, "skipped": self.skipped,
                         "nonfinite_run": self.nonfinite_run}}

    @classmethod
    def from_items(cls, items: dict) -> "TrainState":
        m = items["misc"]
        return cls(step=m["step"], params=items["params"], opt_state=items["opt_state"], rng=m["rng"],
                   skipped=m["skipped"], nonfinite_run=m["nonfinite_run"])


def init_train_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Call inside `jax.jit` (with out_shardings from `state_shardings`)."""
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(seed), skipped=zero, nonfinite_run=zero)


def state_shardings(mesh: Mesh, tx: optax.GradientTransformation, param_shapes: Any, param_shardings: Any) -> TrainState:
    """NamedSharding for every leaf of a `TrainState` whose params have `param_shardings`."""
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, param_shapes)
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=param_shardings, opt_state=opt, rng=replicated,
                      skipped=replicated, nonfinite_run=replicated)


def abstract_state(tx: optax.GradientTransformation, param_shapes: Any, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""
    shapes = jax.eval_shape(lambda p: init_train_state(p, tx, 0), param_shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
