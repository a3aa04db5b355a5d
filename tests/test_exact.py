"""Tests for the NumPy/SciPy exact reference solver (mopo_jax.synthetic.exact).

Every check compares against something computed independently: explicit loops,
brute-force grids over the simplex, scipy's SLSQP on the primal problem,
inclusion-exclusion for hypervolumes, or a Monte-Carlo estimate.
"""

import itertools
import warnings

import numpy as np
import pytest
from scipy.optimize import minimize

from mopo_jax.synthetic import exact
from mopo_jax.synthetic.exact import (
    ExactSolution,
    default_threshold_grid,
    exact_front,
    hypervolume,
    hypervolume_2d,
    hypervolume_ratio,
    max_feasibility_margin,
    solve_constrained,
    win_rates_numpy,
)

TAU = 0.08


def _bt_pref(rng, K, X, N, sharpness=3.0, correlation=None):
    r = rng.standard_normal((K, X, N))
    if correlation is not None and K >= 2:
        r[1] = correlation * r[0] + np.sqrt(1 - correlation**2) * r[1]
    d = sharpness * (r[..., :, None] - r[..., None, :])
    return 1.0 / (1.0 + np.exp(-d))


def _random_problem(seed, K=2, X=4, N=6, correlation=-0.7):
    rng = np.random.default_rng(seed)
    pref = _bt_pref(rng, K, X, N, correlation=correlation)
    ref = 0.9 * rng.dirichlet(np.ones(N), size=X) + 0.1 / N
    w = win_rates_numpy(pref, ref)
    p = rng.dirichlet(np.full(X, 3.0))
    return w, ref, p


def _closed_form(w, ref, lam, tau):
    s = w[0] + np.tensordot(lam, w[1:], axes=1)
    unnorm = ref * np.exp((s - s.max(axis=1, keepdims=True)) / tau)
    return unnorm / unnorm.sum(axis=1, keepdims=True)


def _primal(pi, w, ref, p, tau):
    """V_0 - tau KL and V_k computed directly from a policy (independent code path)."""
    values = np.array([np.sum(p[:, None] * pi * wk) for wk in w])
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(pi > 0, pi * np.log(pi / ref), 0.0)
    kl = float(np.sum(p[:, None] * terms))
    return values[0] - tau * kl, values, kl


# ---------------------------------------------------------------------------
# Win rates
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("include_self", [True, False])
def test_win_rates_match_explicit_loops(include_self):
    rng = np.random.default_rng(0)
    K, X, N = 2, 3, 5
    pref = _bt_pref(rng, K, X, N)
    # Remove ~40% of pairs symmetrically, and one pair one-sidedly.
    for k in range(K):
        for x in range(X):
            for i in range(N):
                for j in range(i + 1, N):
                    if rng.random() < 0.4:
                        pref[k, x, i, j] = pref[k, x, j, i] = np.nan
    pref[0, 0, 1, 2] = np.nan
    # Candidate 4 of prompt 2 (objective 1) has no labeled opponent at all.
    pref[1, 2, 4, :] = np.nan
    pref[1, 2, :, 4] = np.nan
    pref[1, 2, 4, 4] = 0.5
    mu = rng.dirichlet(np.ones(N), size=X)

    got = win_rates_numpy(pref, mu, include_self=include_self)
    expected = np.empty((K, X, N))
    for k in range(K):
        for x in range(X):
            for i in range(N):
                num = den = 0.0
                for j in range(N):
                    if np.isnan(pref[k, x, i, j]) or (not include_self and i == j):
                        continue
                    num += mu[x, j] * pref[k, x, i, j]
                    den += mu[x, j]
                expected[k, x, i] = num / den if den > 0 else 0.5
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-14)
    if not include_self:
        assert got[1, 2, 4] == 0.5


def test_win_rates_shape_errors():
    pref = np.full((1, 2, 3, 3), 0.5)
    with pytest.raises(ValueError, match="mu"):
        win_rates_numpy(pref, np.ones((2, 4)) / 4)
    with pytest.raises(ValueError, match="pref"):
        win_rates_numpy(np.full((2, 3, 3), 0.5), np.ones((2, 3)) / 3)


# ---------------------------------------------------------------------------
# Solver: K = 1, KKT, brute force
# ---------------------------------------------------------------------------


def test_k1_matches_closed_form():
    w, ref, p = _random_problem(1, K=1)
    sol = solve_constrained(w, ref, p, TAU)
    assert sol.feasible and sol.converged
    assert sol.multipliers.shape == (0,)
    pi = ref * np.exp(w[0] / TAU)
    pi /= pi.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(sol.policy, pi, rtol=1e-10, atol=1e-14)
    primal, values, kl = _primal(pi, w, ref, p, TAU)
    np.testing.assert_allclose(sol.values, values, atol=1e-12)
    assert sol.kl == pytest.approx(kl, abs=1e-10)
    assert sol.primal_value == pytest.approx(primal, abs=1e-10)
    # Strong duality without constraints: tau * sum_x p log Z = max_pi V0 - tau KL.
    assert sol.dual_value == pytest.approx(primal, abs=1e-10)
    assert sol.max_violation == 0.0
    # K = 1 also accepts an empty thresholds vector.
    sol2 = solve_constrained(w, ref, p, TAU, np.zeros(0))
    np.testing.assert_allclose(sol2.policy, sol.policy)


@pytest.mark.parametrize("K", [2, 3])
def test_kkt_conditions_along_default_grid(K):
    w, ref, p = _random_problem(2, K=K, X=5, N=7)
    grid = default_threshold_grid(w, ref, p, TAU, num=9)
    sols = exact_front(w, ref, p, TAU, grid)
    assert sum(s.feasible for s in sols) >= 9
    for b, sol in zip(grid, sols):
        if not sol.feasible:
            continue
        lam, V = sol.multipliers, sol.values
        assert sol.converged and sol.grad_norm <= 1e-8
        assert np.all(lam >= 0)
        assert np.all(V[1:] >= b - 1e-8), "primal feasibility"
        np.testing.assert_allclose(lam * (V[1:] - b), 0.0, atol=1e-8 * max(1, lam.max()))
        # Stationarity of the dual in projected form, recomputed independently.
        pi = _closed_form(w, ref, lam, TAU)
        np.testing.assert_allclose(sol.policy, pi, rtol=1e-9, atol=1e-12)
        primal, values, kl = _primal(pi, w, ref, p, TAU)
        grad = values[1:] - b
        proj = lam - np.maximum(lam - grad, 0.0)
        assert np.linalg.norm(proj) <= 1e-8
        np.testing.assert_allclose(sol.values, values, atol=1e-12)
        assert sol.kl == pytest.approx(kl, abs=1e-9)
        assert sol.primal_value == pytest.approx(primal, abs=1e-9)
        # Strong duality: D(lam*) = primal optimum.
        assert sol.dual_value == pytest.approx(sol.primal_value, abs=1e-7)
        np.testing.assert_allclose(sol.policy.sum(axis=1), 1.0, atol=1e-12)


def _slsqp_primal(w, ref, p, tau, b):
    """Maximise V_0 - tau KL s.t. V_k >= b_k directly over the simplex (SLSQP)."""
    K, X, N = w.shape

    def neg_obj(z):
        pi = np.maximum(z.reshape(X, N), 1e-300)
        return -(np.sum(p[:, None] * pi * w[0]) - tau * np.sum(p[:, None] * pi * np.log(pi / ref)))

    def neg_obj_grad(z):
        pi = np.maximum(z.reshape(X, N), 1e-300)
        return -(p[:, None] * (w[0] - tau * (np.log(pi / ref) + 1.0))).ravel()

    cons = [{"type": "eq", "fun": (lambda z, x=x: z.reshape(X, N)[x].sum() - 1.0)} for x in range(X)]
    for k in range(1, K):
        cons.append({"type": "ineq",
                     "fun": (lambda z, k=k: np.sum(p[:, None] * z.reshape(X, N) * w[k]) - b[k - 1]),
                     "jac": (lambda z, k=k: (p[:, None] * w[k]).ravel())})
    best = None
    for z0 in (ref.ravel(), np.full(X * N, 1.0 / N)):
        res = minimize(neg_obj, z0, jac=neg_obj_grad, method="SLSQP", constraints=cons,
                       bounds=[(1e-12, 1.0)] * (X * N), options={"ftol": 1e-14, "maxiter": 1000})
        if best is None or res.fun < best.fun:
            best = res
    return best.x.reshape(X, N), -best.fun


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_slsqp_on_primal_tiny(seed):
    rng = np.random.default_rng(100 + seed)
    X, N = 1, 3
    w = rng.uniform(0.1, 0.9, size=(2, X, N))
    w[1] = 1.0 - w[0] + 0.05 * rng.standard_normal((X, N))  # conflicting
    w = np.clip(w, 0, 1)
    ref = rng.dirichlet(np.full(N, 2.0), size=X)
    p = np.ones(X)
    tau = 0.1
    unconstrained = solve_constrained(w, ref, p, tau, [0.0]).values[1]
    top = w[1].max()
    for b in (unconstrained - 0.05, unconstrained + 0.3 * (top - unconstrained),
              unconstrained + 0.8 * (top - unconstrained)):
        b = float(np.clip(b, 0, 1))
        sol = solve_constrained(w, ref, p, tau, [b])
        pi_ref, obj_ref = _slsqp_primal(w, ref, p, tau, [b])
        assert sol.feasible
        np.testing.assert_allclose(sol.policy, pi_ref, atol=2e-5)
        assert sol.primal_value >= obj_ref - 1e-9
        assert sol.primal_value == pytest.approx(obj_ref, abs=1e-7)


def test_matches_slsqp_three_objectives_two_prompts():
    rng = np.random.default_rng(7)
    K, X, N = 3, 2, 4
    w = rng.uniform(0, 1, size=(K, X, N))
    ref = rng.dirichlet(np.full(N, 2.0), size=X)
    p = np.array([0.3, 0.7])
    tau = 0.2
    u = solve_constrained(w, ref, p, tau, [0.0, 0.0]).values[1:]
    h = np.einsum("x,kx->k", p, w[1:].max(axis=2))
    b = u + 0.5 * (h - u)
    sol = solve_constrained(w, ref, p, tau, b)
    assert sol.feasible and sol.converged
    pi_ref, obj_ref = _slsqp_primal(w, ref, p, tau, b)
    np.testing.assert_allclose(sol.policy, pi_ref, atol=5e-5)
    assert sol.primal_value >= obj_ref - 1e-9
    assert sol.primal_value == pytest.approx(obj_ref, abs=1e-6)


def test_matches_simplex_grid_search():
    """Exhaustive grid over the 2-simplex (X = 1, N = 3): no optimiser involved."""
    w = np.array([[[0.8, 0.5, 0.2]], [[0.1, 0.45, 0.9]]])
    ref = np.array([[0.5, 0.3, 0.2]])
    p = np.ones(1)
    tau, b = 0.1, 0.6
    sol = solve_constrained(w, ref, p, tau, [b])
    assert sol.multipliers[0] > 0

    n = 600
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = i + j <= n
    pi = np.stack([i[keep], j[keep], n - i[keep] - j[keep]], axis=1) / n
    pi = np.clip(pi, 1e-15, 1)
    v0 = pi @ w[0, 0]
    v1 = pi @ w[1, 0]
    obj = v0 - tau * np.sum(pi * np.log(pi / ref[0]), axis=1)
    feasible = v1 >= b
    best = np.argmax(np.where(feasible, obj, -np.inf))
    # Every feasible grid point is dominated by the exact optimum ...
    assert sol.primal_value >= obj[best] - 1e-12
    # ... and the best grid point is close to it.
    assert sol.primal_value - obj[best] < 1e-3
    np.testing.assert_allclose(sol.policy[0], pi[best], atol=1e-2)


def test_infeasible_and_boundary_thresholds():
    w, ref, p = _random_problem(3)
    top = float(np.sum(p * w[1].max(axis=1)))
    for b in (top, min(1.0, top + 0.01), 1.0):
        sol = solve_constrained(w, ref, p, TAU, [b])
        assert sol.feasible is False
        assert np.isnan(sol.multipliers).all() and np.isnan(sol.policy).all()
        assert np.isnan(sol.values).all()
        for field in ("kl", "dual_value", "primal_value", "max_violation", "grad_norm"):
            assert np.isnan(getattr(sol, field))
    # Just inside the boundary the dual optimum is large but finite.
    for margin in (1e-3, 1e-5):
        sol = solve_constrained(w, ref, p, TAU, [top - margin])
        assert sol.feasible and sol.converged
        assert sol.values[1] >= top - margin - 1e-8
        assert sol.multipliers[0] > 1.0


def test_warm_start_gives_same_solution():
    w, ref, p = _random_problem(4, K=3)
    grid = default_threshold_grid(w, ref, p, TAU, num=6)
    b = grid[4]
    cold = solve_constrained(w, ref, p, TAU, b)
    warm = solve_constrained(w, ref, p, TAU, b, initial_multipliers=np.array([50.0, 0.0]))
    np.testing.assert_allclose(cold.multipliers, warm.multipliers, rtol=1e-6, atol=1e-8)


def test_reference_support_is_respected():
    w = np.array([[[0.9, 0.5, 0.1]], [[0.1, 0.5, 0.95]]])
    ref = np.array([[0.6, 0.4, 0.0]])  # candidate 2 cannot be used
    p = np.ones(1)
    assert max_feasibility_margin(w, p, [0.6]) == pytest.approx(0.35)
    assert max_feasibility_margin(w, p, [0.6], support=ref > 0) == pytest.approx(-0.1)
    assert solve_constrained(w, ref, p, TAU, [0.6]).feasible is False
    sol = solve_constrained(w, ref, p, TAU, [0.4])
    assert sol.feasible and sol.policy[0, 2] == 0.0
    assert sol.values[1] >= 0.4 - 1e-9
    assert np.isfinite(sol.kl) and sol.kl >= 0


# ---------------------------------------------------------------------------
# Feasibility LP
# ---------------------------------------------------------------------------


def test_margin_single_constraint_closed_form():
    w, ref, p = _random_problem(5)
    top = float(np.sum(p * w[1].max(axis=1)))
    for b in (0.0, 0.3, top, 1.0):
        assert max_feasibility_margin(w, p, [b]) == pytest.approx(top - b, abs=1e-9)
    assert max_feasibility_margin(w[:1], p, None) == float("inf")


def test_margin_two_constraints_matches_grid():
    rng = np.random.default_rng(11)
    w = rng.uniform(0, 1, size=(3, 1, 3))
    n = 400
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = i + j <= n
    pi = np.stack([i[keep], j[keep], n - i[keep] - j[keep]], axis=1) / n
    for b in ([0.5, 0.5], [0.2, 0.8], [0.9, 0.9]):
        grid_best = np.max(np.min(pi @ w[1:, 0].T - np.array(b), axis=1))
        lp = max_feasibility_margin(w, None, b)
        assert lp >= grid_best - 1e-12
        assert lp - grid_best < 5e-3


# ---------------------------------------------------------------------------
# Threshold grids and fronts
# ---------------------------------------------------------------------------


def test_default_grid_and_front_k2():
    w, ref, p = _random_problem(6, X=5, N=7)
    grid = default_threshold_grid(w, ref, p, TAU, num=11)
    assert grid.shape == (13, 1)
    assert np.all(np.diff(grid[:, 0]) > 0)
    assert np.all((grid >= 0) & (grid <= 1))
    sols = exact_front(w, ref, p, TAU, grid[:, 0])  # 1-D grid accepted for K = 2
    feasible = np.array([s.feasible for s in sols])
    assert feasible[:11].all() and not feasible[11:].any()
    unconstrained = solve_constrained(w, ref, p, TAU, [0.0])
    np.testing.assert_allclose(sols[0].values, unconstrained.values, atol=1e-12)
    assert sols[0].multipliers[0] == 0.0
    lam = np.array([s.multipliers[0] for s in sols[:11]])
    v1 = np.array([s.values[1] for s in sols[:11]])
    primal = np.array([s.primal_value for s in sols[:11]])
    assert np.all(np.diff(lam) > 0)
    assert np.all(np.diff(v1) > 0)
    assert np.all(np.diff(primal) < 0)
    # Infeasible points lie beyond the maximal achievable secondary value.
    top = float(np.sum(p * w[1].max(axis=1)))
    assert np.all(grid[11:, 0] > top) or np.all(grid[11:, 0] >= 1.0)
    assert grid[10, 0] < top


def test_default_grid_k3_has_jointly_active_constraints():
    w, ref, p = _random_problem(8, K=3, X=4, N=6, correlation=None)
    # Make the two secondary objectives conflict with the primary.
    w[1] = 1 - w[0] * 0.8
    w[2] = np.clip(0.5 * (1 - w[0]) + 0.5 * w[2], 0, 1)
    grid = default_threshold_grid(w, ref, p, TAU, num=7, num_infeasible=2)
    assert grid.shape == (7 + 9 + 2, 2)
    sols = exact_front(w, ref, p, TAU, grid)
    feasible = np.array([s.feasible for s in sols])
    assert feasible[:-2].all() and not feasible[-2:].any()
    lam = np.array([s.multipliers for s in sols if s.feasible])
    assert np.all(lam >= 0)
    assert np.any(np.all(lam > 1e-6, axis=1))


def test_k1_grid_and_front():
    w, ref, p = _random_problem(9, K=1)
    grid = default_threshold_grid(w, ref, p, TAU)
    assert grid.shape == (1, 0)
    sols = exact_front(w, ref, p, TAU, grid)
    assert len(sols) == 1 and sols[0].feasible
    assert isinstance(sols[0], ExactSolution)


# ---------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------


def test_bad_inputs_raise():
    w, ref, p = _random_problem(10)
    with pytest.raises(ValueError, match="tau"):
        solve_constrained(w, ref, p, 0.0, [0.5])
    with pytest.raises(ValueError, match="tau"):
        solve_constrained(w, ref, p, -1.0, [0.5])
    with pytest.raises(ValueError, match="tau"):
        solve_constrained(w, ref, p, float("nan"), [0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        solve_constrained(w, ref, p, TAU, [1.2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        solve_constrained(w, ref, p, TAU, [-0.1])
    with pytest.raises(ValueError, match="thresholds"):
        solve_constrained(w, ref, p, TAU, [0.5, 0.5])
    with pytest.raises(ValueError, match="thresholds"):
        solve_constrained(w, ref, p, TAU, None)
    with pytest.raises(ValueError, match="ref"):
        solve_constrained(w, ref[:, :-1], p, TAU, [0.5])
    with pytest.raises(ValueError, match="ref"):
        solve_constrained(w, ref * 2, p, TAU, [0.5])
    with pytest.raises(ValueError, match="prompt_weights"):
        solve_constrained(w, ref, p[:-1], TAU, [0.5])
    with pytest.raises(ValueError, match="prompt_weights"):
        solve_constrained(w, ref, p * 3, TAU, [0.5])
    with pytest.raises(ValueError, match="w"):
        solve_constrained(w[0], ref, p, TAU, [0.5])
    with pytest.raises(ValueError, match="w"):
        solve_constrained(w + 1.0, ref, p, TAU, [0.5])
    with pytest.raises(ValueError, match="threshold_grid"):
        exact_front(w, ref, p, TAU, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="tau"):
        default_threshold_grid(w, ref, p, 0.0)


# ---------------------------------------------------------------------------
# Hypervolume
# ---------------------------------------------------------------------------


def _hv_inclusion_exclusion(points, r):
    points = [q for q in np.asarray(points) if np.all(q > r)]
    total = 0.0
    for size in range(1, len(points) + 1):
        for subset in itertools.combinations(points, size):
            corner = np.min(np.array(subset), axis=0)
            total += (-1) ** (size + 1) * np.prod(np.maximum(corner - r, 0.0))
    return total


def test_hypervolume_2d_manual_rectangles():
    pts = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    assert hypervolume_2d(pts, [0.0, 0.0]) == pytest.approx(6.0)
    # Dominated points, duplicates, points outside the reference box, NaN rows.
    extra = np.array([[1.5, 1.5], [2.0, 2.0], [5.0, -1.0], [-1.0, 5.0], [np.nan, 9.0]])
    assert hypervolume_2d(np.vstack([pts, extra]), [0.0, 0.0]) == pytest.approx(6.0)
    # Shifted reference point: union of [0.5,1]x[0.5,3], [0.5,2]x[0.5,2], [0.5,3]x[0.5,1].
    assert hypervolume_2d(pts, [0.5, 0.5]) == pytest.approx(0.5 * 2.5 + 1 * 1.5 + 1 * 0.5)
    assert hypervolume_2d(np.zeros((0, 2)), [0.0, 0.0]) == 0.0
    assert hypervolume_2d(pts, [3.0, 3.0]) == 0.0


@pytest.mark.parametrize("dim,seed", [(2, 0), (2, 1), (3, 0), (3, 1), (3, 2)])
def test_hypervolume_matches_inclusion_exclusion(dim, seed):
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, 1, size=(7, dim))
    r = np.full(dim, 0.1)
    assert hypervolume(pts, r) == pytest.approx(_hv_inclusion_exclusion(pts, r), abs=1e-12)


def test_hypervolume_3d_monte_carlo_and_degenerate_cases():
    rng = np.random.default_rng(3)
    pts = rng.uniform(0.2, 1, size=(10, 3))
    r = np.zeros(3)
    samples = rng.uniform(0, 1, size=(200_000, 3))
    dominated = np.any(np.all(samples[:, None, :] <= pts[None, :, :], axis=2), axis=1)
    mc = dominated.mean()
    se = np.sqrt(mc * (1 - mc) / samples.shape[0])
    assert abs(hypervolume(pts, r) - mc) < 5 * se
    # A 3-D set with one z level equals (2-D hypervolume) x (height).
    flat = np.array([[1.0, 3.0, 2.0], [2.0, 2.0, 2.0], [3.0, 1.0, 2.0]])
    assert hypervolume(flat, [0, 0, 0]) == pytest.approx(6.0 * 2.0)
    assert hypervolume([[2.0], [5.0]], [1.0]) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        hypervolume(np.ones((2, 4)), np.zeros(4))
    with pytest.raises(ValueError):
        hypervolume_2d(np.ones((2, 3)), np.zeros(2))


def test_hypervolume_ratio():
    exact_pts = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    r = [0.0, 0.0]
    assert hypervolume_ratio(exact_pts, exact_pts, r) == pytest.approx(1.0)
    assert hypervolume_ratio(exact_pts[:1], exact_pts, r) == pytest.approx(3.0 / 6.0)
    assert hypervolume_ratio(np.zeros((0, 2)), exact_pts, r) == 0.0
    assert np.isnan(hypervolume_ratio(exact_pts, np.zeros((0, 2)), r))


def test_no_jax_imported_by_reference_modules():
    import ast
    import inspect

    from mopo_jax.synthetic import problems

    for module in (exact, problems):
        tree = ast.parse(inspect.getsource(module))
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        assert "jax" not in names and "jaxlib" not in names, module.__name__


def test_solver_emits_no_warnings_on_random_problems():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(5):
            w, ref, p = _random_problem(20 + seed, K=2 + seed % 2)
            grid = default_threshold_grid(w, ref, p, 10 ** (seed - 3.0) * 5)
            for sol in exact_front(w, ref, p, 10 ** (seed - 3.0) * 5, grid):
                assert (not sol.feasible) or sol.grad_norm <= 1e-8
