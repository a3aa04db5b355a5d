"""Exact NumPy/SciPy reference solutions for tabular constrained preference problems.

This module is deliberately independent of JAX: it is the yardstick against
which the JAX MOPO implementation is checked.

Problem (tabular)
-----------------
``X`` prompts, ``N`` candidate responses per prompt, ``K`` objectives (objective
0 is the primary one, objectives ``1..K-1`` are constrained).  Given win rates
``w[k, x, n]`` (see :func:`win_rates_numpy`), a reference policy ``ref[x, n]``,
prompt weights ``p[x]``, a temperature ``tau > 0`` and thresholds ``b[k-1]``,
solve::

    max_pi  V_0(pi) - tau * KL(pi || ref)   s.t.  V_k(pi) >= b_k,  k = 1..K-1,

    V_k(pi) = sum_x p(x) sum_y pi(y|x) w_k(x, y),
    KL(pi || ref) = sum_x p(x) sum_y pi(y|x) log(pi(y|x) / ref(y|x)).

For multipliers ``lam >= 0`` the Lagrangian is maximised in closed form by::

    pi_lam(y|x) = ref(y|x) exp((w_0 + lam . w_{1:})(x, y) / tau) / Z_lam(x),

and the (convex) dual function is::

    D(lam) = tau * sum_x p(x) log Z_lam(x) - lam . b,
    grad D(lam) = V_{1:}(pi_lam) - b,
    hess D(lam) = (1/tau) sum_x p(x) Cov_{pi_lam(.|x)}(w_{1:}).

:func:`solve_constrained` minimises ``D`` over ``lam >= 0`` with a projected
Newton method (Bertsekas 1982) with an Armijo line search along the projection
arc, and checks the projected-gradient norm against ``tol``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional, Sequence

import numpy as np
from scipy.optimize import linprog

__all__ = [
    "ExactSolution",
    "win_rates_numpy",
    "max_feasibility_margin",
    "solve_constrained",
    "exact_front",
    "default_threshold_grid",
    "hypervolume_2d",
    "hypervolume",
    "hypervolume_ratio",
]

#: LP feasibility margins at or below this value are treated as "not strictly
#: feasible": the dual optimum is then at infinity (or does not exist).
FEASIBILITY_MARGIN_MIN = 1e-7

_SUM_TOL = 1e-6


# ---------------------------------------------------------------------------
# Win rates
# ---------------------------------------------------------------------------


def win_rates_numpy(pref, mu, include_self: bool = True) -> np.ndarray:
    """Win rates of every candidate against the comparison policy ``mu``.

    ``w_k(x, y_i) = sum_j mu(x, j) m(i, j) P_k(i > j | x) / sum_j mu(x, j) m(i, j)``
    where ``m(i, j) = 1`` if the pair is labeled (not NaN) and, when
    ``include_self`` is False, ``i != j``.  If the denominator is 0 the win rate
    is 0.5.

    Args:
      pref: ``[K, X, N, N]`` preference probabilities, NaN for unlabeled pairs.
      mu: ``[X, N]`` comparison policy (nonnegative weights; they need not be
        normalised since the formula is a ratio).
      include_self: whether the diagonal pair ``(i, i)`` (a tie, 0.5) counts.

    Returns:
      ``[K, X, N]`` float64 array of win rates in ``[0, 1]``.
    """
    pref = np.asarray(pref, dtype=np.float64)
    mu = np.asarray(mu, dtype=np.float64)
    if pref.ndim != 4 or pref.shape[2] != pref.shape[3]:
        raise ValueError(f"pref must have shape [K, X, N, N], got {pref.shape}")
    _, X, N, _ = pref.shape
    if mu.shape != (X, N):
        raise ValueError(f"mu must have shape [X, N] = {(X, N)}, got {mu.shape}")
    if not np.all(np.isfinite(mu)) or np.any(mu < 0):
        raise ValueError("mu must be finite and nonnegative")
    labeled = ~np.isnan(pref)
    if not include_self:
        labeled = labeled & ~np.eye(N, dtype=bool)[None, None]
    weights = labeled * mu[None, :, None, :]  # [K, X, N(i), N(j)]
    num = np.sum(weights * np.where(labeled, pref, 0.0), axis=-1)
    den = np.sum(weights, axis=-1)
    safe = den > 0
    return np.where(safe, num / np.where(safe, den, 1.0), 0.5)


# ---------------------------------------------------------------------------
# Input checking
# ---------------------------------------------------------------------------


def _check_w(w) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 3:
        raise ValueError(f"w must have shape [K, X, N], got shape {w.shape}")
    if w.shape[0] < 1 or w.shape[1] < 1 or w.shape[2] < 1:
        raise ValueError(f"w must have K, X, N >= 1, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("w contains non-finite values")
    if np.any(w < -1e-12) or np.any(w > 1 + 1e-12):
        raise ValueError("w (win rates) must lie in [0, 1]")
    return w


def _check_prompt_weights(prompt_weights, X: int) -> np.ndarray:
    if prompt_weights is None:
        return np.full(X, 1.0 / X)
    p = np.asarray(prompt_weights, dtype=np.float64)
    if p.shape != (X,):
        raise ValueError(f"prompt_weights must have shape [X] = ({X},), got {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("prompt_weights must be finite and nonnegative")
    if abs(p.sum() - 1.0) > _SUM_TOL:
        raise ValueError(f"prompt_weights must sum to 1, got {p.sum():.8g}")
    return p / p.sum()


def _check_ref(ref, X: int, N: int) -> np.ndarray:
    ref = np.asarray(ref, dtype=np.float64)
    if ref.shape != (X, N):
        raise ValueError(f"ref must have shape [X, N] = {(X, N)}, got {ref.shape}")
    if not np.all(np.isfinite(ref)) or np.any(ref < 0):
        raise ValueError("ref must be finite and nonnegative")
    sums = ref.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > _SUM_TOL)
    if bad.size:
        raise ValueError(f"ref rows must sum to 1; row {bad[0]} sums to {sums[bad[0]]:.8g}")
    return ref / sums[:, None]


def _check_tau(tau) -> float:
    tau = float(tau)
    if not np.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite positive number, got {tau}")
    return tau


def _check_thresholds(thresholds, K: int) -> np.ndarray:
    if thresholds is None:
        if K == 1:
            return np.zeros(0)
        raise ValueError(f"thresholds are required for K = {K} objectives (need {K - 1})")
    b = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    if b.ndim != 1 or b.shape[0] != K - 1:
        raise ValueError(
            f"thresholds must have shape [K-1] = ({K - 1},), got {np.shape(thresholds)}"
        )
    if not np.all(np.isfinite(b)):
        raise ValueError("thresholds must be finite")
    if np.any(b < 0) or np.any(b > 1):
        raise ValueError(f"thresholds must lie in [0, 1], got {b}")
    return b


def _check_all(w, ref, prompt_weights, tau):
    w = _check_w(w)
    _, X, N = w.shape
    ref = _check_ref(ref, X, N)
    p = _check_prompt_weights(prompt_weights, X)
    tau = _check_tau(tau)
    return w, ref, p, tau


# ---------------------------------------------------------------------------
# Linear programs over the set of (supported) policies
# ---------------------------------------------------------------------------


def _lp_max_step(w_sec, prompt_weights, support, base, direction) -> float:
    """max s  s.t.  V_k(pi) - s * direction_k >= base_k for all k, pi a policy."""
    Kc, X, N = w_sec.shape
    nvar = X * N + 1
    c = np.zeros(nvar)
    c[-1] = -1.0
    A_ub = np.zeros((Kc, nvar))
    A_ub[:, :-1] = -(prompt_weights[None, :, None] * w_sec).reshape(Kc, X * N)
    A_ub[:, -1] = direction
    b_ub = -np.asarray(base, dtype=np.float64)
    A_eq = np.zeros((X, nvar))
    for x in range(X):
        A_eq[x, x * N:(x + 1) * N] = 1.0
    b_eq = np.ones(X)
    upper = np.where(support.reshape(-1), 1.0, 0.0)
    bounds = [(0.0, u) for u in upper] + [(None, None)]
    res = linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=bounds,
                  method="highs")
    if res.status != 0:  # pragma: no cover - the LP is always feasible/bounded here
        raise RuntimeError(f"feasibility LP failed: {res.message}")
    return float(-res.fun)


def max_feasibility_margin(w, prompt_weights, thresholds, support=None) -> float:
    """Largest uniform slack with which the secondary constraints can be met.

    Solves the linear program::

        max_{pi, t} t   s.t.  V_k(pi) - b_k >= t  (k = 1..K-1),
                              pi(.|x) in the probability simplex (on ``support``).

    Args:
      w: ``[K, X, N]`` win rates.
      prompt_weights: ``[X]`` prompt distribution (None = uniform).
      thresholds: ``[K-1]`` thresholds ``b`` in ``[0, 1]``.
      support: optional ``[X, N]`` boolean mask of candidates a policy may use
        (e.g. ``ref > 0``: a KL-regularised policy cannot leave the support of
        ``ref``).  Default: all candidates.

    Returns:
      The optimal ``t`` (float).  ``t < 0`` means the thresholds are infeasible,
      ``t == 0`` feasible only on the boundary.  ``+inf`` when ``K == 1``.
    """
    w = _check_w(w)
    K, X, N = w.shape
    p = _check_prompt_weights(prompt_weights, X)
    b = _check_thresholds(thresholds, K)
    if K == 1:
        return float("inf")
    if support is None:
        support = np.ones((X, N), dtype=bool)
    support = np.asarray(support, dtype=bool)
    if support.shape != (X, N):
        raise ValueError(f"support must have shape {(X, N)}, got {support.shape}")
    if not np.all(support.any(axis=1)):
        raise ValueError("support must allow at least one candidate per prompt")
    return _lp_max_step(w[1:], p, support, b, np.ones(K - 1))


# ---------------------------------------------------------------------------
# The dual problem
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExactSolution:
    """Solution of the KL-regularised constrained problem for one threshold vector.

    Attributes:
      feasible: whether the thresholds are strictly feasible (LP margin above
        ``FEASIBILITY_MARGIN_MIN``).  When False every numeric field is NaN.
      multipliers: ``[K-1]`` optimal Lagrange multipliers ``lam``.
      policy: ``[X, N]`` optimal policy ``pi_lam``.
      values: ``[K]`` objective values ``V_k(pi_lam)``.
      kl: ``KL(pi_lam || ref)`` (prompt-weighted).
      dual_value: ``D(lam)``.
      primal_value: ``V_0(pi_lam) - tau * KL(pi_lam || ref)``.
      max_violation: ``max(0, max_k (b_k - V_k(pi_lam)))``.
      grad_norm: Euclidean norm of the projected dual gradient
        ``lam - max(lam - grad D(lam), 0)`` (0 at a KKT point).
      thresholds: ``[K-1]`` the thresholds solved for.
      tau: the temperature.
      feasibility_margin: LP margin from :func:`max_feasibility_margin`.
      converged: whether ``grad_norm <= tol`` was reached.
      num_iterations: projected Newton iterations used.
    """

    feasible: bool
    multipliers: np.ndarray
    policy: np.ndarray
    values: np.ndarray
    kl: float
    dual_value: float
    primal_value: float
    max_violation: float
    grad_norm: float
    thresholds: np.ndarray
    tau: float
    feasibility_margin: float
    converged: bool
    num_iterations: int


def _support_log(ref: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(ref > 0, np.log(np.where(ref > 0, ref, 1.0)), -np.inf)


class _Dual:
    """Evaluates D, its gradient and Hessian (and the primal quantities)."""

    def __init__(self, w, log_ref, p, tau, b):
        self.w, self.log_ref, self.p, self.tau, self.b = w, log_ref, p, tau, b
        self.support = np.isfinite(log_ref)

    def evaluate(self, lam: np.ndarray, hessian: bool = True) -> dict:
        w, p, tau = self.w, self.p, self.tau
        s = w[0] + np.tensordot(lam, w[1:], axes=1)  # [X, N]
        logits = self.log_ref + s / tau
        m = np.max(logits, axis=1, keepdims=True)
        e = np.exp(logits - m)
        z = e.sum(axis=1, keepdims=True)
        pi = e / z
        log_z = (m + np.log(z))[:, 0]  # [X]
        per_prompt = np.einsum("xn,kxn->kx", pi, w)  # [K, X]
        values = per_prompt @ p  # [K]
        dual = tau * float(p @ log_z) - float(lam @ self.b)
        grad = values[1:] - self.b
        out = dict(pi=pi, log_z=log_z, values=values, dual=dual, grad=grad, s=s)
        if hessian:
            centered = np.where(self.support[None], w[1:] - per_prompt[1:, :, None], 0.0)
            weighted = centered * (pi * p[:, None])[None]
            out["hess"] = np.einsum("kxn,lxn->kl", weighted, centered) / tau
        return out

    def kl(self, ev: dict) -> float:
        # log pi - log ref = s / tau - log Z on the support.
        per_prompt = np.sum(np.where(self.support, ev["pi"] * ev["s"], 0.0), axis=1)
        kl_x = per_prompt / self.tau - ev["log_z"]
        return float(self.p @ np.maximum(kl_x, 0.0))


def _projected_grad(lam: np.ndarray, grad: np.ndarray) -> np.ndarray:
    return lam - np.maximum(lam - grad, 0.0)


def _newton_step(H: np.ndarray, g: np.ndarray, radius: float) -> np.ndarray:
    """Regularised Newton step ``-H^{-1} g``, capped to length ``radius``.

    The cap matters where ``pi_lam`` has (numerically) collapsed onto single
    candidates: the Hessian then underflows to ~0 while the gradient does not,
    and an uncapped step would be astronomically long.
    """
    g_norm = float(np.linalg.norm(g))
    if g_norm == 0.0:
        return np.zeros_like(g)
    fallback = -g / g_norm * radius
    scale = float(np.trace(H)) / H.shape[0]
    if not np.isfinite(scale) or scale <= 0:
        return fallback
    reg = 1e-13 * scale
    step = None
    while reg <= 1e3 * scale:
        try:
            cand = np.linalg.solve(H + reg * np.eye(H.shape[0]), -g)
        except np.linalg.LinAlgError:
            cand = None
        if cand is not None and np.all(np.isfinite(cand)) and float(cand @ g) < 0:
            step = cand
            break
        reg *= 100.0
    if step is None:
        return fallback
    norm = float(np.linalg.norm(step))
    if norm > radius:
        step = step * (radius / norm)
    return step


def _projected_newton(dual: _Dual, lam0: np.ndarray, tol: float, max_iter: int = 500):
    """Projected Newton (Bertsekas 1982) for min_{lam >= 0} D(lam)."""
    lam = np.maximum(np.asarray(lam0, dtype=np.float64), 0.0)
    ev = dual.evaluate(lam)
    sigma = 1e-4
    # Newton converges quadratically: aim well below ``tol`` (cheap) and report
    # convergence against ``tol`` itself.
    target = 1e-3 * tol
    it = 0
    for it in range(1, max_iter + 1):
        g = ev["grad"]
        pg = _projected_grad(lam, g)
        pg_norm = float(np.linalg.norm(pg))
        if pg_norm <= target:
            return lam, ev, pg_norm, True, it - 1
        eps = min(1e-3, pg_norm)
        active = (lam <= eps) & (g > 0)
        free = ~active
        d = np.zeros_like(lam)
        d[active] = -g[active]
        if free.any():
            d[free] = _newton_step(ev["hess"][np.ix_(free, free)], g[free],
                                   radius=max(1.0, 2.0 * float(np.linalg.norm(lam))))
        # Armijo line search along the projection arc.
        accepted = False
        best = None
        t = 1.0
        for _ in range(80):
            lam_t = np.maximum(lam + t * d, 0.0)
            ev_t = dual.evaluate(lam_t)
            decrease = ev["dual"] - ev_t["dual"]
            model = sigma * (t * float(-(g[free] @ d[free])) +
                             float(g[active] @ (lam[active] - lam_t[active])))
            if np.isfinite(ev_t["dual"]) and decrease >= model:
                accepted = True
                break
            pg_t = float(np.linalg.norm(_projected_grad(lam_t, ev_t["grad"])))
            if best is None or pg_t < best[0]:
                best = (pg_t, lam_t, ev_t)
            t *= 0.5
        if not accepted:
            # Round-off regime (dual decrease below machine precision): accept
            # the step that reduced the projected gradient the most, if any.
            if best is not None and best[0] < pg_norm:
                lam_t, ev_t = best[1], best[2]
            else:
                return lam, ev, pg_norm, pg_norm <= tol, it
        lam, ev = lam_t, ev_t
    pg_norm = float(np.linalg.norm(_projected_grad(lam, ev["grad"])))
    return lam, ev, pg_norm, pg_norm <= tol, max_iter


def _nan_solution(K, X, N, b, tau, margin) -> ExactSolution:
    nan = float("nan")
    return ExactSolution(
        feasible=False,
        multipliers=np.full(K - 1, nan),
        policy=np.full((X, N), nan),
        values=np.full(K, nan),
        kl=nan, dual_value=nan, primal_value=nan, max_violation=nan, grad_norm=nan,
        thresholds=b.copy(), tau=tau, feasibility_margin=margin, converged=False,
        num_iterations=0,
    )


def solve_constrained(
    w,
    ref,
    prompt_weights,
    tau: float,
    thresholds=None,
    tol: float = 1e-8,
    initial_multipliers=None,
    min_margin: float = FEASIBILITY_MARGIN_MIN,
    max_iter: int = 500,
) -> ExactSolution:
    """Exact solution of ``max V_0 - tau KL  s.t.  V_k >= b_k`` via its dual.

    Minimises the convex dual
    ``D(lam) = tau * sum_x p(x) log sum_y ref(y|x) exp((w_0 + lam . w_{1:})/tau) - lam . b``
    over ``lam >= 0`` with projected Newton (analytic Hessian
    ``sum_x p(x) Cov_{pi_lam(.|x)}(w_{1:}) / tau``) and returns
    ``pi_lam(y|x) ∝ ref(y|x) exp((w_0 + lam . w_{1:})(x, y) / tau)``.

    Strict feasibility is checked first with :func:`max_feasibility_margin`
    restricted to the support of ``ref``; if the margin is ``<= min_margin`` the
    dual has no finite minimiser and a solution with ``feasible=False`` and NaN
    numbers is returned.

    Args:
      w: ``[K, X, N]`` win rates (objective 0 primary).
      ref: ``[X, N]`` reference policy (rows sum to 1; zeros mark unusable
        candidates).
      prompt_weights: ``[X]`` prompt distribution, or None for uniform.
      tau: KL temperature, ``> 0``.
      thresholds: ``[K-1]`` thresholds in ``[0, 1]`` (None or empty for K = 1).
      tol: target on the projected-gradient norm.
      initial_multipliers: optional warm start for ``lam``.
      min_margin: LP margin below which thresholds count as infeasible.
      max_iter: maximum projected Newton iterations.

    Returns:
      An :class:`ExactSolution`.
    """
    w, ref, p, tau = _check_all(w, ref, prompt_weights, tau)
    K, X, N = w.shape
    b = _check_thresholds(thresholds, K)
    log_ref = _support_log(ref)
    support = ref > 0
    dual = _Dual(w, log_ref, p, tau, b)

    if K == 1:
        margin = float("inf")
        lam = np.zeros(0)
        ev = dual.evaluate(lam, hessian=False)
        pg_norm, converged, iters = 0.0, True, 0
    else:
        margin = max_feasibility_margin(w, p, b, support=support)
        if not margin > min_margin:
            return _nan_solution(K, X, N, b, tau, margin)
        lam0 = np.zeros(K - 1) if initial_multipliers is None else np.asarray(
            initial_multipliers, dtype=np.float64)
        if lam0.shape != (K - 1,) or not np.all(np.isfinite(lam0)):
            raise ValueError(f"initial_multipliers must be finite with shape ({K - 1},)")
        lam, ev, pg_norm, converged, iters = _projected_newton(dual, lam0, tol, max_iter)
        if not converged and initial_multipliers is not None:
            lam, ev, pg_norm, converged, iters = _projected_newton(
                dual, np.zeros(K - 1), tol, max_iter)
        if not converged:
            warnings.warn(
                f"solve_constrained: projected gradient norm {pg_norm:.3g} > tol {tol:.3g} "
                f"(thresholds {b}, LP margin {margin:.3g})",
                RuntimeWarning, stacklevel=2)

    values = ev["values"]
    kl = dual.kl(ev)
    violation = float(max(0.0, np.max(b - values[1:]))) if K > 1 else 0.0
    return ExactSolution(
        feasible=True,
        multipliers=lam.copy(),
        policy=ev["pi"],
        values=values,
        kl=kl,
        dual_value=ev["dual"],
        primal_value=float(values[0] - tau * kl),
        max_violation=violation,
        grad_norm=pg_norm,
        thresholds=b.copy(),
        tau=tau,
        feasibility_margin=margin,
        converged=converged,
        num_iterations=iters,
    )


def _as_grid(threshold_grid, K: int) -> np.ndarray:
    grid = np.asarray(threshold_grid, dtype=np.float64)
    if K == 2 and grid.ndim == 1:
        grid = grid[:, None]
    if grid.ndim != 2 or grid.shape[1] != K - 1:
        raise ValueError(
            f"threshold_grid must have shape [M, K-1] = [M, {K - 1}]"
            + (" (or [M] for K = 2)" if K == 2 else "") + f", got {np.shape(threshold_grid)}")
    return grid


def exact_front(w, ref, prompt_weights, tau, threshold_grid, tol: float = 1e-8
                ) -> list[ExactSolution]:
    """Solve :func:`solve_constrained` for every row of a threshold grid.

    Args:
      w, ref, prompt_weights, tau: as in :func:`solve_constrained`.
      threshold_grid: ``[M]`` (K = 2 only) or ``[M, K-1]`` thresholds; for K = 1
        an ``[M, 0]`` array (every row gives the unconstrained solution).
      tol: projected-gradient tolerance.

    Returns:
      A list of ``M`` :class:`ExactSolution` (infeasible rows have
      ``feasible=False``).  Multipliers are warm-started from the previous
      feasible row.
    """
    w = _check_w(w)
    grid = _as_grid(threshold_grid, w.shape[0])
    out: list[ExactSolution] = []
    warm = None
    for row in grid:
        sol = solve_constrained(w, ref, prompt_weights, tau, row, tol=tol,
                                initial_multipliers=warm)
        if sol.feasible and sol.converged:
            warm = sol.multipliers
        out.append(sol)
    return out


def default_threshold_grid(
    w,
    ref,
    prompt_weights,
    tau: float,
    num: int = 21,
    num_infeasible: int = 2,
    grid_fractions: Sequence[float] = (0.25, 0.5, 0.75),
) -> np.ndarray:
    """Threshold grid that traces the whole constrained front.

    Let ``u = V_{1:}(pi_0)`` be the secondary values of the unconstrained
    solution (``lam = 0``) and ``h_k = sum_x p(x) max_{y in supp ref} w_k(x, y)``
    the largest value each secondary objective can reach on its own; set
    ``d = h - u``.  A linear program finds the largest ``s*`` such that
    ``u + s* d`` is achievable by some policy (``s* = 1`` when K = 2), i.e. a
    maximal feasible point on the ray from ``u`` towards the utopia point ``h``.

    The grid is (rows in this order):

    1. ``num`` points ``u + f s* d`` with ``f`` in ``linspace(0, 0.95, num-2)``
       followed by ``f = 0.98, 0.995`` (denser where the front gets steep;
       ``f = 0, 0.9`` for ``num = 2`` and ``f = 0.5`` for ``num = 1``);
    2. for K > 2 only: a small 2-D grid ``u + s* (a d_1 e_1 + c d_2 e_2)``,
       ``a, c`` in ``grid_fractions``, varying the first two secondary
       objectives while the others stay at ``u`` (all of these are feasible:
       they are dominated by the ray point with ``f = max(a, c) < 1``);
    3. ``num_infeasible`` points beyond the maximal point,
       ``f = 1 + 0.05 i`` (``i = 1..num_infeasible``), which are infeasible.

    All thresholds are clipped to ``[0, 1]``.

    Args:
      w, ref, prompt_weights, tau: as in :func:`solve_constrained`.
      num: number of feasible points on the ray (``>= 1``).
      num_infeasible: number of points past the maximal feasible point.
      grid_fractions: fractions for the extra 2-D grid (K > 2).

    Returns:
      ``[M, K-1]`` threshold array (``[1, 0]`` for K = 1).
    """
    w, ref, p, tau = _check_all(w, ref, prompt_weights, tau)
    K, X, N = w.shape
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if num_infeasible < 0:
        raise ValueError(f"num_infeasible must be >= 0, got {num_infeasible}")
    if K == 1:
        return np.zeros((1, 0))
    support = ref > 0
    unconstrained = solve_constrained(w, ref, p, tau, np.zeros(K - 1))
    u = unconstrained.values[1:]
    h = np.einsum("x,kx->k", p, np.max(np.where(support[None], w[1:], -np.inf), axis=2))
    d = np.maximum(h - u, 0.0)
    if not np.any(d > 0):
        return np.clip(u[None, :], 0.0, 1.0)
    s_max = _lp_max_step(w[1:], p, support, u, d)
    if num >= 3:
        fractions = np.concatenate([np.linspace(0.0, 0.95, num - 2), [0.98, 0.995]])
    else:
        fractions = np.array([0.0, 0.9])[:num] if num == 2 else np.array([0.5])
    rows = [u + f * s_max * d for f in fractions]
    if K > 2:
        for a in grid_fractions:
            for c in grid_fractions:
                frac = np.zeros(K - 1)
                frac[0], frac[1] = a, c
                rows.append(u + s_max * frac * d)
    for i in range(1, num_infeasible + 1):
        rows.append(u + (1.0 + 0.05 * i) * s_max * d)
    return np.clip(np.array(rows), 0.0, 1.0)


# ---------------------------------------------------------------------------
# Hypervolume (maximisation)
# ---------------------------------------------------------------------------


def _prepare_points(points, reference_point, dim: Optional[int] = None):
    pts = np.asarray(points, dtype=np.float64)
    r = np.asarray(reference_point, dtype=np.float64).reshape(-1)
    if pts.size == 0:
        pts = pts.reshape(0, r.shape[0])
    if pts.ndim == 1:
        pts = pts[None, :]
    if pts.ndim != 2 or pts.shape[1] != r.shape[0]:
        raise ValueError(
            f"points must have shape [M, {r.shape[0]}] to match reference_point, got {np.shape(points)}")
    if dim is not None and r.shape[0] != dim:
        raise ValueError(f"expected {dim}-D points, got {r.shape[0]}-D")
    if not np.all(np.isfinite(r)):
        raise ValueError("reference_point must be finite")
    pts = pts[np.all(np.isfinite(pts), axis=1)]
    pts = pts[np.all(pts > r, axis=1)]
    return pts, r


def _hv2(pts: np.ndarray, r: np.ndarray) -> float:
    # Sweep in decreasing first coordinate; each point raising the running
    # maximum of the second coordinate adds the strip [r0, x] x [ymax, y].
    order = np.argsort(-pts[:, 0], kind="stable")
    area, y_max = 0.0, r[1]
    for x, y in pts[order]:
        if y > y_max:
            area += (x - r[0]) * (y - y_max)
            y_max = y
    return float(area)


def hypervolume_2d(points, reference_point) -> float:
    """Exact 2-D hypervolume (area dominated by ``points``, maximisation).

    ``HV = Lebesgue measure of  U_i [r_1, p_i1] x [r_2, p_i2]``.  Points that do
    not strictly dominate the reference point (and rows with NaN) contribute
    nothing.

    Args:
      points: ``[M, 2]`` objective vectors (larger is better).
      reference_point: ``[2]``.

    Returns:
      The dominated area (float, 0 for no points).
    """
    pts, r = _prepare_points(points, reference_point, dim=2)
    return _hv2(pts, r)


def hypervolume(points, reference_point) -> float:
    """Exact hypervolume for 1, 2 or 3 objectives (maximisation).

    1-D: ``max_i p_i - r``; 2-D: sweep (:func:`hypervolume_2d`); 3-D: slicing
    along the last coordinate, ``sum_i HV_2D({p_j : p_j3 >= z_i}) (z_i - z_{i+1})``
    with the ``z`` levels sorted decreasingly and ``z_{M+1} = r_3``.

    Args:
      points: ``[M, d]`` objective vectors, ``d <= 3``.
      reference_point: ``[d]``.

    Returns:
      The dominated volume (float).
    """
    r = np.asarray(reference_point, dtype=np.float64).reshape(-1)
    if r.shape[0] not in (1, 2, 3):
        raise ValueError(f"hypervolume supports 1 to 3 objectives, got {r.shape[0]}")
    pts, r = _prepare_points(points, r)
    if pts.shape[0] == 0:
        return 0.0
    if r.shape[0] == 1:
        return float(np.max(pts[:, 0]) - r[0])
    if r.shape[0] == 2:
        return _hv2(pts, r)
    order = np.argsort(-pts[:, 2], kind="stable")
    pts = pts[order]
    z_levels = np.append(pts[:, 2], r[2])
    vol = 0.0
    for i in range(pts.shape[0]):
        thickness = z_levels[i] - z_levels[i + 1]
        if thickness > 0:
            vol += _hv2(pts[: i + 1, :2], r[:2]) * thickness
    return float(vol)


def hypervolume_ratio(attained_points, exact_points, reference_point) -> float:
    """``HV(attained) / HV(exact)`` with a shared reference point.

    Args:
      attained_points: ``[M, d]`` points reached by a method.
      exact_points: ``[M', d]`` points on the exact front.
      reference_point: ``[d]``.

    Returns:
      The ratio (float); NaN if the exact front has zero hypervolume.
    """
    denom = hypervolume(exact_points, reference_point)
    num = hypervolume(attained_points, reference_point)
    if denom <= 0:
        return float("nan")
    return float(num / denom)
