"""Logical axis names -> mesh axes: one table of rules, checked for divisibility.

Every parameter carries `logical_axes` metadata (e.g. ("embed", "heads",
"head_dim")). A rule maps a logical name to a mesh axis, a tuple of mesh
axes, or None (replicated). Where a mesh axis does not divide a dimension
(Qwen2.5-7B's 28 query heads over tensor=8), that dimension is replicated and a
warning names the parameter, so every config still gets a valid layout.
"""
from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Training layout: FSDP over the embedding dimension, Megatron-style tensor
# parallelism over heads and the MLP.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)

# Sampling layout: a copy of the weights split over `tensor` only, since an
# FSDP layout would all-gather the whole model for every sampled token.
SAMPLING_RULES = tuple((name, None if axes == "fsdp" else axes) for name, axes in DEFAULT_RULES)

_warned: set[str] = set()


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ("data", "fsdp", "tensor") from e.g. {"data": -1, "fsdp": 2, "tensor": 4}.

    Missing axes have size 1; one axis may be -1 (takes the remaining devices).
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh shape {dict(shape)}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh shape {dict(shape)} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                         f"devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=DEFAULT_RULES, name: str = "") -> PartitionSpec:
    """The PartitionSpec for one array; a dimension its mesh axes do not divide is replicated."""
    table = dict(rules)
    spec, used = [], set()
    for axis_name, dim in zip(logical_axes, shape):
        mesh_axes = table.get(axis_name) if axis_name is not None else None
        if mesh_axes is None:
            spec.append(None)
            continue
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        mesh_axes = tuple(a for a in mesh_axes if mesh.shape.get(a, 1) > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if size > 1 and dim % size:
            key = f"{name}:{axis_name}"
            if key not in _warned:
                _warned.add(key)
                divisors = [d for d in range(1, size + 1) if dim % d == 0 and size % d == 0]
                logging.warning(
                    "%s: dimension %r of size %d does not split over mesh axes %s of size %d; "
                    "replicating it (sizes that divide it: %s)", name or "array", axis_name, dim,
                    mesh_axes, size, divisors)
            mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for an nnx.State (or abstract state) of parameters."""

    def one(path, variable):
        axes = variable.get_metadata().get("logical_axes") or (None,) * len(variable.shape)
        name = "/".join(str(p) for p in path)
        return NamedSharding(mesh, logical_to_spec(axes, variable.shape, mesh, rules, name))

    return nnx.map_state(one, state)


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
    """The same model with every parameter placed by the rules."""
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, rules)
    state = jax.device_put(state, shardings)  # shardings is a prefix of the state tree.
    return nnx.merge(graphdef, state)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows over (data, fsdp); the remaining dimensions replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *(None,) * (ndim - 1)))


def host_array(array) -> np.ndarray:
    """The whole of a (possibly sharded) array on this host. On a pod, where other processes
    hold some of its shards, every process gathers it (a collective all of them must call),
    so every process sees the same values and takes the same host-side decisions."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        array = multihost_utils.process_allgather(array, tiled=True)
    return np.asarray(jax.device_get(array))

