"""Acceptance of the synthetic synthetic_run: MOPO against the independent exact solver on every structure."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mopo_jax import cli
from mopo_jax.synthetic import exact, problems
from mopo_jax.synthetic.benchmark import SyntheticConfig, _mopo_sweep, run_benchmark
from mopo_jax.synthetic.tabular import make_problem

TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    payload = run_benchmark(SyntheticConfig(), str(out), log=lambda _: None)
    return out, payload


@pytest.mark.parametrize("structure", sorted(problems.ALL_STRUCTURES))
def test_mopo_converges_to_exact_front(synthetic_run, structure):
    _, payload = synthetic_run
    result = payload["structures"][structure]
    # Re-solve with the exact solver here so the check does not trust the numbers the synthetic_run stored.
    problem = problems.ALL_STRUCTURES[structure](num_prompts=8, num_candidates=6)
    w = exact.win_rates_numpy(problem.pref, problem.comparison_policy)
    for method in ("mopo_weighted_bc", "mopo_pairwise"):
        entries = result["methods"][method]["points"]
        assert len(entries) == len(problem.threshold_grid)
        for entry, threshold in zip(entries, problem.threshold_grid):
            solution = exact.solve_constrained(w, problem.ref, problem.prompt_weights, problem.tau, threshold)
            if not solution.feasible:
                assert entry["status"] == "infeasible", (method, threshold)
                assert "primary_value" not in entry and "secondary_values" not in entry
                continue
            assert entry["status"] == "feasible", (method, threshold, entry)
            assert abs(entry["primary_value"] - solution.values[0]) <= TOLERANCE, (method, threshold)
            assert entry["constraint_violation"] <= TOLERANCE
            assert np.all(np.asarray(entry["secondary_values"]) >= threshold - TOLERANCE)
            assert entry["steps_to_tolerance"] is not None
        assert result["methods"][method]["hypervolume_ratio"] >= 0.999


def test_multipliers_match_the_exact_solver_on_slack_and_binding_thresholds():
    """bt_aligned: below the unconstrained optimum's secondary value the constraint is slack (lambda* = 0); above it
    it binds, and MOPO's multiplier and values must be the exact solver's (the built-in sweep only has slack ones)."""
    problem = problems.ALL_STRUCTURES["bt_aligned"](num_prompts=8, num_candidates=6)
    w = exact.win_rates_numpy(problem.pref, problem.comparison_policy)
    free = exact.solve_constrained(w[:1], problem.ref, problem.prompt_weights, problem.tau)
    secondary_free = float(np.einsum("xn,xn,x->", free.policy, w[1], problem.prompt_weights))
    best = float(problem.prompt_weights @ w[1].max(-1))  # every prompt's best candidate
    thresholds = np.array([[secondary_free - 0.05], [secondary_free + 0.3 * (best - secondary_free)],
                           [secondary_free + 0.6 * (best - secondary_free)]])
    tabular = make_problem(problem.pref, problem.ref, problem.mu, problem.prompt_weights)
    config = SyntheticConfig()
    batch = jax.tree.map(lambda leaf: leaf[None], tabular)
    result = _mopo_sweep(batch, jnp.asarray(thresholds, jnp.float32)[None], config.mopo_config(problem.tau),
                         config.settings, "weighted_bc")
    result = jax.tree.map(lambda leaf: leaf[0], result)
    multipliers = []
    for i, b in enumerate(thresholds):
        solution = exact.solve_constrained(w, problem.ref, problem.prompt_weights, problem.tau, b)
        assert solution.feasible
        np.testing.assert_allclose(np.asarray(result.values[i]), solution.values, atol=TOLERANCE)
        np.testing.assert_allclose(float(result.multipliers[i, 0]), solution.multipliers[0], atol=0.02)
        multipliers.append(solution.multipliers[0])
    assert multipliers[0] == 0.0 and multipliers[1] > 0.05 and multipliers[2] > multipliers[1]


def test_sampled_pairs_variant_reports_its_gap_to_the_exact_front(synthetic_run):
    """The pairwise variant trained on a sampled pair dataset, with its dual from the pairs (not the closed form),
    is reported per threshold with its gap to the exact optimum and its violation, recomputed here."""
    _, payload = synthetic_run
    for structure, result in payload["structures"].items():
        problem = problems.ALL_STRUCTURES[structure](num_prompts=8, num_candidates=6)
        w = exact.win_rates_numpy(problem.pref, problem.comparison_policy)
        method = result["methods"]["mopo_pairwise_sampled"]
        assert method["kind"] == "estimated" and method["pairs"] == SyntheticConfig().sampled_pairs
        gaps = []
        for entry, threshold in zip(method["points"], problem.threshold_grid):
            solution = exact.solve_constrained(w, problem.ref, problem.prompt_weights, problem.tau, threshold)
            assert entry["exact_feasible"] == solution.feasible
            np.testing.assert_allclose(entry["constraint_violation"],
                                       np.max(np.asarray(threshold) - entry["secondary_values"]), atol=1e-9)
            if solution.feasible:
                np.testing.assert_allclose(entry["primary_gap"], solution.values[0] - entry["primary_value"],
                                           atol=1e-6)
                gaps.append(entry["primary_gap"])
        np.testing.assert_allclose(method["estimate_error"]["max_abs_primary_gap"], np.max(np.abs(gaps)), atol=1e-9)


def test_outputs_written_and_schema(synthetic_run):
    out, payload = synthetic_run
    with open(os.path.join(out, "results.json")) as handle:
        stored = json.load(handle)
    assert set(stored["structures"]) == set(problems.ALL_STRUCTURES)
    for name, result in stored["structures"].items():
        assert os.path.getsize(os.path.join(out, f"pareto_{name}.png")) > 10_000
        for method in ("mopo_weighted_bc", "mopo_pairwise", "mopo_pairwise_sampled", "dpo_primary", "ipo_primary",
                       "weighted_dpo", "weighted_ipo", "modpo", "rewarded_soups"):
            entry = result["methods"][method]
            assert {"hypervolume_ratio", "mean_kl", "threshold_error", "points"} <= set(entry)
    ablation = stored["ablation"]
    assert len(ablation["runs"]) == 16
    assert {r["t0"] for r in ablation["runs"]} == {1, 100, 1000, "never"}
    assert os.path.getsize(os.path.join(out, "ablation_schedule.png")) > 10_000
    # The never-refreshing schedule solves the fixed-reference problem, so it must hold the constraint.
    assert all(r["constraint_held"] for r in ablation["runs"] if r["t0"] == "never")


def test_same_shape_structures_share_one_compile():
    before = _mopo_sweep._cache_size()
    config = SyntheticConfig(steps=50)
    for name in ("bt_conflicting", "intransitive"):
        problem = problems.ALL_STRUCTURES[name](num_prompts=5, num_candidates=6)
        tabular = make_problem(problem.pref, problem.ref, problem.mu, problem.prompt_weights)
        batch = jax.tree.map(lambda leaf: leaf[None], tabular)
        _mopo_sweep(batch, jnp.full((1, 3, 1), 0.5, jnp.float32), config.mopo_config(0.08), config.settings,
                    "weighted_bc")
    assert _mopo_sweep._cache_size() == before + 1


def test_user_problem_command(tmp_path):
    problem = problems.make_thurstone_ties(seed=3, num_prompts=4, num_candidates=5)
    path = tmp_path / "mine.npz"
    problems.save_problem(problem, path)
    out = tmp_path / "out"
    code = cli.main(["synthetic", "--problem", str(path), "--tau", "0.1", "--thresholds", "0.5,0.6,0.99",
                     "--out", str(out), "plots=false", "steps=3000"])
    assert code == 0
    stored = json.load(open(out / "results.json"))
    (result,) = stored["structures"].values()
    assert result["tau"] == 0.1
    statuses = [p["status"] for p in result["methods"]["mopo_weighted_bc"]["points"]]
    feasible = [p["feasible"] for p in result["exact"]["points"]]
    assert statuses == ["feasible" if f else "infeasible" for f in feasible]
    assert feasible[-1] is False  # 0.99 is beyond what any policy reaches on this problem
    policies = np.load(out / "policies.npz")
    assert policies["mopo_weighted_bc"].shape == (3, 4, 5)
    np.testing.assert_allclose(policies["mopo_weighted_bc"].sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--tau", "0"], "tau"),
        (["--thresholds", "0.5,1.5"], "thresholds"),
        (["--thresholds", "0.5;0.6,0.7"], None),
    ],
)
def test_user_problem_command_errors(tmp_path, capsys, argv, fragment):
    problem = problems.make_bt_conflicting(num_prompts=3, num_candidates=4)
    path = tmp_path / "p.npz"
    problems.save_problem(problem, path)
    if fragment is None:
        with pytest.raises(SystemExit):
            cli.main(["synthetic", "--problem", str(path), "--out", str(tmp_path), *argv])
        return
    assert cli.main(["synthetic", "--problem", str(path), "--out", str(tmp_path), "plots=false", *argv]) == 2
    assert fragment in capsys.readouterr().err


def test_missing_problem_file_is_named(tmp_path, capsys):
    missing = tmp_path / "nope.npz"
    assert cli.main(["synthetic", "--problem", str(missing), "--out", str(tmp_path)]) == 2
    assert str(missing) in capsys.readouterr().err
