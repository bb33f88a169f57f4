"""Device mesh and the ONE table that maps logical axis names to mesh axes.

Layers only name logical axes (`embed`, `heads`, `mlp`, ...). `LOGICAL_AXIS_RULES` says where each
lives on the `(data, fsdp, tensor)` mesh: weights are FSDP-sharded along `embed` and tensor-parallel
along heads/mlp/vocab; the batch is split over data x fsdp. A name missing from the table is an
error, never a silent replication.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "layers": None,  # the scanned layer axis
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",  # q / o projections: num_heads * head_dim
    "kv_heads": "tensor",  # k / v projections: num_kv_heads * head_dim
    "mlp": "tensor",
    "norm": None,
    "lora_rank": None,
    "adapters": None,  # the stacked adapters of a served AdapterBank
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
}


class ShardingError(ValueError):
    pass


def logical_to_mesh_spec(names: Sequence[str | None]) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names; an unknown name is an error."""
    mesh_axes = []
    for name in names:
        if name is None:
            mesh_axes.append(None)
            continue
        if name not in LOGICAL_AXIS_RULES:
            raise ShardingError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES (names: {tuple(names)})")
        mesh_axes.append(LOGICAL_AXIS_RULES[name])
    return PartitionSpec(*mesh_axes)


def _axis_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops the sharding of any dimension the mesh does not divide (e.g. vocab 32001 over 2)."""
    return PartitionSpec(*(
        axes if dim % _axis_size(mesh, axes) == 0 else None
        for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))
    ))


def named_sharding(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, fit_spec(logical_to_mesh_spec(names), shape, mesh))


def tree_shardings(mesh: Mesh, logical_names: Any, shapes: Any) -> Any:
    """NamedSharding for every leaf, from a tree of logical-name tuples and a tree of shapes."""
    return jax.tree.map(
        lambda names, s: named_sharding(mesh, names, s.shape),
        logical_names, shapes, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x),
    )


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Fills the one axis given as -1 with the remaining devices and checks the product."""
    dims = [data, fsdp, tensor]
    if dims.count(-1) > 1:
        raise ShardingError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    if -1 in dims:
        known = math.prod(d for d in dims if d != -1)
        if num_devices % known:
            raise ShardingError(f"mesh: {num_devices} devices are not divisible by data*fsdp*tensor={known}")
        dims[dims.index(-1)] = num_devices // known
    if math.prod(dims) != num_devices:
        raise ShardingError(f"mesh: data*fsdp*tensor = {math.prod(dims)} but there are {num_devices} devices")
    return tuple(dims)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    if len(devices) == len(jax.devices()) and devices == list(jax.devices()):
        # Topology-aware device order (ICI/NVLink neighbours on the fastest-varying axis).
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch arrays [batch, length, ...]: batch over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, logical_to_mesh_spec(("batch",) + (None,) * (ndim - 1)))
