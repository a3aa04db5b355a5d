"""Multi-process (multi-host) set-up: one JAX process per host, one global mesh over every process's devices.

Call :func:`initialize` first thing, before anything touches a JAX backend (``jax.devices()``, creating an array,
jitting). Every process then builds the same mesh over ``jax.devices()`` (all processes' devices), runs the same
jitted step, and feeds only the rows of the global batch that its own devices hold (:func:`process_batch_slice`), which
:func:`mopo_jax.parallel.sharding.global_batch` assembles into global arrays.

* Cloud TPU slice: ``initialize(auto=True)`` (or ``jax.distributed.initialize()``): the coordinator, process count
  and index come from the TPU metadata; launch the same command on every worker
  (``gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...``).
* GPU nodes / CPU hosts: pass ``coordinator_address="host0:port"``, ``num_processes`` and ``process_id`` (SLURM and
  Open MPI environments are auto-detected with ``auto=True``).
* On CPU, cross-process collectives go through gloo (TCP), selected here.
"""

from __future__ import annotations

import itertools
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
    heartbeat_timeout: int | None = None,
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
      heartbeat_timeout: seconds without a heartbeat after which a process counts as lost and the job stops
        (default: the environment's ``MOPO_HEARTBEAT_TIMEOUT_S``, else JAX's 100).

    Returns:
      True when ``jax.distributed.initialize`` was called, False for a single process.

    Raises:
      RuntimeError: when a JAX backend is already initialised (too late to join a job).
    """
    if not auto and (num_processes is None or num_processes == 1):
        return False
    if _backends_initialized():
        raise RuntimeError(
            "mopo_jax.parallel.distributed.initialize() must run before JAX initialises a backend (before "
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
        heartbeat_timeout_seconds=int(heartbeat_timeout or os.environ.get("MOPO_HEARTBEAT_TIMEOUT_S", 100)),
    )
    return True


def detect_cluster() -> str | None:
    """The multi-process environment this process runs in, if any: ``"slurm"`` (a step launched by ``srun`` with
    more than one task), ``"cloud-tpu"`` (a Cloud TPU VM, where JAX reads the slice's workers from the metadata
    server), or None (a single process)."""
    if all(v in os.environ for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")) and \
            int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    try:
        from jax._src.clusters import cloud_tpu_cluster
    except ImportError:  # private module moved: only explicit arguments then
        return None
    return "cloud-tpu" if cloud_tpu_cluster.running_in_cloud_tpu_vm else None


def initialize_from_arguments(coordinator: str | None, num_processes: int | None, process_id: int | None,
                              auto: bool = True) -> str:
    """What the command line asked for: explicit ``--coordinator/--num-processes/--process-id`` (all three), or,
    with ``auto``, the environment's (:func:`detect_cluster`). Returns a one-line description of the job."""
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("--coordinator, --num-processes and --process-id go together; give all three")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id {process_id} is not in [0, --num-processes {num_processes})")
        initialize(coordinator, num_processes, process_id, local_device_ids=slurm_node_devices())
        return f"process {process_id} of {num_processes} (coordinator {coordinator})"
    cluster = detect_cluster() if auto else None
    if cluster is None:
        return "single process"
    initialize(auto=True, local_device_ids=slurm_node_devices())
    return f"{cluster}: process {jax.process_index()} of {jax.process_count()}"


def slurm_node_devices() -> list[int] | None:
    """Every GPU of the node when SLURM runs one task per node (our launcher's layout), else None.

    JAX's SLURM detection gives each task the one device ``SLURM_LOCALID`` (one task per GPU); with one task per
    node that would leave 7 of 8 GPUs idle."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    tasks_per_node = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE", "")
    gpus = os.environ.get("SLURM_GPUS_ON_NODE")
    if tasks_per_node.split("(")[0] != "1" or not (gpus or "").isdigit():
        return None
    return list(range(int(gpus)))


def process_batch_slice(global_batch_size: int, mesh=None) -> slice:
    """The rows of a global batch (leading axis) that this process loads.

    Without ``mesh``: the process's contiguous block ``[i * n / P, (i + 1) * n / P)`` (``P`` processes). With
    ``mesh``: the rows the batch sharding of :func:`mopo_jax.parallel.sharding.batch_sharding` puts on this process's
    devices, which must be one contiguous block (true for meshes from :func:`mopo_jax.parallel.sharding.make_mesh`,
    whose device order keeps each process's devices together); if the batch axes do not split across processes
    (e.g. the processes differ only along ``tensor``), every process loads the whole batch.
    """
    count, index = jax.process_count(), jax.process_index()
    if mesh is None:
        if global_batch_size % count:
            raise ValueError(f"global batch {global_batch_size} is not divisible by {count} processes")
        size = global_batch_size // count
        return slice(index * size, (index + 1) * size)

    from mopo_jax.parallel.sharding import batch_sharding

    indices = batch_sharding(mesh, 1).addressable_devices_indices_map((global_batch_size,))
    rows = np.zeros(global_batch_size, bool)
    for (row_slice,) in indices.values():
        rows[row_slice] = True
    held = np.flatnonzero(rows)
    if held.size == 0 or held[-1] - held[0] + 1 != held.size:
        raise ValueError("this process's devices hold a non-contiguous part of the batch; order the mesh's devices "
                         "so that each process's devices are adjacent along the batch axes")
    return slice(int(held[0]), int(held[-1]) + 1)


_BARRIER_COUNT = itertools.count()


def barrier(name: str, timeout_s: float = 4 * 3600) -> None:
    """Every process waits here until all have arrived (a no-op for one process).

    Goes through the coordination service (a key-value barrier with a timeout long enough for one process to build
    a preparation stage while the others wait), not through a device collective, whose transport may time out
    sooner. Every process must pass the same barriers in the same order (the count keeps reused names apart).
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:  # a runtime that joined processes some other way
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(f"mopo-{next(_BARRIER_COUNT)}-{name}", timeout_in_ms=int(timeout_s * 1000))


def broadcast_from_primary(value: int) -> int:
    """Process 0's ``value`` on every process (an integer; the identity for one process)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))
