"""Tabular preference problems: seeded generators, validation and ``.npz`` I/O.

A problem has ``X`` prompts, ``N`` candidate responses per prompt and ``K``
objectives (0 = primary, ``1..K-1`` = constrained secondaries):

* ``pref[k, x, i, j] = P_k(y_i > y_j | x)`` in ``[0, 1]``, NaN for unlabeled
  pairs; where both ``(i, j)`` and ``(j, i)`` are labeled they sum to 1; the
  diagonal is 0.5 (a tie with itself);
* ``ref[x, n]``: reference policy (rows sum to 1);
* ``mu[x, n]``: comparison policy for win rates (None = ``ref``);
* ``prompt_weights[x]``: prompt distribution (uniform by default).

This module is NumPy only (no JAX).
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from scipy.special import expit, logit, ndtr

from mopo_jax import validation
from mopo_jax.synthetic.exact import (
    default_threshold_grid,
    solve_constrained,
    win_rates_numpy,
)

__all__ = [
    "PreferenceProblem",
    "make_bt_conflicting",
    "make_bt_aligned",
    "make_intransitive",
    "make_thurstone_ties",
    "make_three_objectives",
    "make_sparse_labels",
    "ALL_STRUCTURES",
    "validate_problem",
    "load_problem",
    "save_problem",
]

#: KL temperature used in the MOPO paper's experiments.
DEFAULT_TAU = 0.08

_COMPLEMENT_TOL = 1e-6
_SUM_TOL = 1e-6


@dataclasses.dataclass
class PreferenceProblem:
    """A tabular multi-objective preference problem.

    Attributes:
      name: short identifier.
      description: human-readable description of the structure.
      pref: ``[K, X, N, N]`` float64 preference probabilities, NaN = unlabeled.
      ref: ``[X, N]`` reference policy.
      mu: ``[X, N]`` comparison policy, or None to compare against ``ref``.
      prompt_weights: ``[X]`` prompt distribution (None -> uniform).
      tau: KL temperature (default 0.08, as in the paper).
      threshold_grid: optional suggested ``[M, K-1]`` thresholds for a sweep.
    """

    name: str
    description: str
    pref: np.ndarray
    ref: np.ndarray
    mu: Optional[np.ndarray] = None
    prompt_weights: Optional[np.ndarray] = None
    tau: float = DEFAULT_TAU
    threshold_grid: Optional[np.ndarray] = None

    def __post_init__(self):
        self.pref = np.asarray(self.pref, dtype=np.float64)
        self.ref = np.asarray(self.ref, dtype=np.float64)
        if self.mu is not None:
            self.mu = np.asarray(self.mu, dtype=np.float64)
        if self.prompt_weights is None and self.pref.ndim == 4 and self.pref.shape[1] > 0:
            X = self.pref.shape[1]
            self.prompt_weights = np.full(X, 1.0 / X)
        elif self.prompt_weights is not None:
            self.prompt_weights = np.asarray(self.prompt_weights, dtype=np.float64)
        self.tau = float(self.tau)
        if self.threshold_grid is not None:
            grid = np.asarray(self.threshold_grid, dtype=np.float64)
            if grid.ndim == 1 and self.pref.ndim == 4 and self.pref.shape[0] == 2:
                grid = grid[:, None]
            self.threshold_grid = grid

    @property
    def num_objectives(self) -> int:
        return int(self.pref.shape[0])

    @property
    def num_prompts(self) -> int:
        return int(self.pref.shape[1])

    @property
    def num_candidates(self) -> int:
        return int(self.pref.shape[2])

    @property
    def comparison_policy(self) -> np.ndarray:
        """``mu`` if given, else ``ref``."""
        return self.ref if self.mu is None else self.mu

    def win_rates(self, include_self: bool = True) -> np.ndarray:
        """``[K, X, N]`` win rates against :attr:`comparison_policy`."""
        return win_rates_numpy(self.pref, self.comparison_policy, include_self=include_self)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def _fail(source: str, field: str, msg: str):
    raise ValueError(f"{source}: field '{field}': {msg}")


def _check_distribution(arr, field: str, source: str, shape):
    if arr.shape != shape:
        _fail(source, field, f"expected shape {shape}, got {arr.shape}")
    validation.check_distribution(f"{source}: field '{field}'", arr, axis=-1 if arr.ndim > 1 else None,
                                  atol=_SUM_TOL)


def validate_problem(problem: PreferenceProblem, source: Optional[str] = None) -> PreferenceProblem:
    """Check a problem's fields; raise ``ValueError`` naming the source and field.

    Checks: ``pref`` is ``[K, X, N, N]`` with ``K, X, N >= 1``; labeled entries
    lie in ``[0, 1]``; the diagonal is 0.5 (or NaN); ``P[i, j] + P[j, i] = 1``
    (tolerance 1e-6) wherever both are labeled; ``ref`` (and ``mu`` if given) is
    ``[X, N]``, without NaN, nonnegative, rows summing to 1; ``prompt_weights``
    is ``[X]``, without NaN, nonnegative, summing to 1; ``tau > 0``; an optional
    ``threshold_grid`` is ``[M, K-1]`` within ``[0, 1]``.

    Args:
      problem: the problem to check.
      source: name used in error messages (e.g. a file path); defaults to
        ``problem.name``.

    Returns:
      The problem itself (for chaining).

    Raises:
      ValueError: ``"<source>: field '<field>': <what is wrong>"``.
    """
    src = str(source) if source is not None else str(problem.name)
    pref = np.asarray(problem.pref)
    if pref.ndim != 4:
        _fail(src, "pref", f"expected 4 dimensions [K, X, N, N], got ndim={pref.ndim} "
                           f"(shape {pref.shape})")
    K, X, N, N2 = pref.shape
    if N != N2:
        _fail(src, "pref", f"last two dimensions must be equal [.., N, N], got shape {pref.shape}")
    if K < 1:
        _fail(src, "pref", f"need at least one objective (K >= 1), got K={K}")
    if X < 1 or N < 1:
        _fail(src, "pref", f"need X >= 1 prompts and N >= 1 candidates, got shape {pref.shape}")
    if not np.issubdtype(pref.dtype, np.floating):
        _fail(src, "pref", f"expected a float array, got dtype {pref.dtype}")
    validation.check_preferences(f"{src}: field 'pref'", pref, atol=_COMPLEMENT_TOL)
    diag = np.diagonal(pref, axis1=2, axis2=3)  # [K, X, N]
    bad_diag = ~np.isnan(diag) & (np.abs(diag - 0.5) > _COMPLEMENT_TOL)
    if np.any(bad_diag):
        k, x, i = (int(v) for v in np.argwhere(bad_diag)[0])
        _fail(src, "pref", f"diagonal must be 0.5 (a tie with itself), got {diag[k, x, i]:.6g} "
                           f"at index [k, x, i, i] = {(k, x, i, i)}")

    ref = np.asarray(problem.ref, dtype=np.float64)
    _check_distribution(ref, "ref", src, (X, N))
    if problem.mu is not None:
        _check_distribution(np.asarray(problem.mu, dtype=np.float64), "mu", src, (X, N))
    if problem.prompt_weights is None:
        _fail(src, "prompt_weights", "missing")
    _check_distribution(np.asarray(problem.prompt_weights, dtype=np.float64), "prompt_weights", src, (X,))
    tau = float(problem.tau)
    if not np.isfinite(tau) or tau <= 0:
        _fail(src, "tau", f"must be a finite positive number, got {tau}")
    if problem.threshold_grid is not None:
        grid = np.asarray(problem.threshold_grid, dtype=np.float64)
        if grid.ndim != 2 or grid.shape[1] != K - 1:
            _fail(src, "threshold_grid", f"expected shape [M, K-1] = [M, {K - 1}], got {grid.shape}")
        if not np.all(np.isfinite(grid)) or np.any(grid < 0) or np.any(grid > 1):
            _fail(src, "threshold_grid", "thresholds must be finite and lie in [0, 1]")
    return problem


# ---------------------------------------------------------------------------
# I/O
# ---------------------------------------------------------------------------

_OPTIONAL_KEYS = ("mu", "prompt_weights", "tau", "threshold_grid", "name", "description")


def load_problem(path) -> PreferenceProblem:
    """Load and validate a problem from a ``.npz`` file.

    Required keys: ``pref`` ``[K, X, N, N]`` float (NaN = unlabeled) and
    ``ref`` ``[X, N]``.  Optional: ``mu`` ``[X, N]``, ``prompt_weights`` ``[X]``
    (default uniform), ``tau`` (scalar, default 0.08), ``threshold_grid``
    ``[M, K-1]``, ``name`` and ``description`` (strings; the name defaults to
    the file stem).  Other keys are ignored.

    Args:
      path: path to the ``.npz`` file.

    Returns:
      A validated :class:`PreferenceProblem`.

    Raises:
      ValueError: if the file cannot be read, a required key is missing, or a
        field is invalid; the message names the file and the field.
    """
    src = os.fspath(path)
    try:
        with np.load(src, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        # a truncated or corrupt archive surfaces as BadZipFile / EOFError / zlib.error
        raise ValueError(f"{src}: cannot read as a .npz archive "
                         f"({type(exc).__name__}: {exc})") from exc
    for key in ("pref", "ref"):
        if key not in arrays:
            raise ValueError(f"{src}: missing required field '{key}' "
                             f"(found keys: {sorted(arrays)})")

    def as_float(key):
        try:
            return np.asarray(arrays[key], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{src}: field '{key}': not numeric ({exc})") from exc

    pref = as_float("pref")
    ref = as_float("ref")
    mu = as_float("mu") if "mu" in arrays else None
    prompt_weights = as_float("prompt_weights") if "prompt_weights" in arrays else None
    tau = DEFAULT_TAU
    if "tau" in arrays:
        tau_arr = as_float("tau")
        if tau_arr.size != 1:
            raise ValueError(f"{src}: field 'tau': expected a scalar, got shape {tau_arr.shape}")
        tau = float(tau_arr.reshape(()))
    grid = as_float("threshold_grid") if "threshold_grid" in arrays else None
    name = str(arrays["name"]) if "name" in arrays else Path(src).stem
    description = str(arrays["description"]) if "description" in arrays else f"loaded from {src}"
    if pref.ndim != 4:
        raise ValueError(f"{src}: field 'pref': expected 4 dimensions [K, X, N, N], got "
                         f"ndim={pref.ndim} (shape {pref.shape})")
    if prompt_weights is None and pref.shape[1] == 0:
        prompt_weights = np.zeros(0)
    problem = PreferenceProblem(name=name, description=description, pref=pref, ref=ref, mu=mu,
                                prompt_weights=prompt_weights, tau=tau, threshold_grid=grid)
    problem = validate_problem(problem, source=src)
    _check_labelled(problem.pref, src)
    return problem


def _check_labelled(pref: np.ndarray, src: str) -> None:
    """A user's problem must label at least one off-diagonal pair of every objective (NaN = unlabelled)."""
    K, X, N = pref.shape[0], pref.shape[1], pref.shape[2]
    if X == 0 or N < 2:
        return  # no pair exists to label; the shape checks govern such problems
    off = ~np.eye(N, dtype=bool)
    labelled = np.sum(~np.isnan(pref) & off, axis=(1, 2, 3))  # [K]
    if not labelled.any():
        _fail(src, "pref", f"no pair is labelled: every off-diagonal entry of all {K} objectives is NaN")
    empty = [int(k) for k in np.flatnonzero(labelled == 0)]
    if empty:
        _fail(src, "pref", f"objective(s) {empty} (of K={K}) have no labelled pair: every off-diagonal entry "
                           "is NaN")


def save_problem(problem: PreferenceProblem, path) -> None:
    """Write a problem to ``.npz`` (readable by :func:`load_problem`).

    Args:
      problem: the problem (validated before writing).
      path: destination file (NumPy appends ``.npz`` if missing).
    """
    validate_problem(problem)
    arrays = dict(
        pref=np.asarray(problem.pref, dtype=np.float64),
        ref=np.asarray(problem.ref, dtype=np.float64),
        prompt_weights=np.asarray(problem.prompt_weights, dtype=np.float64),
        tau=np.float64(problem.tau),
        name=np.str_(problem.name),
        description=np.str_(problem.description),
    )
    if problem.mu is not None:
        arrays["mu"] = np.asarray(problem.mu, dtype=np.float64)
    if problem.threshold_grid is not None:
        arrays["threshold_grid"] = np.asarray(problem.threshold_grid, dtype=np.float64)
    np.savez(path, **arrays)


# ---------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------


def _reference_policy(rng: np.random.Generator, X: int, N: int, concentration: float = 1.0,
                      floor: float = 0.1) -> np.ndarray:
    """Non-uniform, strictly positive reference: ``(1-floor) Dir(c) + floor / N``."""
    ref = (1.0 - floor) * rng.dirichlet(np.full(N, concentration), size=X) + floor / N
    return ref / ref.sum(axis=1, keepdims=True)


def _pref_from_scores(scores: np.ndarray, link: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``P[i, j] = link(S[i, j])`` above the diagonal, ``1 - P`` below, 0.5 on it.

    ``scores[..., i, j]`` must be antisymmetric; only ``i < j`` entries are used
    so that ``P + P^T = 1`` holds exactly.
    """
    N = scores.shape[-1]
    iu = np.triu_indices(N, k=1)
    upper = link(scores[..., iu[0], iu[1]])
    pref = np.full(scores.shape, 0.5)
    pref[..., iu[0], iu[1]] = upper
    pref[..., iu[1], iu[0]] = 1.0 - upper
    return pref


def _bt(rewards: np.ndarray, sharpness: float) -> np.ndarray:
    """Bradley-Terry ``P(i > j) = sigmoid(sharpness (r_i - r_j))`` for ``[..., N]`` rewards."""
    diff = rewards[..., :, None] - rewards[..., None, :]
    return _pref_from_scores(sharpness * diff, expit)


def _correlated(rng, base: np.ndarray, correlation: float) -> np.ndarray:
    return correlation * base + np.sqrt(1.0 - correlation ** 2) * rng.standard_normal(base.shape)


def _check_sizes(num_prompts: int, num_candidates: int, min_candidates: int = 2):
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    if num_candidates < min_candidates:
        raise ValueError(f"num_candidates must be >= {min_candidates}, got {num_candidates}")


def _finish(problem: PreferenceProblem, grid: bool = True, num: int = 11) -> PreferenceProblem:
    if grid and problem.threshold_grid is None and problem.num_objectives > 1:
        problem.threshold_grid = default_threshold_grid(
            problem.win_rates(), problem.ref, problem.prompt_weights, problem.tau, num=num)
    return validate_problem(problem)


def make_bt_conflicting(seed: int = 0, num_prompts: int = 6, num_candidates: int = 8,
                        correlation: float = -0.8, sharpness: float = 4.0,
                        tau: float = DEFAULT_TAU) -> PreferenceProblem:
    """Bradley-Terry preferences with two conflicting objectives (K = 2).

    Per prompt, latent rewards ``r_0 ~ N(0, I)`` and
    ``r_1 = c r_0 + sqrt(1 - c^2) eps`` with ``c = correlation < 0``
    (anti-correlated), and ``P_k(i > j) = sigmoid(sharpness (r_k,i - r_k,j))``.
    All pairs labeled; reference policy ``0.9 Dir(1) + 0.1 / N``; uniform
    prompt weights; ``threshold_grid`` from
    :func:`~mopo_jax.synthetic.exact.default_threshold_grid` (11 points + 2
    infeasible).
    """
    _check_sizes(num_prompts, num_candidates)
    rng = np.random.default_rng(seed)
    X, N = num_prompts, num_candidates
    r0 = rng.standard_normal((X, N))
    r1 = _correlated(rng, r0, correlation)
    pref = np.stack([_bt(r0, sharpness), _bt(r1, sharpness)])
    ref = _reference_policy(rng, X, N)
    problem = PreferenceProblem(
        name="bt_conflicting",
        description=(f"Bradley-Terry, 2 objectives with latent-reward correlation {correlation} "
                     f"(conflicting), sharpness {sharpness}, X={X}, N={N}, seed={seed}"),
        pref=pref, ref=ref, tau=tau)
    return _finish(problem)


def make_bt_aligned(seed: int = 0, num_prompts: int = 6, num_candidates: int = 8,
                    correlation: float = 0.9, sharpness: float = 4.0,
                    tau: float = DEFAULT_TAU) -> PreferenceProblem:
    """Bradley-Terry preferences with two aligned objectives (K = 2).

    As :func:`make_bt_conflicting` but with positively correlated latent
    rewards (``correlation = 0.9``).  Optimising the primary objective alone
    then also improves the secondary one, so the suggested ``threshold_grid``
    is slack: with ``u = V_1(pi_0)`` the secondary value of the unconstrained
    solution and ``v = V_1(ref)``, ``lo = min(v, u - 0.05)`` and the grid is 5
    points in ``[lo, lo + (u - lo) / 2]`` ("do not get worse on the secondary
    objective than the reference").  The optimal multiplier is 0 on all of
    them.
    """
    _check_sizes(num_prompts, num_candidates)
    rng = np.random.default_rng(seed)
    X, N = num_prompts, num_candidates
    r0 = rng.standard_normal((X, N))
    r1 = _correlated(rng, r0, correlation)
    pref = np.stack([_bt(r0, sharpness), _bt(r1, sharpness)])
    ref = _reference_policy(rng, X, N)
    problem = PreferenceProblem(
        name="bt_aligned",
        description=(f"Bradley-Terry, 2 objectives with latent-reward correlation {correlation} "
                     f"(aligned; constraint slack at the suggested thresholds), sharpness "
                     f"{sharpness}, X={X}, N={N}, seed={seed}"),
        pref=pref, ref=ref, tau=tau)
    w = problem.win_rates()
    u = solve_constrained(w, ref, problem.prompt_weights, tau, [0.0]).values[1]
    v = float(problem.prompt_weights @ np.sum(ref * w[1], axis=1))
    lo = max(0.0, min(v, u - 0.05))
    problem.threshold_grid = np.linspace(lo, lo + 0.5 * (u - lo), 5)[:, None]
    return _finish(problem)


def make_intransitive(seed: int = 0, num_prompts: int = 6, num_candidates: int = 6,
                      cycle_strength: float = 0.9, sharpness: float = 3.0,
                      secondary_correlation: float = -0.5,
                      tau: float = DEFAULT_TAU) -> PreferenceProblem:
    """Intransitive (rock-paper-scissors) primary objective, Bradley-Terry secondary.

    Per prompt the candidates are randomly permuted into blocks of 3 (a
    leftover of 1-2 candidates forms a partial block).  Within a full block
    ``(a, b, c)`` the primary preference is cyclic, ``P_0(a > b) = P_0(b > c) =
    P_0(c > a) = cycle_strength``, so no Bradley-Terry reward can explain it.
    Across blocks it is Bradley-Terry on a per-block reward plus a small
    per-candidate jitter: ``P_0(i > j) = sigmoid(sharpness (R_B(i) + 0.2 e_i -
    R_B(j) - 0.2 e_j))``.  The secondary objective is Bradley-Terry on rewards
    with correlation ``secondary_correlation`` to the primary's across-block
    score.  All pairs labeled; ``num_candidates >= 3``.
    """
    _check_sizes(num_prompts, num_candidates, min_candidates=3)
    rng = np.random.default_rng(seed)
    X, N = num_prompts, num_candidates
    cyc = float(logit(cycle_strength))
    pref0 = np.empty((X, N, N))
    r1 = np.empty((X, N))
    for x in range(X):
        perm = rng.permutation(N)
        block_of = np.empty(N, dtype=int)
        block_of[perm] = np.arange(N) // 3
        num_blocks = int(block_of.max()) + 1
        score = rng.standard_normal(num_blocks)[block_of] + 0.2 * rng.standard_normal(N)
        S = sharpness * (score[:, None] - score[None, :])
        for start in range(0, N - 2, 3):
            a, b, c = perm[start:start + 3]
            for winner, loser in ((a, b), (b, c), (c, a)):
                S[winner, loser], S[loser, winner] = cyc, -cyc
        pref0[x] = _pref_from_scores(S, expit)
        r1[x] = _correlated(rng, score / score.std() if score.std() > 0 else score,
                            secondary_correlation)
    pref = np.stack([pref0, _bt(r1, sharpness)])
    ref = _reference_policy(rng, X, N)
    problem = PreferenceProblem(
        name="intransitive",
        description=(f"Primary: rock-paper-scissors cycles (strength {cycle_strength}) in blocks "
                     f"of 3 plus Bradley-Terry across blocks; secondary: Bradley-Terry "
                     f"(correlation {secondary_correlation}); X={X}, N={N}, seed={seed}"),
        pref=pref, ref=ref, tau=tau)
    return _finish(problem)


def make_thurstone_ties(seed: int = 0, num_prompts: int = 6, num_candidates: int = 8,
                        noise: float = 0.5, tie_fraction: float = 0.2,
                        correlation: float = -0.6,
                        tau: float = DEFAULT_TAU) -> PreferenceProblem:
    """Thurstone (probit) preferences with ties, two objectives (K = 2).

    Per prompt latent utilities ``r_0 ~ N(0, I)``, ``r_1`` correlated with
    ``r_0`` (``correlation``), and ``P_k(i > j) = Phi((r_k,i - r_k,j) /
    (sqrt(2) noise))`` (each judgement sees independent ``N(0, noise^2)``
    noise).  Ties: in every prompt two candidates are duplicates (equal latent
    utilities in both objectives, hence ``P = 0.5`` exactly), and a further
    ``tie_fraction`` of the pairs is declared a tie (``P = 0.5``) by the
    annotator, independently per objective (the duplicate inherits the ties of
    its original, so the two stay indistinguishable).  Prompt weights are non-uniform (Dirichlet), and win rates
    are computed against the uniform comparison policy ``mu`` (a round-robin
    tournament) rather than ``ref``.
    """
    _check_sizes(num_prompts, num_candidates)
    rng = np.random.default_rng(seed)
    X, N = num_prompts, num_candidates
    r0 = rng.standard_normal((X, N))
    r1 = _correlated(rng, r0, correlation)
    duplicates = []
    for x in range(X):
        i, j = rng.choice(N, size=2, replace=False)
        r0[x, j], r1[x, j] = r0[x, i], r1[x, i]
        duplicates.append((i, j))
    scale = np.sqrt(2.0) * noise
    pref = np.stack([
        _pref_from_scores((r[..., :, None] - r[..., None, :]) / scale, ndtr) for r in (r0, r1)
    ])
    iu = np.triu_indices(N, k=1)
    for k in range(2):
        for x, (i, j) in enumerate(duplicates):
            tie = np.zeros((N, N), dtype=bool)
            tie[iu] = rng.random(iu[0].size) < tie_fraction
            tie |= tie.T
            # The duplicate j is judged exactly like i against everyone else.
            tie[j, :], tie[:, j] = tie[i, :], tie[:, i]
            np.fill_diagonal(tie, False)
            pref[k, x][tie] = 0.5
    ref = _reference_policy(rng, X, N)
    prompt_weights = rng.dirichlet(np.full(X, 2.0))
    problem = PreferenceProblem(
        name="thurstone_ties",
        description=(f"Thurstone (probit, noise {noise}) with duplicate candidates and "
                     f"{tie_fraction:.0%} annotator ties, 2 objectives (correlation "
                     f"{correlation}), uniform comparison policy, X={X}, N={N}, seed={seed}"),
        pref=pref, ref=ref, mu=np.full((X, N), 1.0 / N), prompt_weights=prompt_weights, tau=tau)
    return _finish(problem)


def make_three_objectives(seed: int = 0, num_prompts: int = 6, num_candidates: int = 8,
                          sharpness: float = 4.0, tau: float = DEFAULT_TAU) -> PreferenceProblem:
    """Bradley-Terry with a primary that conflicts with two secondary objectives (K = 3).

    Candidate rewards are jointly Gaussian with unit variances, correlation
    -0.4 between the primary and each secondary and +0.2 between the two
    secondaries: improving either secondary costs primary win rate, yet the
    region that beats the reference on all three objectives is not empty (a
    zero-sum design, such as three rewards at 120 degrees, would leave no
    hypervolume to measure). The suggested ``threshold_grid`` is
    :func:`~mopo_jax.synthetic.exact.default_threshold_grid` (ray towards the
    utopia point plus a 3x3 grid); near the end of the ray both secondary
    constraints are active (both multipliers > 0).
    """
    _check_sizes(num_prompts, num_candidates)
    rng = np.random.default_rng(seed)
    X, N = num_prompts, num_candidates
    correlation = np.array([[1.0, -0.4, -0.4], [-0.4, 1.0, 0.2], [-0.4, 0.2, 1.0]])
    z = rng.standard_normal((X, N, 3))
    rewards = np.einsum("xnd,kd->kxn", z, np.linalg.cholesky(correlation))
    pref = np.stack([_bt(r, sharpness) for r in rewards])
    ref = _reference_policy(rng, X, N)
    problem = PreferenceProblem(
        name="three_objectives",
        description=(f"Bradley-Terry, primary reward correlated -0.4 with each of two secondary "
                     f"rewards (secondaries +0.2 with each other), sharpness {sharpness}, X={X}, "
                     f"N={N}, seed={seed}"),
        pref=pref, ref=ref, tau=tau)
    return _finish(problem)


def make_sparse_labels(seed: int = 0, num_prompts: int = 6, num_candidates: int = 8,
                       label_fraction: float = 0.5, correlation: float = -0.8,
                       sharpness: float = 4.0, tau: float = DEFAULT_TAU) -> PreferenceProblem:
    """Conflicting Bradley-Terry (as :func:`make_bt_conflicting`) with missing labels.

    For each objective and prompt every unordered pair ``{i, j}`` (``i != j``)
    is labeled independently with probability ``label_fraction``; unlabeled
    pairs have ``pref[k, x, i, j] = pref[k, x, j, i] = NaN``.  A candidate left
    without any labeled opponent gets one random pair labeled, so every win
    rate is informative.  The diagonal stays 0.5.
    """
    _check_sizes(num_prompts, num_candidates)
    if not 0.0 < label_fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
    rng = np.random.default_rng(seed)
    X, N = num_prompts, num_candidates
    r0 = rng.standard_normal((X, N))
    r1 = _correlated(rng, r0, correlation)
    pref = np.stack([_bt(r0, sharpness), _bt(r1, sharpness)])
    iu = np.triu_indices(N, k=1)
    for k in range(2):
        for x in range(X):
            keep = rng.random(iu[0].size) < label_fraction
            labeled = np.zeros((N, N), dtype=bool)
            labeled[iu[0][keep], iu[1][keep]] = True
            labeled |= labeled.T
            for i in range(N):
                if not labeled[i].any():
                    j = rng.choice(np.delete(np.arange(N), i))
                    labeled[i, j] = labeled[j, i] = True
            np.fill_diagonal(labeled, True)
            pref[k, x][~labeled] = np.nan
    ref = _reference_policy(rng, X, N)
    problem = PreferenceProblem(
        name="sparse_labels",
        description=(f"Bradley-Terry, 2 conflicting objectives (correlation {correlation}) with "
                     f"about {label_fraction:.0%} of pairs labeled per objective, X={X}, N={N}, "
                     f"seed={seed}"),
        pref=pref, ref=ref, tau=tau)
    return _finish(problem)


#: Structure name -> generator ``make_<name>(seed=0, num_prompts=..., num_candidates=...)``.
ALL_STRUCTURES: dict[str, Callable[..., PreferenceProblem]] = {
    "bt_conflicting": make_bt_conflicting,
    "bt_aligned": make_bt_aligned,
    "intransitive": make_intransitive,
    "thurstone_ties": make_thurstone_ties,
    "three_objectives": make_three_objectives,
    "sparse_labels": make_sparse_labels,
}
