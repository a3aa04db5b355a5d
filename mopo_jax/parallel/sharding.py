"""Meshes and sharding: the only module that knows about device meshes.

The mesh has three axes:

* ``data``: pure data parallelism (parameters replicated);
* ``fsdp``: data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3 style);
* ``tensor``: tensor (model) parallelism over heads, MLP width and vocabulary.

Parameters carry logical axis names (:func:`mopo_jax.models.param_logical_axes`); :data:`PARAM_RULES` maps them to
mesh axes and :data:`ACTIVATION_RULES` does the same for activations. A logical axis whose size the mesh axis does not
divide stays replicated (e.g. an MLP width of 129 on ``tensor=2``), so every preset runs on every mesh. Head axes are
the flattened ``heads x head_dim`` projection width, so a mesh axis may split inside a head: correct, with more
communication.

The mesh uses ``AxisType.Auto`` throughout: shardings are given explicitly at the jit boundary (parameters, optimizer
state, batch) and at a few activation points, and XLA's propagation fills in the rest (pjit semantics). One choice,
applied everywhere, so a user never mixes the two modes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

PARAM_RULES: dict[str, Any] = {
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "position": None,
    "lora_rank": None,
}

ACTIVATION_RULES: dict[str, Any] = {
    "batch": BATCH_AXES,
    "length": None,
    "embed": None,
    "vocab": "tensor",
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; ``-1`` on one axis takes all remaining devices (default: everything on ``fsdp``)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {self}")
        known = int(np.prod([s for s in sizes if s != -1]))
        if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
            raise ValueError(f"mesh {self} does not fit {num_devices} devices")
        sizes = [num_devices // known if s == -1 else s for s in sizes]
        if int(np.prod(sizes)) != num_devices:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                             f"{num_devices} are available")
        return tuple(sizes)


def parse_mesh(text: str) -> MeshConfig:
    """``"fsdp=4,tensor=2"`` -> ``MeshConfig(data=1, fsdp=4, tensor=2)`` (unnamed axes are 1)."""
    values = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, size = part.partition("=")
        if name not in values or not size.lstrip("-").isdigit():
            raise ValueError(f"--mesh {text!r}: expected comma-separated axis=size with axes {MESH_AXES}")
        values[name] = int(size)
    return MeshConfig(**values)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices of all processes).

    A fully specified mesh smaller than the device list uses its first devices (e.g. ``fsdp=1`` on an 8-device host).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = (config.data, config.fsdp, config.tensor)
    if -1 not in sizes and int(np.prod(sizes)) < len(devices):
        devices = devices[: int(np.prod(sizes))]
    shape = config.shape(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: dict[str, Any] = PARAM_RULES
) -> PartitionSpec:
    """PartitionSpec for an array with the given logical axes, skipping mesh axes that do not divide the dimension
    or are already used by an earlier dimension."""
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept = []
        for axis in axes:
            if axis in used or mesh.shape[axis] == 1:
                continue
            if size % (int(np.prod([mesh.shape[a] for a in kept])) * mesh.shape[axis]) == 0:
                kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def tree_shardings(logical_axes, shapes, mesh: Mesh, rules: dict[str, Any] = PARAM_RULES):
    """NamedShardings for a pytree given the matching pytrees of logical axes (tuples) and shapes."""
    return jax.tree.map(
        lambda axes, leaf: NamedSharding(mesh, logical_to_spec(axes, leaf.shape, mesh, rules)),
        logical_axes,
        shapes,
        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over ``data`` and ``fsdp``, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def activation_sharding(mesh: Mesh, logical_axes: Sequence[str]) -> NamedSharding:
    """Sharding of an activation with logical axes such as ``("batch", "length", "embed")``."""
    spec = []
    for name in logical_axes:
        target = ACTIVATION_RULES.get(name)
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, PartitionSpec(*spec))


def param_shardings(model_config, params, mesh: Mesh):
    """NamedShardings of a model's parameters (or of a subset of its top-level entries, e.g. the upper blocks);
    ``model_config`` names each parameter's logical axes (:meth:`mopo_jax.models.ModelConfig.param_logical_axes`)."""
    axes = model_config.param_logical_axes()
    return tree_shardings({k: axes[k] for k in params}, params, mesh)


def put_params(model_config, params, mesh: Mesh | None):
    """``params`` placed on ``mesh`` by the parameter rules (unchanged without a mesh)."""
    return params if mesh is None else put_tree(params, param_shardings(model_config, params, mesh))


def batch_size_multiple(mesh: Mesh | None) -> int:
    """The number of shards of the batch axes: every batch on ``mesh`` has a multiple of it as its leading size."""
    return 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def put_batch(arrays, mesh: Mesh | None):
    """Host arrays, the same whole batch on every process, placed on ``mesh`` along the batch axes (unchanged
    without a mesh). For batches of which each process holds only its rows, use :func:`global_batch`."""
    if mesh is None:
        return arrays
    size = batch_size_multiple(mesh)
    for leaf in jax.tree.leaves(arrays):
        if np.shape(leaf)[0] % size:
            raise ValueError(f"a batch of {np.shape(leaf)[0]} rows does not split over the mesh's {size} batch shards "
                             f"(data x fsdp); use a batch size that is a multiple of {size}")
    return jax.tree.map(lambda a: jax.device_put(np.asarray(a), batch_sharding(mesh, np.ndim(a))), arrays)


def put_tree(tree, shardings):
    """``tree`` placed in ``shardings`` as global arrays, each process materialising only the shards its devices hold.

    Leaves may be host arrays (the same on every process: each device's slice is cut from it, nothing is sent between
    processes), lazily read ones (:class:`mopo_jax.models.weights.LazyTensor`: each process reads only the blocks of
    the files that its devices hold), or ``jax.Array`` leaves already placed, across processes too (kept when already in their sharding, else
    resharded on the devices; a global array is never fetched to the host, which is impossible when it spans
    processes)."""
    def put(leaf, target):
        if isinstance(leaf, jax.Array):
            if leaf.sharding.is_equivalent_to(target, leaf.ndim):
                return leaf
            if leaf.is_fully_addressable and target.is_fully_addressable:
                return jax.device_put(leaf, target)
            return jax.jit(lambda x: x, out_shardings=target)(leaf)
        host = leaf if hasattr(leaf, "shape") and hasattr(leaf, "__getitem__") else np.asarray(leaf)
        return jax.make_array_from_callback(tuple(host.shape), target, lambda index: np.asarray(host[index]))

    return jax.tree.map(put, tree, shardings)


def to_host(tree):
    """NumPy copies of (possibly multi-process, sharded) arrays, the whole array on every process."""
    def fetch(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(leaf)

    return jax.tree.map(fetch, tree)


def global_batch(local_batch, mesh: Mesh):
    """Global arrays from each process's slice of the batch (``jax.make_array_from_process_local_data``).

    Every process passes the rows it loaded, :func:`mopo_jax.parallel.distributed.process_batch_slice` (its block
    of the leading axis in process order, or the whole batch where the batch axes do not split across the
    processes, e.g. when they differ only along ``tensor``); on one process this is just a sharded ``device_put``.
    The global row count is the sharding's, not ``rows x processes``: processes holding the same rows count once.
    """
    def make(leaf):
        leaf = np.asarray(leaf)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, leaf.ndim), leaf)

    return jax.tree.map(make, local_batch)
