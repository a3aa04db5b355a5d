"""Tests for the synthetic problem generators, validation and .npz I/O."""

import itertools

import numpy as np
import pytest

from mopo_jax.synthetic import problems
from mopo_jax.synthetic.exact import exact_front, solve_constrained, win_rates_numpy
from mopo_jax.synthetic.problems import (
    ALL_STRUCTURES,
    PreferenceProblem,
    load_problem,
    save_problem,
    validate_problem,
)

EXPECTED = {
    "bt_conflicting",
    "bt_aligned",
    "intransitive",
    "thurstone_ties",
    "three_objectives",
    "sparse_labels",
}


def _cycles(P):
    """All ordered triples (i, j, k) with P[i,j], P[j,k], P[k,i] > 0.5 (labeled)."""
    N = P.shape[0]
    found = []
    for i, j, k in itertools.permutations(range(N), 3):
        if P[i, j] > 0.5 and P[j, k] > 0.5 and P[k, i] > 0.5:
            found.append((i, j, k))
    return found


# ---------------------------------------------------------------------------
# Properties shared by every generator
# ---------------------------------------------------------------------------


def test_all_structures_registry():
    assert set(ALL_STRUCTURES) == EXPECTED
    for name in EXPECTED:
        assert ALL_STRUCTURES[name] is getattr(problems, f"make_{name}")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_generator_common_properties(name):
    problem = ALL_STRUCTURES[name](seed=0)
    assert problem.name == name
    assert problem.description
    validate_problem(problem)
    K, X, N, N2 = problem.pref.shape
    assert N == N2 and 4 <= X <= 8 and 6 <= N <= 8
    assert problem.pref.dtype == np.float64
    assert problem.tau == pytest.approx(0.08)
    # Diagonal 0.5, labeled entries in [0, 1], complement where both labeled.
    np.testing.assert_array_equal(np.diagonal(problem.pref, axis1=2, axis2=3), 0.5)
    P, PT = problem.pref, np.swapaxes(problem.pref, 2, 3)
    both = ~np.isnan(P) & ~np.isnan(PT)
    assert np.all((P[both] >= 0) & (P[both] <= 1))
    np.testing.assert_allclose((P + PT)[both], 1.0, atol=1e-12)
    # Reference policy: strictly positive, rows sum to 1, non-uniform.
    assert np.all(problem.ref > 0)
    np.testing.assert_allclose(problem.ref.sum(axis=1), 1.0, atol=1e-12)
    assert np.ptp(problem.ref, axis=1).min() > 1e-3
    assert problem.prompt_weights.shape == (X,)
    assert np.all(problem.prompt_weights >= 0)
    assert problem.prompt_weights.sum() == pytest.approx(1.0)
    for arr in (problem.ref, problem.prompt_weights):
        assert not np.isnan(arr).any()
    if problem.mu is not None:
        np.testing.assert_allclose(problem.mu.sum(axis=1), 1.0)
    if name != "sparse_labels":
        assert not np.isnan(problem.pref).any()
    w = problem.win_rates()
    assert w.shape == (K, X, N) and np.all(np.isfinite(w))
    np.testing.assert_allclose(w, win_rates_numpy(problem.pref, problem.comparison_policy))
    if K > 1:
        assert problem.threshold_grid.shape[1] == K - 1
        assert np.all((problem.threshold_grid >= 0) & (problem.threshold_grid <= 1))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_generators_are_seeded_and_sized(name):
    gen = ALL_STRUCTURES[name]
    a, b, c = gen(seed=3), gen(seed=3), gen(seed=4)
    np.testing.assert_array_equal(a.pref, b.pref)
    np.testing.assert_array_equal(a.ref, b.ref)
    assert not np.array_equal(np.nan_to_num(a.pref), np.nan_to_num(c.pref))
    small = gen(seed=1, num_prompts=3, num_candidates=5)
    assert small.pref.shape[1:] == (3, 5, 5) and small.ref.shape == (3, 5)
    validate_problem(small)


# ---------------------------------------------------------------------------
# Structure-specific properties
# ---------------------------------------------------------------------------


def _pooled_corr(problem):
    w = problem.win_rates()
    return np.corrcoef(w[0].ravel(), w[1].ravel())[0, 1]


def test_conflicting_vs_aligned():
    for seed in range(3):
        assert _pooled_corr(problems.make_bt_conflicting(seed=seed)) < -0.3
        assert _pooled_corr(problems.make_bt_aligned(seed=seed)) > 0.5


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_aligned_constraint_is_slack(seed):
    problem = problems.make_bt_aligned(seed=seed)
    w = problem.win_rates()
    p, ref = problem.prompt_weights, problem.ref
    unconstrained = solve_constrained(w, ref, p, problem.tau, [0.0])
    reference_value = float(p @ np.sum(ref * w[1], axis=1))
    # Alignment: optimising the primary alone improves the secondary objective.
    assert unconstrained.values[1] > reference_value
    for sol in exact_front(w, ref, p, problem.tau, problem.threshold_grid):
        assert sol.feasible and sol.converged
        assert sol.multipliers[0] == 0.0
        np.testing.assert_allclose(sol.policy, unconstrained.policy)


def test_conflicting_constraint_binds_on_its_grid():
    problem = problems.make_bt_conflicting(seed=0)
    sols = exact_front(problem.win_rates(), problem.ref, problem.prompt_weights, problem.tau,
                       problem.threshold_grid)
    lam = np.array([s.multipliers[0] for s in sols if s.feasible])
    assert lam[0] == 0.0 and np.all(lam[1:] > 0)
    assert not sols[-1].feasible


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_intransitive_has_cycles_in_primary_only(seed):
    problem = problems.make_intransitive(seed=seed)
    X = problem.num_prompts
    for x in range(X):
        cycles = _cycles(problem.pref[0, x])
        assert cycles, f"prompt {x}: no 3-cycle in the primary objective"
        i, j, k = cycles[0]
        P = problem.pref[0, x]
        assert P[i, j] > 0.5 and P[j, k] > 0.5 and P[k, i] > 0.5
        # The secondary objective is Bradley-Terry, hence transitive.
        assert not _cycles(problem.pref[1, x])
    # No Bradley-Terry reward fits: least-squares fit of logits leaves a residual.
    P = problem.pref[0, 0]
    N = P.shape[0]
    rows, target = [], []
    for i, j in itertools.combinations(range(N), 2):
        row = np.zeros(N)
        row[i], row[j] = 1.0, -1.0
        rows.append(row)
        target.append(np.log(P[i, j] / P[j, i]))
    A, y = np.array(rows), np.array(target)
    r, *_ = np.linalg.lstsq(A, y, rcond=None)
    assert np.max(np.abs(A @ r - y)) > 0.5


def test_thurstone_has_ties_and_uniform_comparison():
    problem = problems.make_thurstone_ties(seed=0)
    K, X, N, _ = problem.pref.shape
    off = ~np.eye(N, dtype=bool)
    for k in range(K):
        for x in range(X):
            assert np.any(problem.pref[k, x][off] == 0.5)
    # Duplicate candidates: a pair tied in both objectives whose rows coincide.
    for x in range(X):
        found = False
        for i, j in itertools.combinations(range(N), 2):
            rows_equal = all(
                np.allclose(np.delete(problem.pref[k, x, i], [i, j]),
                            np.delete(problem.pref[k, x, j], [i, j])) for k in range(K))
            if rows_equal and problem.pref[0, x, i, j] == 0.5:
                found = True
        assert found, f"prompt {x}: no duplicate candidates"
    # Probit link: non-tie entries are not all 0/1 and not all 0.5.
    vals = problem.pref[off[None, None].repeat(K, 0).repeat(X, 1)]
    assert 0.0 < np.mean((vals > 0.05) & (vals < 0.95) & (vals != 0.5))
    np.testing.assert_allclose(problem.mu, 1.0 / N)
    assert np.ptp(problem.prompt_weights) > 1e-3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_three_objectives_both_multipliers_positive(seed):
    problem = problems.make_three_objectives(seed=seed)
    assert problem.num_objectives == 3
    assert problem.threshold_grid.shape[1] == 2
    sols = exact_front(problem.win_rates(), problem.ref, problem.prompt_weights, problem.tau,
                       problem.threshold_grid)
    lam = np.array([s.multipliers for s in sols if s.feasible])
    assert np.any(np.all(lam > 1e-6, axis=1))
    assert not sols[-1].feasible


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_labels(seed):
    problem = problems.make_sparse_labels(seed=seed)
    P = problem.pref
    K, X, N, _ = P.shape
    nan = np.isnan(P)
    np.testing.assert_array_equal(nan, np.swapaxes(nan, 2, 3))
    np.testing.assert_array_equal(np.diagonal(P, axis1=2, axis2=3), 0.5)
    off = ~np.eye(N, dtype=bool)
    frac = np.mean(~nan[:, :, off])
    assert 0.3 < frac < 0.75
    # Every candidate has at least one labeled opponent in every objective.
    labeled_opponents = np.sum(~nan & off, axis=3)
    assert labeled_opponents.min() >= 1
    # Labels differ across objectives (independent masks).
    assert not np.array_equal(nan[0], nan[1])
    assert np.all(np.isfinite(problem.win_rates(include_self=False)))


# ---------------------------------------------------------------------------
# I/O and validation
# ---------------------------------------------------------------------------


def _valid_arrays(K=2, X=3, N=4, seed=0):
    rng = np.random.default_rng(seed)
    r = rng.standard_normal((K, X, N))
    pref = 1.0 / (1.0 + np.exp(-(r[..., :, None] - r[..., None, :])))
    iu = np.triu_indices(N, 1)
    pref[..., iu[1], iu[0]] = 1.0 - pref[..., iu[0], iu[1]]
    pref[..., np.arange(N), np.arange(N)] = 0.5
    ref = rng.dirichlet(np.ones(N), size=X)
    return dict(pref=pref, ref=ref)


def test_save_load_roundtrip(tmp_path):
    for name in ("sparse_labels", "thurstone_ties", "three_objectives"):
        original = ALL_STRUCTURES[name](seed=2)
        path = tmp_path / f"{name}.npz"
        save_problem(original, path)
        loaded = load_problem(path)
        assert loaded.name == original.name
        assert loaded.description == original.description
        assert loaded.tau == original.tau
        np.testing.assert_array_equal(loaded.pref, original.pref)  # NaN == NaN here
        np.testing.assert_array_equal(loaded.ref, original.ref)
        np.testing.assert_array_equal(loaded.prompt_weights, original.prompt_weights)
        np.testing.assert_array_equal(loaded.threshold_grid, original.threshold_grid)
        if original.mu is None:
            assert loaded.mu is None
        else:
            np.testing.assert_array_equal(loaded.mu, original.mu)


def test_load_minimal_file_defaults(tmp_path):
    arrays = _valid_arrays()
    path = tmp_path / "my_problem.npz"
    np.savez(path, **arrays)
    problem = load_problem(path)
    assert problem.name == "my_problem"
    assert problem.mu is None
    assert problem.tau == pytest.approx(0.08)
    np.testing.assert_allclose(problem.prompt_weights, 1.0 / 3)
    np.testing.assert_array_equal(problem.comparison_policy, arrays["ref"])
    # One-sided labels are allowed (only pairs labeled both ways must sum to 1).
    arrays["pref"][0, 0, 0, 1] = np.nan
    np.savez(path, **arrays)
    load_problem(path)


def _corrupt(**changes):
    def apply(arrays):
        for key, fn in changes.items():
            if fn is None:
                arrays.pop(key)
            else:
                arrays[key] = fn(arrays)
        return arrays
    return apply


def _set(key, index, value):
    def fn(arrays):
        arr = arrays[key].copy()
        arr[index] = value
        return arr
    return fn


BAD_CASES = {
    "missing_pref": (_corrupt(pref=None), "pref", "missing"),
    "missing_ref": (_corrupt(ref=None), "ref", "missing"),
    "pref_ndim": (_corrupt(pref=lambda a: a["pref"][0]), "pref", "4 dimensions"),
    "pref_not_square": (_corrupt(pref=lambda a: a["pref"][..., :3]), "pref", "last two"),
    "pref_k0": (_corrupt(pref=lambda a: a["pref"][:0]), "pref", "K >= 1"),
    "pref_above_1": (_corrupt(pref=_set("pref", (1, 2, 0, 3), 1.5)), "pref", r"\(1, 2, 0, 3\)"),
    "pref_negative": (_corrupt(pref=_set("pref", (0, 1, 2, 1), -0.2)), "pref", r"outside \[0, 1\]"),
    "pref_complement": (_corrupt(pref=_set("pref", (1, 0, 1, 2), 0.9)), "pref", r"\(1, 0, 1, 2\)"),
    "pref_diagonal": (_corrupt(pref=_set("pref", (0, 0, 1, 1), 0.7)), "pref", "diagonal"),
    "pref_string": (_corrupt(pref=lambda a: np.array([["a"]])), "pref", "not numeric"),
    "ref_shape": (_corrupt(ref=lambda a: a["ref"][:, :3]), "ref", "shape"),
    "ref_rows": (_corrupt(ref=lambda a: a["ref"] * 1.1), "ref", "row 0 sums"),
    "ref_negative": (_corrupt(ref=_set("ref", (1, 0), -0.1)), "ref", "negative"),
    "ref_nan": (_corrupt(ref=_set("ref", (2, 3), np.nan)), "ref", "NaN"),
    "mu_nan": (_corrupt(mu=lambda a: np.where(np.eye(3, 4) > 0, np.nan, 0.25)), "mu", "NaN"),
    "mu_shape": (_corrupt(mu=lambda a: np.full((3, 5), 0.2)), "mu", "shape"),
    "weights_nan": (_corrupt(prompt_weights=lambda a: np.array([0.5, np.nan, 0.5])),
                    "prompt_weights", "NaN"),
    "weights_sum": (_corrupt(prompt_weights=lambda a: np.array([0.5, 0.5, 0.5])),
                    "prompt_weights", "sums to"),
    "weights_negative": (_corrupt(prompt_weights=lambda a: np.array([1.5, -0.5, 0.0])),
                         "prompt_weights", "negative"),
    "weights_shape": (_corrupt(prompt_weights=lambda a: np.full(4, 0.25)), "prompt_weights", "shape"),
    "tau_nonpositive": (_corrupt(tau=lambda a: np.float64(0.0)), "tau", "positive"),
    "grid_range": (_corrupt(threshold_grid=lambda a: np.array([[0.5], [1.5]])), "threshold_grid",
                   r"\[0, 1\]"),
    "grid_shape": (_corrupt(threshold_grid=lambda a: np.zeros((3, 2))), "threshold_grid", "shape"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_load_problem_validation_errors(tmp_path, case):
    corrupt, field, fragment = BAD_CASES[case]
    arrays = corrupt(_valid_arrays())
    path = tmp_path / f"bad_{case}.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError) as info:
        load_problem(path)
    message = str(info.value)
    assert str(path) in message
    assert f"'{field}'" in message
    assert __import__("re").search(fragment, message), message


def test_load_problem_not_an_npz(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"this is not a zip archive")
    with pytest.raises(ValueError, match="garbage.npz"):
        load_problem(path)


def test_validate_problem_defaults_source_to_name():
    arrays = _valid_arrays()
    arrays["ref"][0] *= 2
    problem = PreferenceProblem(name="toy", description="", pref=arrays["pref"], ref=arrays["ref"])
    with pytest.raises(ValueError, match=r"^toy: field 'ref'"):
        validate_problem(problem)
    with pytest.raises(ValueError, match=r"^somewhere.npz: field 'ref'"):
        validate_problem(problem, source="somewhere.npz")


def test_generator_argument_errors():
    with pytest.raises(ValueError, match="num_candidates"):
        problems.make_intransitive(num_candidates=2)
    with pytest.raises(ValueError, match="num_prompts"):
        problems.make_bt_conflicting(num_prompts=0)
    with pytest.raises(ValueError, match="label_fraction"):
        problems.make_sparse_labels(label_fraction=0.0)
