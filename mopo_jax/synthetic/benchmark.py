"""The synthetic Pareto benchmark: every structure, every method, the exact front, metrics, plots and the ablation.

Entry points: :func:`run_benchmark` (``mopo synthetic``) and :func:`run_user_problem` (``mopo synthetic --problem``).
The schema of ``results.json`` is documented in docs/synthetic.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mopo_jax.policy_objectives import MOPOPairwise
from mopo_jax.state import MOPOConfig
from mopo_jax.synthetic import baselines, exact, problems
from mopo_jax.synthetic.tabular import (
    TrainSettings,
    make_problem,
    policy_metrics,
    run_mopo,
    run_objective,
    sampled_pair_data,
)


@dataclasses.dataclass
class SyntheticConfig:
    """Configuration of ``mopo synthetic``.

    Attributes:
      structures: names from :data:`mopo_jax.synthetic.problems.ALL_STRUCTURES` (all when empty).
      seed: seed of every problem generator.
      num_prompts, num_candidates: problem size (one shape for every two-objective structure: one compile each).
      tau: KL temperature of the problem, for every method (MOPO's tau, DPO's beta, IPO's tau) and the exact solver;
        None uses the problem's own (the paper's 0.08 for the built-in structures).
      mopo: MOPO's configuration (its ``tau`` is replaced by the problem's); the default holds the reference fixed
        (no refresh) and uses the plain estimate (``eps = 0``), the problem the exact solver solves.
      steps, learning_rate, final_learning_rate: optimisation budget shared by every method.
      sampled_pairs: size of the pair dataset of the ``mopo_pairwise_sampled`` variant (pairs drawn from
        ``mu x mu`` with one hard label per objective; 0 skips the variant).
      mopo_pairwise_sampled: MOPO's configuration for that variant (its ``tau`` is the problem's). Its multiplier
        step reads the *trained* policy's values, not the closed form's, so it is a primal-dual iteration whose dual
        step must be slower than the policy's: ``multiplier_lr`` 0.1 (0.5 oscillates; docs/synthetic.md).
      num_thresholds: points of the threshold sweep for the exact front and MOPO.
      sweep_resolution: simplex grid resolution of the scalarisation / MODPO / soups weights.
      tolerance: the 1e-3 of the acceptance (value gap, constraint violation, convergence).
      ablation: run the beta x t0 schedule ablation on the conflicting structure.
      ablation_steps, ablation_betas, ablation_periods: its budget and grid (period 0 means "never").
      plots: write the PNG plots (needs matplotlib).
    """

    structures: tuple[str, ...] = ()
    seed: int = 0
    num_prompts: int = 8
    num_candidates: int = 6
    tau: float | None = None
    mopo: MOPOConfig = MOPOConfig(eps=0.0, refresh_every=None)
    steps: int = 6000
    learning_rate: float = 0.1
    final_learning_rate: float = 1e-3
    sampled_pairs: int = 16384
    mopo_pairwise_sampled: MOPOConfig = MOPOConfig(eps=0.0, refresh_every=None, multiplier_lr=0.1)
    num_thresholds: int = 10
    sweep_resolution: int = 8
    tolerance: float = 1e-3
    ablation: bool = True
    ablation_steps: int = 4000
    ablation_betas: tuple[float, ...] = (0.9, 0.95, 0.99, 0.999)
    ablation_periods: tuple[int, ...] = (1, 100, 1000, 0)
    plots: bool = True

    def __post_init__(self):
        if isinstance(self.steps, bool) or int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        tolerance = float(self.tolerance)
        if not tolerance >= 0.0 or tolerance == float("inf"):  # also rejects NaN
            raise ValueError(f"tolerance must be a finite number >= 0, got {self.tolerance!r}")

    @property
    def settings(self) -> TrainSettings:
        return TrainSettings(self.steps, self.learning_rate, self.final_learning_rate)

    def mopo_config(self, tau: float) -> MOPOConfig:
        return dataclasses.replace(self.mopo, tau=tau)


# ---------------------------------------------------------------------------------------------------------------
# Compiled runners over a batch of problems of one shape (a leading axis S): the structures of a shape run in one
# program per method, which costs little more than one of them (a step of these small problems is mostly the fixed
# cost of its operations), and compiles once.


@partial(jax.jit, static_argnames=("config", "settings", "policy_step"))
def _mopo_sweep(problems, thresholds, config, settings, policy_step):
    """``problems`` [S], ``thresholds`` [S, M, K-1]."""
    def sweep(problem, points):
        return jax.vmap(lambda b: run_mopo(problem, b, config, settings, policy_step))(points)

    return jax.vmap(sweep)(problems, thresholds)


@partial(jax.jit, static_argnames=("config", "settings"))
def _mopo_sampled_pairs_sweep(problems, thresholds, data, config, settings):
    def sweep(problem, points, pairs):
        return jax.vmap(lambda b: run_objective(problem, MOPOPairwise(config, b), pairs, settings))(points)

    return jax.vmap(sweep)(problems, thresholds, data)


@partial(jax.jit, static_argnames=("kind", "tau", "settings"))
def _scalarised_sweep(problems, alphas, kind, tau, settings):
    return jax.vmap(lambda problem: baselines.run_scalarised(kind, problem, alphas, tau, settings))(problems)


@partial(jax.jit, static_argnames=("tau", "settings"))
def _modpo_sweep(problems, alphas, tau, settings):
    return jax.vmap(lambda problem: baselines.run_modpo(problem, alphas, tau, settings))(problems)


@jax.jit
def _soups(problem, expert_logits, alphas):
    return baselines.rewarded_soups(problem, expert_logits, alphas)


@partial(jax.jit, static_argnames=("config", "settings"))
def _ablation_grid(problem, thresholds, betas, periods, config, settings):
    def one(beta, period):
        return run_mopo(problem, thresholds, dataclasses.replace(config, ratchet_beta=beta), settings, "weighted_bc",
                        period)

    return jax.vmap(one)(betas, periods)


def _timed(fn: Callable, *args, **static) -> tuple[Any, float, float]:
    """Compiles the jitted ``fn`` ahead of time for ``args`` (its ``static`` arguments by keyword), then runs it once:
    ``(result, compile seconds, run seconds)`` without running the sweep a second time to separate the two."""
    start = time.perf_counter()
    compiled = fn.lower(*args, **static).compile()
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = jax.block_until_ready(compiled(*args))
    return result, compile_seconds, time.perf_counter() - start


# One program for the whole dataset draw (op by op it compiled dozens of small programs, seconds on a cold start).
_sampled_pair_data = jax.jit(sampled_pair_data, static_argnums=1)


def _softmax(logits) -> np.ndarray:
    """Probabilities of final policy logits ``[..., N]`` (float64, on the host)."""
    logits = np.asarray(logits, np.float64)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def _time_first_call(fn: Callable, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args, **kwargs))
    return result, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------------
# Metrics.


def steps_to_tolerance(ok: np.ndarray) -> int | None:
    """First step after which ``ok`` holds until the end (1-based count of steps), or None if it never settles."""
    ok = np.asarray(ok, bool)
    if not ok[-1]:
        return None
    failures = np.flatnonzero(~ok)
    return int(failures[-1] + 2) if failures.size else 1


def _float_list(values) -> list[float]:
    return [float(v) for v in np.asarray(values).reshape(-1)]


def threshold_errors(points: np.ndarray, exact_solutions, tolerance: float) -> dict[str, Any]:
    """For each feasible threshold, the best primary value among a method's points that meet it (within tolerance).

    ``points`` is ``[M, K]``. Returns the per-threshold gap to the exact optimum (negative when the method's point has
    a larger primary value, which it buys with more KL than the constrained optimum), the smallest violation when no
    point meets the threshold, and summaries.
    """
    per_threshold = []
    for solution in exact_solutions:
        if not solution.feasible:
            continue
        b = np.asarray(solution.thresholds)
        violation = np.max(np.maximum(b[None, :] - points[:, 1:], 0.0), axis=1)
        meets = violation <= tolerance
        entry: dict[str, Any] = {"threshold": _float_list(b)}
        if meets.any():
            entry["primary_gap"] = float(solution.values[0] - points[meets, 0].max())
            entry["met"] = True
        else:
            entry["primary_gap"] = None
            entry["met"] = False
            # None when the method has no point at all to compare (e.g. MOPO met none of its own constraints)
            entry["min_violation"] = float(violation.min()) if violation.size else None
        per_threshold.append(entry)
    gaps = [e["primary_gap"] for e in per_threshold if e["primary_gap"] is not None]
    return {
        "per_threshold": per_threshold,
        "thresholds_met": int(sum(e["met"] for e in per_threshold)),
        "thresholds_feasible": len(per_threshold),
        "mean_primary_gap": float(np.mean(gaps)) if gaps else None,
        "max_primary_gap": float(np.max(gaps)) if gaps else None,
    }


def _hypervolume_ratio(points: np.ndarray, exact_points: np.ndarray, reference_point: np.ndarray) -> float | None:
    """Attained over exact hypervolume; None when the exact front dominates no volume beyond the reference point."""
    ratio = float(exact.hypervolume_ratio(points, exact_points, reference_point))
    return ratio if np.isfinite(ratio) else None


def _ratio_text(ratio: float | None) -> str:
    return "n/a (exact front has no volume)" if ratio is None else f"{ratio:.5f}"


def _optional(value: float | None, spec: str) -> str:
    """A number, or "n/a" where there is none (e.g. a gap when the exact solver finds no threshold feasible)."""
    return "n/a" if value is None else format(value, spec)


# ---------------------------------------------------------------------------------------------------------------
# One structure.


def _weight_points(num_objectives: int, resolution: int) -> np.ndarray:
    """Unit vectors first (single-objective runs, the soups' experts), then the interior of the simplex grid."""
    return np.concatenate([np.eye(num_objectives), baselines.simplex_weights(num_objectives, resolution)])


def _mopo_entries(result, run_seconds, steps, exact_solutions, thresholds, tolerance) -> dict[str, Any]:
    values = np.asarray(result.values, np.float64)
    trajectory_values = np.asarray(result.trajectory.values, np.float64)  # [M, steps, K]
    points, attained = [], []
    for i, solution in enumerate(exact_solutions):
        b = np.asarray(thresholds[i], np.float64)
        violation = float(np.max(np.maximum(b - values[i, 1:], 0.0)))
        entry: dict[str, Any] = {"threshold": _float_list(b), "exact_feasible": bool(solution.feasible)}
        if violation > tolerance:
            # MOPO's own verdict: after the budget the constraint is still violated, so the multiplier is diverging.
            entry.update(status="infeasible", multipliers=_float_list(result.multipliers[i]), final_violation=violation)
        else:
            entry.update(
                status="feasible",
                primary_value=float(values[i, 0]),
                secondary_values=_float_list(values[i, 1:]),
                constraint_violation=violation,
                multipliers=_float_list(result.multipliers[i]),
                kl=float(result.kl[i]),
            )
            attained.append(values[i])
            if solution.feasible:
                gap = np.abs(trajectory_values[i, :, 0] - solution.values[0])
                viol = np.max(np.maximum(b[None, :] - trajectory_values[i, :, 1:], 0.0), axis=1)
                settled = steps_to_tolerance((gap <= tolerance) & (viol <= tolerance))
                entry.update(
                    exact_primary_value=float(solution.values[0]),
                    primary_gap=float(solution.values[0] - values[i, 0]),
                    exact_multipliers=_float_list(solution.multipliers),
                    steps_to_tolerance=settled,
                    seconds_to_tolerance=None if settled is None else settled * run_seconds / steps,
                )
        points.append(entry)
    return {"points": points, "attained": np.array(attained).reshape(-1, values.shape[1])}


def _estimator_entries(result, exact_solutions, thresholds) -> dict[str, Any]:
    """Every threshold's final point of a MOPO variant whose values are only estimated (no feasibility verdict):
    the gap to the exact primary value and the constraint violation, measured with the exact win rates."""
    values = np.asarray(result.values, np.float64)
    points, gaps, violations = [], [], []
    for i, solution in enumerate(exact_solutions):
        b = np.asarray(thresholds[i], np.float64)
        violation = float(np.max(b - values[i, 1:]))
        entry: dict[str, Any] = {"threshold": _float_list(b), "exact_feasible": bool(solution.feasible),
                                 "primary_value": float(values[i, 0]), "secondary_values": _float_list(values[i, 1:]),
                                 "constraint_violation": violation, "multipliers": _float_list(result.multipliers[i]),
                                 "kl": float(result.kl[i])}
        if solution.feasible:
            entry["primary_gap"] = float(solution.values[0] - values[i, 0])
            gaps.append(entry["primary_gap"])
            violations.append(violation)
        points.append(entry)
    summary = {"max_abs_primary_gap": float(np.max(np.abs(gaps))) if gaps else None,
               "mean_primary_gap": float(np.mean(gaps)) if gaps else None,
               "max_violation": float(np.max(violations)) if violations else None}
    return {"points": points, "estimate_error": summary}


def _sweep_entries(values, kl, weights, trajectory_values, run_seconds, steps, tolerance) -> list[dict[str, Any]]:
    entries = []
    for i in range(values.shape[0]):
        entry = {
            "weights": _float_list(weights[i]),
            "primary_value": float(values[i, 0]),
            "secondary_values": _float_list(values[i, 1:]),
            "kl": float(kl[i]),
        }
        if trajectory_values is not None:
            drift = np.max(np.abs(trajectory_values[i] - values[i][None, :]), axis=-1)
            settled = steps_to_tolerance(drift <= tolerance)
            entry["steps_to_tolerance"] = settled
            entry["seconds_to_tolerance"] = None if settled is None else settled * run_seconds / steps
        entries.append(entry)
    return entries


#: Preference entries (K x X x N x N) above which a run announces each stage before it starts.
LARGE_PROBLEM_ENTRIES = 2_000_000


def _announcing(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` that also prints the time since the previous line (progress on problems where a stage takes
    minutes)."""
    last = [time.perf_counter()]

    def announce(message: str) -> None:
        now = time.perf_counter()
        log(f"{message} [{time.strftime('%H:%M:%S')}, +{now - last[0]:.0f} s]")
        last[0] = now

    return announce


class _Prepared(NamedTuple):
    tau: float
    tabular: Any  # TabularProblem
    thresholds: np.ndarray  # [M, K-1]


def _prepare(problem: problems.PreferenceProblem, config: SyntheticConfig,
             thresholds: np.ndarray | None = None) -> _Prepared:
    """The problem's temperature, its tabular form and its threshold sweep (given, the problem's own grid, or the
    default grid between what the reference and the unconstrained optimum attain)."""
    tau = float(problem.tau if config.tau is None else config.tau)
    tabular = make_problem(problem.pref, problem.ref, problem.mu, problem.prompt_weights)
    num_objectives = tabular.win_rates.shape[0]
    if thresholds is None and problem.threshold_grid is not None:
        thresholds = problem.threshold_grid
    if thresholds is None:
        thresholds = exact.default_threshold_grid(
            np.asarray(tabular.win_rates, np.float64), np.asarray(problem.ref, np.float64),
            np.asarray(tabular.prompt_weights, np.float64), tau, num=config.num_thresholds)
    return _Prepared(tau, tabular, np.asarray(thresholds, np.float64).reshape(-1, num_objectives - 1))


def _sweeps(prepared: list[_Prepared], config: SyntheticConfig) -> list[dict[str, tuple[Any, float, float]]]:
    """Every trained method's sweep for problems of one shape and temperature, each method one program over the
    batch: per problem, ``{method: (result, compile seconds, run seconds)}`` (the seconds of the whole batch).

    Threshold sweeps of different lengths are padded with copies of their last point (the runs are independent, so
    the real points' results are unchanged) and cut back."""
    tau, settings = prepared[0].tau, config.settings
    batch = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[p.tabular for p in prepared])
    lengths = [len(p.thresholds) for p in prepared]
    padded = np.stack([np.concatenate([p.thresholds, np.repeat(p.thresholds[-1:], max(lengths) - n, axis=0)])
                       for p, n in zip(prepared, lengths)])
    thresholds = jnp.asarray(padded, jnp.float32)
    out: list[dict[str, tuple[Any, float, float]]] = [{} for _ in prepared]

    def record(name, result, compile_seconds, run_seconds, cut=False):
        for i, entry in enumerate(out):
            part = jax.tree.map(lambda leaf: leaf[i, :lengths[i]] if cut else leaf[i], result)
            entry[name] = (part, compile_seconds, run_seconds)

    mopo_config = config.mopo_config(tau)
    for policy_step in ("weighted_bc", "pairwise"):
        record(f"mopo_{policy_step}", *_timed(_mopo_sweep, batch, thresholds, config=mopo_config, settings=settings,
                                               policy_step=policy_step), cut=True)
    if config.sampled_pairs > 0:
        data = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[
            _sampled_pair_data(p.tabular, config.sampled_pairs, jax.random.PRNGKey(config.seed)) for p in prepared])
        sampled_config = dataclasses.replace(config.mopo_pairwise_sampled, tau=tau)
        record("mopo_pairwise_sampled", *_timed(_mopo_sampled_pairs_sweep, batch, thresholds, data,
                                                config=sampled_config, settings=settings), cut=True)
    num_objectives = prepared[0].tabular.win_rates.shape[0]
    weight_points = jnp.asarray(_weight_points(num_objectives, config.sweep_resolution), jnp.float32)
    for kind in ("dpo", "ipo"):
        record(kind, *_timed(_scalarised_sweep, batch, weight_points, kind=kind, tau=tau, settings=settings))
    record("modpo", *_timed(_modpo_sweep, batch, _modpo_weights(num_objectives, config), tau=tau, settings=settings))
    return out


def _modpo_weights(num_objectives: int, config: SyntheticConfig) -> jax.Array:
    # MODPO divides by the primary weight: only weights with alpha_0 > 0 define it.
    interior = _weight_points(num_objectives, config.sweep_resolution)[num_objectives:]
    return jnp.asarray(interior[interior[:, 0] > 0], jnp.float32)


def run_structure(
    problem: problems.PreferenceProblem,
    config: SyntheticConfig,
    thresholds: np.ndarray | None = None,
    log: Callable[[str], None] = print,
    prepared: _Prepared | None = None,
    sweeps: dict[str, tuple[Any, float, float]] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Exact front, MOPO (weighted-BC and pairwise) and every baseline on one problem.

    ``prepared`` and ``sweeps`` (from :func:`_prepare` and :func:`_sweeps`, when :func:`run_benchmark` ran the
    structures of one shape together) are computed here when not given.

    Returns:
      ``(result, policies)``: the JSON-ready result and the final policies of every method (``[M, X, N]``
      probabilities keyed by method).
    """
    prepared = _prepare(problem, config, thresholds) if prepared is None else prepared
    tau, tabular, thresholds = prepared
    w = np.asarray(tabular.win_rates, np.float64)
    ref = np.asarray(problem.ref, np.float64)
    prompt_weights = np.asarray(tabular.prompt_weights, np.float64)
    num_objectives = w.shape[0]
    settings = config.settings
    reference_values = np.asarray(policy_metrics(tabular.ref_log_probs, tabular)["values"], np.float64)
    num_prompts, num_candidates = ref.shape
    if num_prompts * num_candidates**2 * num_objectives > LARGE_PROBLEM_ENTRIES:
        # Minutes per method at this size: say what is running before it runs, not only after.
        log(f"  large problem ({num_objectives} objectives x {num_prompts} prompts x {num_candidates}^2 pairs, "
            f"{len(thresholds)} thresholds): a line with the time since the previous one follows each stage")
        log = _announcing(log)
        log("  exact solver: solving every threshold ...")
    start = time.perf_counter()
    solutions = exact.exact_front(w, ref, prompt_weights, tau, thresholds)
    exact_seconds = time.perf_counter() - start
    exact_points = np.array([s.values for s in solutions if s.feasible]).reshape(-1, num_objectives)
    log(f"  exact solver: {sum(s.feasible for s in solutions)}/{len(solutions)} thresholds feasible "
        f"({exact_seconds:.2f} s)")
    if sweeps is None:
        (sweeps,) = _sweeps([prepared], config)

    methods: dict[str, Any] = {}
    policies: dict[str, np.ndarray] = {}
    for policy_step in ("weighted_bc", "pairwise"):
        name = f"mopo_{policy_step}"
        result, compile_seconds, run_seconds = sweeps[name]
        entries = _mopo_entries(result, run_seconds, settings.steps, solutions, thresholds, config.tolerance)
        attained = entries.pop("attained")
        methods[name] = {
            "kind": "threshold",
            **entries,
            "hypervolume_ratio": _hypervolume_ratio(attained, exact_points, reference_values),
            "mean_kl": float(np.mean(np.asarray(result.kl))),
            "threshold_error": threshold_errors(attained, solutions, config.tolerance),
            "compile_seconds": compile_seconds,
            "run_seconds": run_seconds,
            "steps": settings.steps,
        }
        policies[name] = _softmax(result.logits)
        log(f"  {name}: hypervolume ratio {_ratio_text(methods[name]['hypervolume_ratio'])} "
            f"(compile {compile_seconds:.2f} s, run {run_seconds:.2f} s)")

    if config.sampled_pairs > 0:
        name = "mopo_pairwise_sampled"
        result, compile_seconds, run_seconds = sweeps[name]
        entries = _estimator_entries(result, solutions, thresholds)
        values = np.asarray(result.values, np.float64)
        methods[name] = {
            "kind": "estimated",
            **entries,
            "pairs": config.sampled_pairs,
            "hypervolume_ratio": _hypervolume_ratio(values, exact_points, reference_values),
            "mean_kl": float(np.mean(np.asarray(result.kl))),
            "threshold_error": threshold_errors(values, solutions, config.tolerance),
            "compile_seconds": compile_seconds,
            "run_seconds": run_seconds,
            "steps": settings.steps,
        }
        policies[name] = _softmax(result.logits)
        error = entries["estimate_error"]
        log(f"  {name}: {config.sampled_pairs} pairs, max |primary gap| "
            f"{_optional(error['max_abs_primary_gap'], '.4f')}, max violation {_optional(error['max_violation'], '.4f')} "
            f"(compile {compile_seconds:.2f} s, run {run_seconds:.2f} s)")

    weight_points = _weight_points(num_objectives, config.sweep_resolution)
    expert_logits = None
    for kind in ("dpo", "ipo"):
        result, compile_seconds, run_seconds = sweeps[kind]
        values, kl = np.asarray(result.values, np.float64), np.asarray(result.kl, np.float64)
        trajectory = np.asarray(result.trajectory.values, np.float64)
        entries = _sweep_entries(values, kl, weight_points, trajectory, run_seconds, settings.steps, config.tolerance)
        primary_only = slice(0, 1)
        interior = slice(num_objectives, None)
        for name, part, method_kind in (
            (f"{kind}_primary", primary_only, "single"),
            (f"weighted_{kind}", interior, "sweep"),
        ):
            methods[name] = {
                "kind": method_kind,
                "points": entries[part],
                "hypervolume_ratio": _hypervolume_ratio(values[part], exact_points, reference_values),
                "mean_kl": float(np.mean(kl[part])),
                "threshold_error": threshold_errors(values[part], solutions, config.tolerance),
                "compile_seconds": compile_seconds,
                "run_seconds": run_seconds,
                "steps": settings.steps,
            }
            policies[name] = _softmax(result.logits[part])
        if kind == "dpo":
            expert_logits = result.logits[:num_objectives]
        log(f"  {kind} family: primary-only ratio {_ratio_text(methods[f'{kind}_primary']['hypervolume_ratio'])}, "
            f"weighted ratio {_ratio_text(methods[f'weighted_{kind}']['hypervolume_ratio'])} "
            f"(compile {compile_seconds:.2f} s, run {run_seconds:.2f} s)")

    interior_weights = weight_points[num_objectives:]
    modpo_weights = np.asarray(_modpo_weights(num_objectives, config), np.float64)
    result, compile_seconds, run_seconds = sweeps["modpo"]
    values, kl = np.asarray(result.values, np.float64), np.asarray(result.kl, np.float64)
    methods["modpo"] = {
        "kind": "sweep",
        "points": _sweep_entries(values, kl, modpo_weights, np.asarray(result.trajectory.values),
                                 run_seconds, settings.steps, config.tolerance),
        "hypervolume_ratio": _hypervolume_ratio(values, exact_points, reference_values),
        "mean_kl": float(np.mean(kl)),
        "threshold_error": threshold_errors(values, solutions, config.tolerance),
        "compile_seconds": compile_seconds,
        "run_seconds": run_seconds,
        "steps": settings.steps,
    }
    policies["modpo"] = _softmax(result.logits)
    log(f"  modpo: ratio {_ratio_text(methods['modpo']['hypervolume_ratio'])} (compile {compile_seconds:.2f} s, run {run_seconds:.2f} s)")

    soups, soup_seconds = _time_first_call(_soups, tabular, expert_logits, jnp.asarray(interior_weights, jnp.float32))
    values, kl = np.asarray(soups["values"], np.float64), np.asarray(soups["kl"], np.float64)
    methods["rewarded_soups"] = {
        "kind": "sweep",
        "points": _sweep_entries(values, kl, interior_weights, None, 0.0, settings.steps, config.tolerance),
        "hypervolume_ratio": _hypervolume_ratio(values, exact_points, reference_values),
        "mean_kl": float(np.mean(kl)),
        "threshold_error": threshold_errors(values, solutions, config.tolerance),
        "compile_seconds": soup_seconds,
        "run_seconds": 0.0,
        "steps": settings.steps,
        "note": "interpolates the logits of the dpo experts (unit weights); no training of its own",
    }
    policies["rewarded_soups"] = _softmax(soups["logits"])
    log(f"  rewarded_soups: ratio {_ratio_text(methods['rewarded_soups']['hypervolume_ratio'])}")

    result = {
        "structure": problem.name,
        "description": problem.description,
        "shape": {"objectives": int(num_objectives), "prompts": int(ref.shape[0]), "candidates": int(ref.shape[1])},
        "tau": tau,
        "reference_values": _float_list(reference_values),
        "exact": {
            "seconds": exact_seconds,
            "points": [
                {
                    "threshold": _float_list(s.thresholds),
                    "feasible": bool(s.feasible),
                    **(
                        {
                            "values": _float_list(s.values),
                            "multipliers": _float_list(s.multipliers),
                            "kl": float(s.kl),
                            "grad_norm": float(s.grad_norm),
                        }
                        if s.feasible
                        else {}
                    ),
                }
                for s in solutions
            ],
        },
        "methods": methods,
    }
    policies["exact"] = np.stack([s.policy if s.feasible else np.full_like(ref, np.nan) for s in solutions])
    return result, policies


# ---------------------------------------------------------------------------------------------------------------
# Ablation of the schedule (lagged reference, threshold ratchet).


def run_ablation(problem: problems.PreferenceProblem, config: SyntheticConfig, log=print) -> dict[str, Any]:
    """MOPO's full schedule on one problem over ``beta x t0`` (``t0 = 0`` means the reference never refreshes)."""
    tau = float(problem.tau if config.tau is None else config.tau)
    tabular = make_problem(problem.pref, problem.ref, problem.mu, problem.prompt_weights)
    w = np.asarray(tabular.win_rates, np.float64)
    ref, prompt_weights = np.asarray(problem.ref), np.asarray(tabular.prompt_weights)
    unconstrained = exact.solve_constrained(w[:1], ref, prompt_weights, tau)
    secondary_unconstrained = np.einsum("xn,kxn,x->k", unconstrained.policy, w[1:], prompt_weights)
    secondary_best = np.einsum("kx,x->k", w[1:].max(axis=-1), prompt_weights)
    # A constraint halfway between the unconstrained optimum and the best attainable secondary value.
    threshold = 0.5 * (secondary_unconstrained + secondary_best)
    steps = config.ablation_steps
    betas, periods = np.meshgrid(np.asarray(config.ablation_betas), np.asarray(config.ablation_periods), indexing="ij")
    # "never" becomes a period longer than the run, so every schedule shares one compiled program.
    periods_array = np.where(periods.reshape(-1) > 0, periods.reshape(-1), steps + 1)
    settings = config.settings._replace(steps=steps)
    mopo_config = config.mopo_config(tau)
    result, seconds = _time_first_call(
        _ablation_grid,
        tabular,
        jnp.asarray(threshold, jnp.float32),
        jnp.asarray(betas.reshape(-1), jnp.float32),
        jnp.asarray(periods_array, jnp.int32),
        mopo_config,
        settings,
    )
    values = np.asarray(result.trajectory.values, np.float64)  # [R, steps, K]
    ratcheted = np.asarray(result.trajectory.thresholds, np.float64)  # [R, steps, K-1]
    every = max(1, steps // 200)
    runs = []
    for r, (beta, period) in enumerate(zip(betas.reshape(-1), periods.reshape(-1))):
        final = values[r, -1]
        runs.append(
            {
                "beta": float(beta),
                "t0": int(period) if period > 0 else "never",
                "final_primary": float(final[0]),
                "final_secondary": _float_list(final[1:]),
                "final_kl_to_initial_reference": float(np.asarray(result.kl)[r]),
                "final_ratcheted_thresholds": _float_list(ratcheted[r, -1]),
                "constraint_held": bool(np.all(final[1:] >= threshold - config.tolerance)),
                "ratcheted_constraint_held": bool(np.all(final[1:] >= ratcheted[r, -1] - config.tolerance)),
                "trajectory_every": every,
                "trajectory_primary": _float_list(values[r, ::every, 0]),
                "trajectory_secondary": values[r, ::every, 1:].tolist(),
            }
        )
    log(f"  ablation: {len(runs)} schedules x {steps} steps in {seconds:.2f} s (compile included)")
    return {"structure": problem.name, "threshold": _float_list(threshold), "steps": steps, "seconds": seconds,
            "runs": runs}


# ---------------------------------------------------------------------------------------------------------------
# Drivers.


METHOD_ORDER = ("mopo_weighted_bc", "mopo_pairwise", "mopo_pairwise_sampled", "dpo_primary", "ipo_primary",
                "weighted_dpo", "weighted_ipo", "modpo", "rewarded_soups")


def summary_table(structures: dict[str, Any]) -> str:
    """Markdown table: per structure and method, hypervolume ratio, mean KL, thresholds met, mean primary gap."""
    fmt = _optional

    lines = ["| structure | method | hypervolume ratio | mean KL | thresholds met | mean primary gap |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    estimated = []
    for name, result in structures.items():
        for method in METHOD_ORDER:
            if method not in result["methods"]:
                continue
            entry = result["methods"][method]
            error = entry["threshold_error"]
            lines.append(
                f"| {name} | {method} | {fmt(entry['hypervolume_ratio'], '.4f')} | {entry['mean_kl']:.3f} | "
                f"{error['thresholds_met']}/{error['thresholds_feasible']} | "
                f"{fmt(error['mean_primary_gap'], '.2e')} |"
            )
            if "estimate_error" in entry:
                e = entry["estimate_error"]
                estimated.append(f"| {name} | {method} ({entry['pairs']} pairs) | "
                                 f"{fmt(e['max_abs_primary_gap'], '.4f')} | {fmt(e['mean_primary_gap'], '.4f')} | "
                                 f"{fmt(e['max_violation'], '.4f')} |")
    if estimated:
        lines += ["", "Estimated duals (gap to the exact front at each feasible threshold, measured with the exact "
                  "win rates):", "", "| structure | method | max abs primary gap | mean primary gap | max violation |",
                  "| --- | --- | ---: | ---: | ---: |", *estimated]
    return "\n".join(lines)


def _write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=1, allow_nan=False)


def run_benchmark(config: SyntheticConfig, out_dir: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``mopo synthetic``: every structure and method; writes ``results.json`` and the plots into ``out_dir``."""
    from mopo_jax.synthetic import plots

    os.makedirs(out_dir, exist_ok=True)
    names = list(config.structures) or list(problems.ALL_STRUCTURES)
    unknown = [n for n in names if n not in problems.ALL_STRUCTURES]
    if unknown:
        raise ValueError(f"unknown structure(s) {unknown}; choose from {sorted(problems.ALL_STRUCTURES)}")
    start = time.perf_counter()
    built = {name: problems.ALL_STRUCTURES[name](seed=config.seed, num_prompts=config.num_prompts,
                                                 num_candidates=config.num_candidates) for name in names}
    prepared = {name: _prepare(problem, config) for name, problem in built.items()}
    groups: dict[tuple, list[str]] = {}
    for name, item in prepared.items():
        groups.setdefault((item.tabular.win_rates.shape, item.tau), []).append(name)
    sweeps = {}
    for members in groups.values():
        log(f"[sweeps] {', '.join(members)}: every trained method in one program per method")
        sweeps.update(zip(members, _sweeps([prepared[name] for name in members], config)))
    structures = {}
    for index, name in enumerate(names):
        log(f"[{index + 1}/{len(names)}] {name}")
        result, _ = run_structure(built[name], config, log=log, prepared=prepared[name], sweeps=sweeps[name])
        structures[name] = result
        if config.plots:
            plots.pareto_plot(result, os.path.join(out_dir, f"pareto_{name}.png"))
    ablation = None
    if config.ablation:
        log("[ablation] bt_conflicting: beta x t0")
        problem = problems.ALL_STRUCTURES["bt_conflicting"](
            seed=config.seed, num_prompts=config.num_prompts, num_candidates=config.num_candidates
        )
        ablation = run_ablation(problem, config, log)
        if config.plots:
            plots.ablation_plot(ablation, os.path.join(out_dir, "ablation_schedule.png"))
    total = time.perf_counter() - start
    payload = {
        "schema_version": 1,
        "config": dataclasses.asdict(config),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "total_seconds": total,
        "structures": structures,
        "ablation": ablation,
    }
    _write_json(os.path.join(out_dir, "results.json"), payload)
    table = summary_table(structures)
    with open(os.path.join(out_dir, "summary.md"), "w") as handle:
        handle.write(table + "\n")
    log(table)
    log(f"done in {total:.1f} s -> {os.path.join(out_dir, 'results.json')}")
    return payload


def run_user_problem(
    path: str, thresholds: np.ndarray | None, config: SyntheticConfig, out_dir: str, log=print
) -> dict[str, Any]:
    """``mopo synthetic --problem FILE``: the exact solver, MOPO and the baselines on a user's ``.npz`` problem.

    Writes ``results.json``, ``policies.npz`` (final policies per method, ``[M, X, N]``) and the Pareto plot.
    """
    from mopo_jax.synthetic import plots

    os.makedirs(out_dir, exist_ok=True)
    problem = problems.load_problem(path)
    num_secondary = problem.pref.shape[0] - 1
    if num_secondary < 1:
        raise ValueError(f"{path}: pref has K={problem.pref.shape[0]} objective; MOPO needs a primary and at least one "
                         "secondary objective")
    if thresholds is not None:
        thresholds = np.asarray(thresholds, np.float64)
        if thresholds.ndim == 1 and num_secondary == 1:
            thresholds = thresholds[:, None]
        if thresholds.ndim != 2 or thresholds.shape[1] != num_secondary:
            raise ValueError(
                f"--thresholds: {path} has {num_secondary} secondary objectives, so each threshold point needs "
                f"{num_secondary} values (separate points with ';'), got shape {thresholds.shape}"
            )
        if np.any((thresholds < 0) | (thresholds > 1)):
            raise ValueError(f"--thresholds must lie in [0, 1], got {thresholds.tolist()}")
    start = time.perf_counter()
    result, policies = run_structure(problem, config, thresholds, log)
    result["problem_file"] = os.path.abspath(path)
    payload = {"schema_version": 1, "config": dataclasses.asdict(config), "jax_version": jax.__version__,
               "total_seconds": time.perf_counter() - start, "structures": {problem.name: result}, "ablation": None}
    _write_json(os.path.join(out_dir, "results.json"), payload)
    np.savez(os.path.join(out_dir, "policies.npz"), **policies)
    if config.plots:
        plots.pareto_plot(result, os.path.join(out_dir, f"pareto_{problem.name}.png"))
    log(f"wrote {out_dir}/results.json, policies.npz")
    return payload
