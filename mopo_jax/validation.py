"""Input checks at the Python boundary.

The public functions of :mod:`mopo_jax` call these on their inputs. A check runs only on concrete values: inside
``jit`` the inputs are tracers and the checks are skipped (nothing data-dependent can raise there), so call the public
functions eagerly once, or call these checks on the host-side batch, to get the errors. Every error names the argument
and, where it helps, the first offending index.
"""

from __future__ import annotations

import math
import sys
from typing import Sequence

import numpy as np


def is_concrete(value) -> bool:
    """False for tracers (inside jit/vmap/grad), where data-dependent checks cannot run."""
    jax = sys.modules.get("jax")
    if jax is None:  # NumPy-only callers: nothing can be a tracer
        return True
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(value))


def _host(value) -> np.ndarray:
    return np.asarray(value, dtype=np.float64)


def _first_index(condition: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(condition)[0])


def check_positive(name: str, value) -> None:
    """``value > 0`` and finite (e.g. ``tau``)."""
    if not is_concrete(value):
        return
    array = _host(value)
    if not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise ValueError(f"{name} must be a finite number > 0, got {np.asarray(value).tolist()}")


def check_nonnegative(name: str, value) -> None:
    """``value >= 0`` and finite (e.g. ``eps``, step sizes)."""
    if not is_concrete(value):
        return
    array = _host(value)
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {np.asarray(value).tolist()}")


def check_unit_interval(name: str, value, allow_nan: bool = False) -> None:
    """Every entry in ``[0, 1]`` (thresholds, probabilities); NaN only where ``allow_nan``."""
    if not is_concrete(value):
        return
    array = _host(value)
    nan = np.isnan(array)
    if nan.any() and not allow_nan:
        raise ValueError(f"{name} contains NaN at index {_first_index(nan)}")
    bad = ~nan & ((array < 0) | (array > 1))
    if bad.any():
        index = _first_index(bad)
        raise ValueError(f"{name}: value {array[index]:.6g} outside [0, 1] at index {index}")


def check_finite(name: str, value) -> None:
    """No NaN or infinity (log-probabilities, win rates, multipliers)."""
    if not is_concrete(value):
        return
    array = _host(value)
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN at index {_first_index(np.isnan(array))}")
    bad = ~np.isfinite(array)
    if bad.any():
        index = _first_index(bad)
        raise ValueError(f"{name} must be finite; entry {index} is {array[index]}")


def check_shape(name: str, value, expected: tuple, what: str = "") -> None:
    """``value.shape == expected`` where ``None`` in ``expected`` matches any size."""
    shape = tuple(np.shape(value))
    if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
        described = tuple("?" if e is None else e for e in expected)
        raise ValueError(f"{name} must have shape {described}{' ' + what if what else ''}, got {shape}")


def check_array_shape(name: str, value, expected: Sequence, sizes: dict) -> dict:
    """Checks ``value``'s shape against symbolic ``expected`` (ints, or names bound consistently across calls).

    ``sizes`` maps symbol names (``"B"``, ``"K"``, ...) to sizes already bound; unbound symbols are bound to what
    ``value`` has and the updated mapping is returned. Shapes are static under ``jit``, so this runs at trace time
    and a wrong rank or size is reported naming the argument before XLA sees it.
    """
    shape = tuple(np.shape(value))
    described = "[" + ", ".join(str(e) for e in expected) + "]"
    if len(shape) != len(expected):
        raise ValueError(f"{name} must have shape {described} (rank {len(expected)}), got shape {shape}")
    bound = dict(sizes)
    for symbol, size in zip(expected, shape):
        if isinstance(symbol, int):
            if size != symbol:
                raise ValueError(f"{name} must have shape {described}, got shape {shape}")
        elif symbol in bound and bound[symbol] != size:
            raise ValueError(f"{name} must have shape {described} with {symbol} = {bound[symbol]}, got shape {shape}")
        else:
            bound[symbol] = size
    return bound


def check_preferences(name: str, preferences, label_mask=None, atol: float = 1e-5) -> None:
    """A ``[K, X, N, N]`` preference tensor: entries in ``[0, 1]`` (NaN = unlabeled when no mask is given) and
    ``P[i, j] + P[j, i] = 1`` wherever both are labeled."""
    if np.ndim(preferences) != 4 or np.shape(preferences)[-1] != np.shape(preferences)[-2]:
        raise ValueError(f"{name} must have shape [K, X, N, N], got {tuple(np.shape(preferences))}")
    if not is_concrete(preferences) or not is_concrete(label_mask):
        return
    array = _host(preferences)
    labeled = ~np.isnan(array) if label_mask is None else np.asarray(label_mask, bool)
    if label_mask is not None:
        check_shape("label_mask", label_mask, array.shape)
        if np.isnan(array[labeled]).any():
            raise ValueError(f"{name} contains NaN at labeled entry {_first_index(labeled & np.isnan(array))}")
    check_unit_interval(name, np.where(labeled, array, np.nan), allow_nan=True)
    both = labeled & np.swapaxes(labeled, -1, -2)
    total = np.where(both, array + np.swapaxes(array, -1, -2), 1.0)
    off_diagonal = ~np.eye(array.shape[-1], dtype=bool)
    bad = (np.abs(total - 1.0) > atol) & off_diagonal
    if bad.any():
        k, x, i, j = _first_index(bad)
        raise ValueError(
            f"{name}: P[i, j] + P[j, i] must be 1 where both are labeled; at [k, x, i, j] = {(k, x, i, j)}: "
            f"{array[k, x, i, j]:.6g} + {array[k, x, j, i]:.6g} = {total[k, x, i, j]:.6g}"
        )


def check_distribution(name: str, probs, axis: int = -1, atol: float = 1e-4, mask=None) -> None:
    """Nonnegative, finite rows summing to one (policies, prompt weights); ``axis=None`` for a single vector."""
    if not is_concrete(probs) or not is_concrete(mask):
        return
    array = _host(probs)
    check_finite(name, array)
    if (array < 0).any():
        raise ValueError(f"{name} must be nonnegative; entry {_first_index(array < 0)} is negative")
    if mask is not None:
        array = np.where(np.asarray(mask, bool), array, 0.0)
    sums = np.asarray(array.sum(axis=axis))
    bad = np.abs(sums - 1.0) > atol
    if mask is not None:
        bad &= np.asarray(mask, bool).any(axis=axis)
    if np.any(bad):
        if axis is None:
            raise ValueError(f"{name} must sum to 1, sums to {float(sums):.8g}")
        index = _first_index(np.atleast_1d(bad))
        row = index[0] if len(index) == 1 else index
        raise ValueError(f"{name}: row {row} sums to {np.atleast_1d(sums)[index]:.8g}, expected 1")


def check_probability(name: str, value) -> float:
    """A scalar in ``[0, 1]`` given as a Python number; returns it as float."""
    number = float(value)
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return number
