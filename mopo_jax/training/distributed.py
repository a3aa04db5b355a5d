"""Multi-process (multi-host) set-up: one JAX process per host, one global mesh over every process's devices.

Call :func:`initialize` first thing, before anything touches a JAX backend (``jax.devices()``, creating an array,
jitting). Every process then builds the same mesh over ``jax.devices()`` (all processes' devices), runs the same
jitted step, and feeds only the rows of the global batch that its own devices hold (:func:`process_batch_slice`), which
:func:`mopo_jax.training.sharding.global_batch` assembles into global arrays.

* Cloud TPU slice: ``initialize(auto=True)`` (or ``jax.distributed.initialize()``): the coordinator, process count
  and index come from the TPU metadata; launch the same command on every worker
  (``gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...``).
* GPU nodes / CPU hosts: pass ``coordinator_address="host0:port"``, ``num_processes`` and ``process_id`` (SLURM and
  Open MPI environments are auto-detected with ``auto=True``).
* On CPU, cross-process collectives go through gloo (TCP), selected here.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: cannot tell
        return False


def _uses_cpu() -> bool:
    """Whether the CPU backend may be used (JAX_PLATFORMS unset or naming cpu)."""
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    return not platforms or "cpu" in platforms.lower().split(",")


def gloo_available() -> bool:
    """Whether this jaxlib ships the gloo TCP collectives (cross-process collectives on CPU)."""
    try:
        from jax._src.lib import _jax
    except ImportError:  # older jaxlib layout
        try:
            from jax._src.lib import xla_extension as _jax  # type: ignore[no-redef]
        except ImportError:
            return False
    return hasattr(_jax, "make_gloo_tcp_collectives") and hasattr(jax.config, "jax_cpu_collectives_implementation")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
    *,
    auto: bool = False,
    initialization_timeout: int = 300,
) -> bool:
    """Join the multi-process job; a no-op for a single process.

    Args:
      coordinator_address: ``"host:port"`` of process 0's coordinator service.
      num_processes: number of processes in the job; ``None`` or 1 means single-process (nothing to do, unless
        ``auto``).
      process_id: this process's index in ``[0, num_processes)``.
      local_device_ids: the local devices this process uses (default: all visible).
      auto: call ``jax.distributed.initialize`` even without ``num_processes``, letting JAX detect the cluster
        (Cloud TPU metadata, SLURM, Open MPI).
      initialization_timeout: seconds to wait for every process to connect.

    Returns:
      True when ``jax.distributed.initialize`` was called, False for a single process.

    Raises:
      RuntimeError: when a JAX backend is already initialised (too late to join a job).
    """
    if not auto and (num_processes is None or num_processes == 1):
        return False
    if _backends_initialized():
        raise RuntimeError(
            "mopo_jax.training.distributed.initialize() must run before JAX initialises a backend (before "
            "jax.devices(), creating arrays or jitting); call it first thing in the program"
        )
    if _uses_cpu():
        # Cross-process collectives of the CPU backend (harmless when the job runs on TPU or GPU).
        if not gloo_available():
            raise RuntimeError("this jaxlib has no gloo CPU collectives; multi-process CPU runs are not possible")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
    )
    return True


def process_batch_slice(global_batch_size: int, mesh=None) -> slice:
    """The rows of a global batch (leading axis) that this process loads.

    Without ``mesh``: the process's contiguous block ``[i * n / P, (i + 1) * n / P)`` (``P`` processes). With
    ``mesh``: the rows the batch sharding of :func:`mopo_jax.training.sharding.batch_sharding` puts on this process's
    devices, which must be one contiguous block (true for meshes from :func:`mopo_jax.training.sharding.make_mesh`,
    whose device order keeps each process's devices together); if the batch axes do not split across processes
    (e.g. the processes differ only along ``tensor``), every process loads the whole batch.
    """
    count, index = jax.process_count(), jax.process_index()
    if mesh is None:
        if global_batch_size % count:
            raise ValueError(f"global batch {global_batch_size} is not divisible by {count} processes")
        size = global_batch_size // count
        return slice(index * size, (index + 1) * size)

    from mopo_jax.training.sharding import batch_sharding

    indices = batch_sharding(mesh, 1).addressable_devices_indices_map((global_batch_size,))
    rows = np.zeros(global_batch_size, bool)
    for (row_slice,) in indices.values():
        rows[row_slice] = True
    held = np.flatnonzero(rows)
    if held.size == 0 or held[-1] - held[0] + 1 != held.size:
        raise ValueError("this process's devices hold a non-contiguous part of the batch; order the mesh's devices "
                         "so that each process's devices are adjacent along the batch axes")
    return slice(int(held[0]), int(held[-1]) + 1)
