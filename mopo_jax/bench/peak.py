"""Matmul throughput of this machine, and published dense bf16 peaks of common accelerators.

:func:`measure_matmul_peak` times a jit-compiled ``a @ b`` on square matrices and reports the best observed FLOP/s:
an *achievable* peak for this backend, which is the honest denominator for an MFU figure on a CPU (where no datasheet
number applies). :func:`device_peak_flops` looks up the vendor's *published* dense bf16 peak for an accelerator from its
``jax.Device.device_kind`` string.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp

# ---------------------------------------------------------------------------------------------------------------------
# Published peaks
# ---------------------------------------------------------------------------------------------------------------------

#: Published dense (no structured sparsity) bf16 matmul peak in FLOP/s, per chip, keyed by a lower-case substring of
#: ``jax.Device.device_kind``. Every number is the vendor's datasheet dense bf16 figure; NVIDIA datasheets quote the
#: "with sparsity" number, so the dense value is half of it. Lookup tries longer keys first, so e.g. ``"h100 pcie"``
#: wins over ``"h100"`` and ``"tpu v5 lite"`` over ``"tpu v5"``. See :data:`DEVICE_PEAK_SOURCES` for each source.
DEVICE_PEAK_FLOPS: dict[str, float] = {
    # NVIDIA (device_kind e.g. "NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB").
    "h100": 989e12,        # H100 SXM5
    "h100 pcie": 756e12,   # H100 PCIe (lower clocks / power than SXM)
    "h100 nvl": 835e12,    # H100 NVL, per GPU
    "h200": 989e12,        # H200 SXM (same compute as H100 SXM; also matches "GH200", whose GPU is H100-class)
    "a100": 312e12,        # A100 SXM4 and PCIe, 40 GB and 80 GB
    # Google Cloud TPU (device_kind as reported by JAX: v5e is "TPU v5 lite", v5p is "TPU v5", v6e is "TPU v6 lite").
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
}

#: Where each entry of :data:`DEVICE_PEAK_FLOPS` comes from (vendor datasheet, dense bf16).
DEVICE_PEAK_SOURCES: dict[str, str] = {
    "h100": "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM, BF16 Tensor Core 1,979 TFLOPS with sparsity -> 989 dense",
    "h100 pcie": "NVIDIA H100 datasheet, H100 PCIe, BF16 Tensor Core 1,513 TFLOPS with sparsity -> 756 dense",
    "h100 nvl": "NVIDIA H100 datasheet, H100 NVL, BF16 Tensor Core 1,671 TFLOPS with sparsity -> 835 dense",
    "h200": "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM, BF16 Tensor Core 1,979 TFLOPS with sparsity -> 989 dense",
    "a100": "NVIDIA A100 Tensor Core GPU datasheet, BF16 Tensor Core 312 TFLOPS dense (624 with sparsity)",
    "tpu v4": "Google Cloud TPU v4 documentation, 275 TFLOPS bf16 peak compute per chip",
    "tpu v5 lite": "Google Cloud TPU v5e documentation, 197 TFLOPS bf16 peak compute per chip",
    "tpu v5e": "Google Cloud TPU v5e documentation, 197 TFLOPS bf16 peak compute per chip",
    "tpu v5p": "Google Cloud TPU v5p documentation, 459 TFLOPS bf16 peak compute per chip",
    "tpu v5": "Google Cloud TPU v5p documentation, 459 TFLOPS bf16 peak compute per chip",
    "tpu v6 lite": "Google Cloud TPU v6e (Trillium) documentation, 918 TFLOPS bf16 peak compute per chip",
    "tpu v6e": "Google Cloud TPU v6e (Trillium) documentation, 918 TFLOPS bf16 peak compute per chip",
}


def device_peak_flops(device: Any = None) -> float | None:
    """Published dense bf16 peak FLOP/s of ``device``, or ``None`` if it is not in :data:`DEVICE_PEAK_FLOPS`.

    Args:
      device: a ``jax.Device``, a ``device_kind`` string (e.g. ``"NVIDIA H100 80GB HBM3"``, ``"TPU v5 lite"``), or
        ``None`` for ``jax.devices()[0]``.

    Matching is a lower-cased substring test against the keys of :data:`DEVICE_PEAK_FLOPS`, longest key first. CPUs
    (and anything unknown) give ``None``: use :func:`measure_matmul_peak` for those.
    """
    if device is None:
        device = jax.devices()[0]
    kind = device if isinstance(device, str) else getattr(device, "device_kind", "")
    kind = " ".join(str(kind).lower().split())
    for key in sorted(DEVICE_PEAK_FLOPS, key=len, reverse=True):
        if key in kind:
            return DEVICE_PEAK_FLOPS[key]
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Measured peak
# ---------------------------------------------------------------------------------------------------------------------

_DEFAULT_SIZE = {"cpu": 1024}          # accelerators: 8192 (small matrices would measure launch overhead)
_GROUP_TARGET_SECONDS = 0.05           # each timed group of back-to-back matmuls lasts at least about this long
_MAX_GROUP = 256


def _sync(x) -> None:
    jax.block_until_ready(x)


def measure_matmul_peak(
    dtype: str = "float32",
    size: int | None = None,
    repeats: int = 10,
    seconds_budget: float = 3.0,
) -> dict[str, Any]:
    """Best observed dense matmul throughput of ``jax.devices()[0]``.

    A jit-compiled ``a @ b`` on two ``size x size`` matrices of ``dtype`` is compiled and run once (warm-up, not
    timed); then up to ``repeats`` timed groups are run, each ``inner`` calls issued back to back and synchronised with
    ``block_until_ready`` (``inner`` is chosen from the warm-up so a group lasts about 50 ms, which amortises dispatch
    overhead on fast accelerators). Timing stops early once ``seconds_budget`` of timed work has elapsed (at least one
    group always runs). The fastest group gives the result; a matmul counts ``2 * size**3`` FLOPs.

    Args:
      dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` (anything ``jnp.dtype`` accepts).
      size: matrix side; default 1024 on CPU and 8192 on accelerators.
      repeats: maximum number of timed groups.
      seconds_budget: soft wall-clock budget for the timed groups, in seconds.

    Returns:
      ``{"flops_per_second", "size", "dtype", "seconds_per_matmul", "backend", "device_kind"}`` plus the diagnostics
      ``"inner"`` (matmuls per timed group), ``"repeats"`` (groups actually timed), ``"all_seconds_per_matmul"`` and
      ``"matmul_precision"`` (JAX's default matmul precision setting; on GPUs float32 may run as TF32).
    """
    device = jax.devices()[0]
    backend = jax.default_backend()
    if size is None:
        size = _DEFAULT_SIZE.get(device.platform, 8192)
    size = int(size)
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    dt = jnp.dtype(dtype)

    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.device_put(jax.random.normal(ka, (size, size), dtype=jnp.float32).astype(dt), device)
    b = jax.device_put(jax.random.normal(kb, (size, size), dtype=jnp.float32).astype(dt), device)
    matmul = jax.jit(lambda x, y: x @ y)

    _sync(matmul(a, b))                         # compile + first run
    t0 = time.perf_counter()
    _sync(matmul(a, b))                         # warm run, sizes the timed groups
    t_one = max(time.perf_counter() - t0, 1e-9)
    inner = int(min(_MAX_GROUP, max(1, math.ceil(_GROUP_TARGET_SECONDS / t_one))))

    per_matmul: list[float] = []
    spent = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = matmul(a, b)
        _sync(out)
        dt_group = time.perf_counter() - t0
        per_matmul.append(dt_group / inner)
        spent += dt_group
        if spent >= seconds_budget:
            break

    best = min(per_matmul)
    return {
        "flops_per_second": 2.0 * size ** 3 / best,
        "size": size,
        "dtype": dt.name,
        "seconds_per_matmul": best,
        "backend": backend,
        "device_kind": device.device_kind,
        "inner": inner,
        "repeats": len(per_matmul),
        "all_seconds_per_matmul": per_matmul,
        "matmul_precision": jax.config.jax_default_matmul_precision,
    }
