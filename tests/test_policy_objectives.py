"""Training objectives: the registry and boundary checks, the baselines' losses against NumPy, the pairwise MOPO
estimator end to end against the exact solver, and an objective defined here (outside the package) trained through
the sharded language-model step and the training loop."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mopo_jax as mj
from mopo_jax import policy_objectives as po
from mopo_jax.models import get_preset, init_params
from mopo_jax.synthetic import exact, problems
from mopo_jax.synthetic.tabular import TrainSettings, make_problem, pair_data, run_objective
from mopo_jax.parallel import sharding
from mopo_jax.training.train_step import (
    OptimizerConfig,
    TrainConfig,
    compile_train_step,
    init_train_state,
    make_optimizer,
)

# ---------------------------------------------------------------------------------------------------------------
# A user's objective: SLiC-HF's calibration hinge (Zhao et al. 2023), max(0, delta - beta h), on one objective's
# labels. Nothing in the package knows it.


@po.register_objective("test_slic_hinge")
@dataclasses.dataclass(frozen=True)
class SlicHinge(po.Objective):
    beta: float = 1.0
    delta: float = 1.0
    fields: ClassVar = po.PAIR_FIELDS

    def loss(self, state, batch, log_probs):
        keep = po.pair_valid(batch) & jnp.asarray(batch["label_mask"], bool)[:, 0]
        ratios = log_probs.policy - log_probs.reference
        h = ratios[:, 0] - ratios[:, 1]
        per_row = jnp.maximum(0.0, self.delta - self.beta * h)
        return mj.LossTerms(jnp.sum(jnp.where(keep, per_row, 0.0)), jnp.sum(keep)), {"log_ratios": ratios}

    def init(self):
        return {"steps": jnp.zeros((), jnp.int32)}

    def update(self, state, batch, aux):
        return {"steps": state["steps"] + 1}

    def metrics(self, state, batch, aux):
        return {"hinge_steps": state["steps"]}


def test_registry_names_every_objective_and_rejects_unknown_names():
    names = set(po.registered_objectives())
    assert {"dpo", "ipo", "weighted_dpo", "weighted_ipo", "modpo", "mopo_pairwise", "mopo_candidates",
            "test_slic_hinge"} <= names
    assert po.objective_class("test_slic_hinge") is SlicHinge
    with pytest.raises(ValueError, match="unknown objective 'dpoo'.*registered"):
        po.objective_class("dpoo")
    with pytest.raises(ValueError, match="already registered"):
        po.register_objective("dpo")(SlicHinge)


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda b: {k: v for k, v in b.items() if k != "label_mask"}, "needs field"),
        (lambda b: {**b, "label_mask": b["label_mask"][:, :1]}, r"label_mask.*K = 2"),
        (lambda b: {**b, "preference_probs": b["preference_probs"][:, :, None]}, "preference_probs"),
        (lambda b: {**b, "preference_probs": b["preference_probs"] + 1.0}, r"outside \[0, 1\]"),
        (lambda b: {**b, "pair_weights": np.ones((3, 1))}, "pair_weights"),
    ],
)
def test_check_batch_names_the_offending_field(make, fragment):
    batch = {"preference_probs": np.full((4, 2), 0.7, np.float32), "label_mask": np.ones((4, 2), bool)}
    with pytest.raises(ValueError, match=fragment):
        po.DPO().check_batch(make(batch), where="batch 3")
    assert po.DPO().check_batch(batch) == {"B": 4, "K": 2}


def test_config_errors_are_named():
    with pytest.raises(TypeError, match="beta"):
        mj.MOPOConfig(beta=0.1)  # the ratchet factor is ratchet_beta; DPO's beta lives on DPO
    # The defaults solve the user's problem: plain estimate, fixed reference (robust bound and ratchet opt-in).
    assert mj.MOPOConfig().eps == 0.0 and mj.MOPOConfig().refresh_every is None and mj.MOPOConfig().tau == 0.08
    with pytest.raises(ValueError, match="MOPOPairwise.dual"):
        po.MOPOPairwise(dual="samples")
    with pytest.raises(ValueError, match="mopo.eps"):
        po.MOPOPairwise(mj.MOPOConfig(eps=0.1), dual="policy_samples")
    with pytest.raises(ValueError, match="MOPOCandidates.policy_step"):
        po.MOPOCandidates(policy_step="bc")
    with pytest.raises(ValueError, match="MODPO.weights"):
        po.MODPO(weights=(0.0, 1.0))
    with pytest.raises(ValueError, match="TrainConfig.objective"):
        TrainConfig(objective="dpo")
    with pytest.raises(ValueError, match="learning_rate"):
        OptimizerConfig(learning_rate=float("inf"))


def _log_probs(seed, batch=10):
    rng = np.random.default_rng(seed)
    policy = rng.normal(size=(batch, 2)) - 20
    reference = policy + rng.normal(size=(batch, 2)) * 0.5
    return po.ResponseLogProbs(jnp.asarray(policy, jnp.float32), jnp.asarray(reference, jnp.float32)), policy, reference


def _pair_batch(seed=1, batch=10):
    rng = np.random.default_rng(seed)
    labels = rng.random((batch, 2)) < 0.6
    labels[0] = [False, False]
    valid = np.ones((batch, 2), bool)
    valid[3, 1] = False
    return {"preference_probs": rng.uniform(size=(batch, 2)).astype(np.float32), "label_mask": labels,
            "pair_weights": rng.uniform(0.5, 2, batch).astype(np.float32), "response_valid": valid}


def test_weighted_dpo_is_the_weighted_sum_of_per_objective_means():
    log_probs, policy, reference = _log_probs(0)
    batch = _pair_batch()
    objective = po.WeightedDPO(weights=(0.3, 0.7), beta=0.5)
    _, rows = objective.prepare((), batch)
    terms, _ = objective.loss((), {**batch, **rows}, log_probs)
    h = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    valid = batch["response_valid"].all(1)
    want = 0.0
    for k, alpha in enumerate((0.3, 0.7)):
        rows_k = valid & batch["label_mask"][:, k]
        u, p = batch["pair_weights"][rows_k], batch["preference_probs"][rows_k, k]
        z = 0.5 * h[rows_k]
        per_row = -(p * np.log(1 / (1 + np.exp(-z))) + (1 - p) * np.log(1 / (1 + np.exp(z))))
        want += alpha * np.sum(u * per_row) / np.sum(u)
    np.testing.assert_allclose(float(terms.mean()), want, rtol=1e-5)


def test_modpo_loss_matches_numpy():
    log_probs, policy, reference = _log_probs(2)
    batch = _pair_batch(3)
    batch["reward_margins"] = np.random.default_rng(4).normal(size=(10, 1)).astype(np.float32)
    objective = po.MODPO(beta=0.2, weights=(0.6, 0.4))
    terms, _ = objective.loss((), batch, log_probs)
    h = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    keep = batch["response_valid"].all(1) & batch["label_mask"][:, 0]
    z = (0.2 * h - 0.4 * batch["reward_margins"][:, 0]) / 0.6
    p = batch["preference_probs"][:, 0]
    per_row = -(p * np.log(1 / (1 + np.exp(-z))) + (1 - p) * np.log(1 / (1 + np.exp(z))))
    u = batch["pair_weights"] * keep
    np.testing.assert_allclose(float(terms.mean()), np.sum(u * per_row) / np.sum(u), rtol=1e-5)


def _numpy_plain_pairwise_value(log_ratios, probs, labels, valid, weights, k):
    """V_k = 1/2 + sum_b u_b (rho_b - rho'_b)(P_bk - 1/2) / sum_b u_b (rho_b + rho'_b) over the valid rows
    labelled for k (docs/algorithm.md, section 4)."""
    rows = valid & labels[:, k]
    rho = np.exp(log_ratios[rows] - log_ratios[rows].max())
    u = weights[rows]
    return 0.5 + np.sum(u * (rho[:, 0] - rho[:, 1]) * (probs[rows, k] - 0.5)) / np.sum(u * rho.sum(1))


def _candidate_pool(seed, invalid):
    """Three prompts' pools of 4 candidates with random pairwise preferences for 2 objectives (``P_ji = 1 - P_ij``),
    one candidate ``invalid`` out of its pool, and random policy and reference log-probabilities."""
    rng = np.random.default_rng(seed)
    prompts, candidates = 3, 4
    prefs = rng.uniform(size=(prompts, 2, candidates, candidates)).astype(np.float32)
    prefs = np.triu(prefs, 1) + np.tril(1 - np.swapaxes(np.triu(prefs, 1), -1, -2), -1)
    valid = np.ones((prompts, candidates), bool)
    valid[invalid] = False
    policy = rng.normal(size=(prompts, candidates)).astype(np.float32)
    reference = rng.normal(size=(prompts, candidates)).astype(np.float32)
    return prefs, valid, policy, reference


def _numpy_pool_values(prefs, valid, policy, reference, multiplier, tau):
    """NumPy float64: the harmlessness value over each prompt's pool (leave-one-out win rates) weighted by the
    policy (``pi/pi_ref`` self-normalised) and by the closed form at ``multiplier`` (Eq. 3), averaged over prompts."""
    prompts = len(valid)
    policy_value, closed_form = 0.0, 0.0
    for x in range(prompts):
        pool = np.flatnonzero(valid[x])
        w = np.array([[np.mean([prefs[x, k, i, j] for j in pool if j != i]) for i in pool] for k in range(2)])
        ratio = policy[x, pool].astype(np.float64) - reference[x, pool]
        policy_value += np.sum(np.exp(ratio) / np.exp(ratio).sum() * w[1]) / prompts
        g = (w[0] + multiplier * w[1]) / tau
        closed_form += np.sum(np.exp(g - g.max()) / np.exp(g - g.max()).sum() * w[1]) / prompts
    return policy_value, closed_form


def test_mopo_metrics_log_the_plain_estimate_beside_the_robust_bound():
    """With eps > 0 the multiplier step uses the robust bound of Eq. 5; the metrics also carry this batch's plain
    self-normalised estimate (NumPy, on a batch with a row missing every label, a row with an empty response,
    missing labels and row weights), and the bound lies below it. The candidate objective's plain value is the
    policy's: the valid candidates' win rates weighted by ``pi/pi_ref`` and self-normalised per prompt; the closed
    form's value at the same multiplier is logged beside it."""
    log_probs, policy, reference = _log_probs(5)
    batch = _pair_batch(6)
    objective = po.MOPOPairwise(mj.MOPOConfig(tau=0.1, eps=0.15, refresh_every=None), thresholds=(0.55,))
    state, rows = objective.prepare(objective.init(), batch)
    batch = {**batch, **rows}
    _, aux = objective.loss(state, batch, log_probs)
    metrics = objective.metrics(objective.update(state, batch, aux), batch, aux)
    valid = batch["response_valid"].all(1)
    want = _numpy_plain_pairwise_value(policy - reference, batch["preference_probs"].astype(np.float64),
                                       batch["label_mask"], valid, batch["pair_weights"], 1)
    assert abs(want - 0.5) > 1e-3
    np.testing.assert_allclose(np.asarray(metrics["secondary_estimates_plain"]), [want], rtol=1e-5)
    assert float(metrics["secondary_estimates"][0]) < want - 1e-3

    prefs, valid, policy, reference = _candidate_pool(7, (1, 2))
    batch = {"candidate_preferences": prefs, "candidate_label_mask": np.ones(prefs.shape, bool),
             "response_valid": valid}
    objective = po.MOPOCandidates(mj.MOPOConfig(tau=0.2, eps=0.15, refresh_every=None), thresholds=(0.5,))
    state = objective.init()._replace(multipliers=jnp.asarray([0.6], jnp.float32))
    policy[1, 2] = -np.inf  # an out-of-pool candidate's log-probability never reaches a weight
    _, aux = objective.loss(state, batch, po.ResponseLogProbs(jnp.asarray(policy), jnp.asarray(reference)))
    metrics = objective.metrics(objective.update(state, batch, aux), batch, aux)
    want, closed_form = _numpy_pool_values(prefs, valid, policy, reference, 0.6, 0.2)
    assert abs(want - closed_form) > 1e-2
    np.testing.assert_allclose(np.asarray(metrics["secondary_estimates_plain"]), [want], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(metrics["closed_form_estimates"]), [closed_form], rtol=1e-5)
    assert float(metrics["secondary_estimates"][0]) < want - 1e-3


def test_candidates_log_the_policys_pool_value_beside_the_policy_sample_dual():
    """Under ``dual="policy_samples"`` the multiplier steps on the handed-in measurement, and the pool's plain
    estimate logged beside it is the policy's value (NumPy: win rates weighted by ``pi/pi_ref``), not the closed
    form's, where the step has the reference (the pairwise pool step); weighted BC on a sampled pool has no reference
    pass and logs null rather than the closed form's value under the policy's name."""
    prefs, valid, policy, reference = _candidate_pool(11, (2, 0))
    measured = np.full((len(valid), 1), 0.57, np.float32)
    batch = {"candidate_preferences": prefs, "candidate_label_mask": np.ones(prefs.shape, bool),
             "response_valid": valid, "dual_estimates": measured, "dual_stderr": np.full_like(measured, 0.01),
             "dual_counts": np.full_like(measured, 8.0)}
    want, closed_form = _numpy_pool_values(prefs, valid, policy, reference, 0.6, 0.2)
    assert abs(want - closed_form) > 1e-2
    for policy_step in ("pairwise", "weighted_bc"):
        objective = po.MOPOCandidates(mj.MOPOConfig(tau=0.2, eps=0.0, multiplier_lr=0.5, refresh_every=None),
                                      thresholds=(0.5,), dual="policy_samples", policy_step=policy_step)
        state = objective.init()._replace(multipliers=jnp.asarray([0.6], jnp.float32))
        _, aux = objective.loss(state, batch, po.ResponseLogProbs(jnp.asarray(policy), jnp.asarray(reference)))
        updated = objective.update(state, batch, aux)
        metrics = objective.metrics(updated, batch, aux)
        # The multiplier read the measurement: lambda = max(0, 0.6 - 0.5 (0.57 - 0.5)).
        np.testing.assert_allclose(np.asarray(updated.multipliers), [0.6 - 0.5 * 0.07], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(metrics["closed_form_estimates"]), [closed_form], rtol=1e-5)
        if policy_step == "pairwise":
            np.testing.assert_allclose(np.asarray(metrics["secondary_estimates_plain"]), [want], rtol=1e-5)
            assert 1.0 <= float(metrics["pool_effective_size_min"]) <= float(metrics["pool_effective_size_mean"]) <= 4
        else:
            assert np.isnan(np.asarray(metrics["secondary_estimates_plain"])).all()
            assert "pool_effective_size_mean" not in metrics


def test_candidates_jackknife_corrects_the_plain_estimate_the_multiplier_reads():
    """``jackknife=True`` under ``jit``: the plain estimate is the jackknifed policy value over each pool (NumPy, with
    an unlabelled comparison and a candidate out of its pool), the multiplier steps on it at ``eps = 0``, the
    uncorrected value is logged beside it; at ``eps > 0`` the multiplier still reads the bound of the uncorrected
    pool."""
    from test_objectives import _numpy_jackknife

    prefs, valid, policy, reference = _candidate_pool(13, (2, 1))
    labels = np.ones(prefs.shape, bool)
    labels[0, 1, 0, 3] = labels[0, 1, 3, 0] = False
    prefs = np.where(labels, prefs, np.nan).astype(np.float32)
    batch = {"candidate_preferences": prefs, "candidate_label_mask": labels, "response_valid": valid}
    log_probs = po.ResponseLogProbs(jnp.asarray(policy), jnp.asarray(reference))
    corrected = _numpy_jackknife(np.swapaxes(prefs, 0, 1).astype(np.float64), np.swapaxes(labels, 0, 1),
                                 policy.astype(np.float64) - reference, valid, np.ones(len(valid)))[0]
    for eps in (0.0, 0.15):
        config = mj.MOPOConfig(tau=0.2, eps=eps, multiplier_lr=0.5, refresh_every=None)
        results = {}
        for jackknife in (False, True):
            objective = po.MOPOCandidates(config, thresholds=(0.5,), policy_step="pairwise", jackknife=jackknife)
            state = objective.init()._replace(multipliers=jnp.asarray([0.6], jnp.float32))

            @jax.jit
            def step(state, batch):
                _, aux = objective.loss(state, batch, log_probs)
                updated = objective.update(state, batch, aux)
                return updated, objective.metrics(updated, batch, aux)

            results[jackknife] = jax.tree.map(np.asarray, step(state, batch))
        (plain_state, plain_metrics), (state, metrics) = results[False], results[True]
        uncorrected = float(plain_metrics["secondary_estimates_plain"][0])
        assert abs(corrected - uncorrected) > 1e-3
        np.testing.assert_allclose(metrics["secondary_estimates_plain"], [corrected], rtol=1e-5)
        np.testing.assert_allclose(metrics["pool_estimates_uncorrected"], [uncorrected], rtol=1e-6)
        if eps == 0:  # lambda = max(0, 0.6 - 0.5 (G - 0.5)) with G the corrected value
            np.testing.assert_allclose(state.multipliers, [max(0.0, 0.6 - 0.5 * (corrected - 0.5))], rtol=1e-5)
        else:
            np.testing.assert_allclose(state.multipliers, plain_state.multipliers, rtol=1e-6)
            np.testing.assert_allclose(metrics["secondary_estimates"], plain_metrics["secondary_estimates"], rtol=1e-6)


def test_pool_pairwise_policy_step_recovers_the_closed_form():
    """MOPO on an enumerated pool with the pairwise policy step (Eq. 8 over every pair of the pool) trains a free
    logits table to the closed form of Eq. 3 at the same multipliers (checked against NumPy)."""
    problem = problems.make_thurstone_ties(seed=2, num_prompts=3, num_candidates=4)
    tabular = make_problem(problem.pref, problem.ref, problem.mu, problem.prompt_weights)
    objective = po.MOPOCandidates(mj.MOPOConfig(tau=0.1, eps=0.0, multiplier_lr=0.0, refresh_every=None),
                                  thresholds=(0.0,), policy_step="pairwise", candidates="enumerated")
    result = run_objective(tabular, objective, _candidate_data(tabular), TrainSettings(steps=3000))
    w = exact.win_rates_numpy(problem.pref, problem.comparison_policy)
    logits = np.log(problem.ref) + w[0] / 0.1  # lambda stays 0 (no multiplier step)
    want = np.exp(logits - logits.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(result.logits, -1)), want, atol=2e-3)


def _candidate_data(tabular):
    from mopo_jax.synthetic.tabular import candidate_data

    return candidate_data(tabular)


def test_pairwise_mopo_on_the_pair_population_reaches_the_exact_front():
    """The language-model estimator end to end on a tabular problem: MOPOPairwise (the inverse-propensity pairwise
    loss and the self-normalised pairwise dual, no closed form anywhere) on the population of pairs drawn from
    mu x mu reaches the exact solver's constrained optimum at three thresholds within 1e-3."""
    problem = problems.make_bt_conflicting(seed=0, num_prompts=8, num_candidates=6)
    tabular = make_problem(problem.pref, problem.ref, problem.mu, problem.prompt_weights)
    w = exact.win_rates_numpy(problem.pref, problem.comparison_policy)
    thresholds = np.asarray(problem.threshold_grid)[[2, 5, 8]]
    config = mj.MOPOConfig(tau=problem.tau, multiplier_lr=0.1, eps=0.0, refresh_every=None)
    data = pair_data(tabular, include_ties=True)
    run = jax.jit(jax.vmap(lambda b: run_objective(tabular, po.MOPOPairwise(config, b), data, TrainSettings(6000))))
    result = run(jnp.asarray(thresholds, jnp.float32))
    for i, b in enumerate(thresholds):
        solution = exact.solve_constrained(w, problem.ref, problem.prompt_weights, problem.tau, b)
        assert solution.feasible and solution.multipliers[0] > 0.1  # binding constraints
        np.testing.assert_allclose(np.asarray(result.values[i]), solution.values, atol=1e-3)
        np.testing.assert_allclose(float(result.multipliers[i, 0]), solution.multipliers[0], atol=0.05)


# ---------------------------------------------------------------------------------------------------------------
# The user's objective through the language-model step.

MODEL = get_preset("tiny", dtype="float32", param_dtype="float32")


def _lm_batch(prompts=8, length=16):
    rng = np.random.default_rng(5)
    completion = np.zeros((prompts, 2, length), np.int32)
    completion[..., 9:] = 1
    completion[2, 0] = 0
    labels = np.ones((prompts, 2), bool)
    labels[4, 0] = False
    return {"tokens": rng.integers(0, MODEL.vocab_size, (prompts, 2, length)).astype(np.int32),
            "completion_mask": completion, "attention_mask": np.ones((prompts, 2, length), np.int32),
            "preference_probs": np.ones((prompts, 2), np.float32), "label_mask": labels}


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices; see tests/conftest.py")
def test_user_objective_trains_through_the_sharded_step_and_the_loop(tmp_path):
    from mopo_jax.training import LoopConfig, train

    params = init_params(MODEL, jax.random.PRNGKey(0))
    batch = _lm_batch()
    config = TrainConfig(objective=po.objective_class("test_slic_hinge")(beta=2.0, delta=1.0),
                         optimizer=OptimizerConfig(learning_rate=1e-2, max_grad_norm=None))
    results = {}
    for name, mesh_config, devices in (("single", sharding.MeshConfig(fsdp=1), 1),
                                       ("fsdp2_tensor2", sharding.MeshConfig(fsdp=2, tensor=2), 4)):
        mesh = sharding.make_mesh(mesh_config, jax.devices()[:devices])
        optimizer = make_optimizer(config.optimizer)
        state = init_train_state(MODEL, config, params, optimizer, jax.random.PRNGKey(1))
        step, shardings = compile_train_step(MODEL, config, optimizer, mesh, jax.eval_shape(lambda: state), batch)
        state = jax.device_put(state, shardings)
        history = []
        for _ in range(3):
            state, metrics = step(state, sharding.global_batch(batch, mesh))
            history.append(jax.tree.map(np.asarray, metrics))
        results[name] = history
    single, sharded = results["single"], results["fsdp2_tensor2"]
    # Step 0: policy == reference, h = 0: the hinge is delta on each of the 6 kept pairs (row 2 has an empty
    # completion, row 4 no label).
    assert single[0]["loss"] == pytest.approx(1.0) and single[0]["loss_denominator"] == 6
    assert single[-1]["loss"] < single[0]["loss"] and single[-1]["hinge_steps"] == 3
    for a, b in zip(single, sharded):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-5)

    # The resumable loop, with its checkpointed objective state.
    from mopo_jax.training import CheckpointConfig

    def batch_at(position, state):
        return batch, {"index": position.get("index", 0) + 1}

    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2, tensor=2), jax.devices()[:4])
    checkpoints = CheckpointConfig(str(tmp_path / "ckpt"), save_every=2)
    train(MODEL, config, params, batch_at, mesh, LoopConfig(2, checkpoints))
    state, history = train(MODEL, config, params, batch_at, mesh, LoopConfig(3, checkpoints))
    assert [h["step"] for h in history] == [3] and int(state.objective_state["steps"]) == 3
    np.testing.assert_allclose(history[0]["loss"], single[2]["loss"], rtol=1e-5)


def test_the_public_api_names_misuse_at_the_boundary():
    """What a composing user gets wrong is named where it happens, not a KeyError, a TypeError or a silent number."""
    log_probs, _, _ = _log_probs(0)
    batch = _pair_batch()
    # A single threshold given as a number is one constraint.
    assert po.MOPOPairwise(mj.MOPOConfig(), thresholds=0.5).thresholds == (0.5,)
    # Three objectives' labels for one threshold.
    objective = po.MOPOPairwise(mj.MOPOConfig(), thresholds=(0.5,))
    three = {**batch, "preference_probs": np.full((10, 3), 0.5, np.float32), "label_mask": np.ones((10, 3), bool)}
    with pytest.raises(ValueError, match="3 objectives' labels for 1 threshold"):
        objective.check_batch(three)
    # The trainer's response_valid left out of a user's batch.
    dpo = po.DPO(beta=0.1)
    without = {k: v for k, v in batch.items() if k != "response_valid"}
    with pytest.raises(ValueError, match="no 'response_valid'"):
        dpo.loss((), without, log_probs)
    # No reference log-probabilities for an objective that reads them.
    with pytest.raises(ValueError, match="ResponseLogProbs.reference is None"):
        dpo.loss((), batch, log_probs._replace(reference=None))
    # A probability outside [0, 1] for the estimator; raw P where the loss takes margins P - 1/2.
    with pytest.raises(ValueError, match="preference_probs: value 1.7"):
        mj.pairwise_objective_values(np.zeros((2, 2), np.float32), np.array([[1.7, 0.5], [0.5, 0.5]], np.float32))
    h = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=r"win_rate_margins must be win-rate margins in \[-1/2, 1/2\]"):
        mj.mopo_pairwise_loss(h, h, h, h, np.full((4, 2), 0.9, np.float32), np.zeros(1, np.float32), 0.1)
