"""The LM train step against independent NumPy computations: log-probs from the model's logits, the objectives'
estimators (masked rows, missing labels, multipliers away from 0) over two steps, and the reference modes."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mopo_jax.models import forward, get_preset, init_params
from mopo_jax.policy_objectives import DPO, MOPOCandidates, MOPOPairwise
from mopo_jax.state import MOPOConfig
from mopo_jax.training import TrainableConfig, reference_params, sharding
from mopo_jax.training.logprobs import sequence_log_probs
from mopo_jax.training.train_step import (
    OptimizerConfig,
    TrainConfig,
    compile_train_step,
    init_train_state,
    make_optimizer,
)

MODEL = get_preset("tiny")
PROMPTS, LENGTH, OBJECTIVES = 4, 16, 2


@pytest.fixture(scope="module")
def params():
    return init_params(MODEL, jax.random.PRNGKey(0))


def _pair_batch(seed=0, empty_row=True):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, MODEL.vocab_size, (PROMPTS, 2, LENGTH)).astype(np.int32)
    completion = np.zeros((PROMPTS, 2, LENGTH), np.int32)
    completion[..., 9:] = 1
    attention = np.ones((PROMPTS, 2, LENGTH), np.int32)
    attention[0, :, :3] = 0  # left padding on one prompt
    if empty_row:
        completion[1, 1] = 0
    return {
        "tokens": tokens,
        "completion_mask": completion,
        "attention_mask": attention,
        "preference_probs": np.ones((PROMPTS, OBJECTIVES), np.float32),
        "label_mask": np.array([[1, 0], [0, 1], [1, 0], [1, 1]], bool),
    }


def _direct_log_probs(params, tokens, completion, attention):
    """log-softmax of forward()'s logits in float64 NumPy, summed over completion tokens."""
    logits = np.asarray(forward(MODEL, params, jnp.asarray(tokens), mask=jnp.asarray(attention)), np.float64)
    logits = logits - logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = np.take_along_axis(log_probs[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    scored = (completion[:, 1:] > 0) & (attention[:, 1:] > 0)
    return np.where(scored, targets, 0.0).sum(-1), scored.any(-1)


def test_sequence_log_probs_match_direct_computation_and_chunking(params):
    batch = _pair_batch()
    flat = {k: batch[k].reshape(PROMPTS * 2, LENGTH) for k in ("tokens", "completion_mask", "attention_mask")}
    want, want_valid = _direct_log_probs(params, flat["tokens"], flat["completion_mask"], flat["attention_mask"])
    for chunk, start in ((None, 0), (64, 0), (None, 9)):  # completions start at column 9 in this batch
        got = sequence_log_probs(MODEL, params, flat["tokens"], flat["completion_mask"], flat["attention_mask"], chunk,
                                 completion_start=start)
        np.testing.assert_allclose(np.asarray(got.log_probs), want, atol=2e-4)
        np.testing.assert_array_equal(np.asarray(got.valid), want_valid)
    assert not want_valid[3] and float(got.log_probs[3]) == 0.0


def _run(config, params, batch, steps=1, mesh=None, multipliers=None, model=MODEL):
    """``steps`` compiled steps from the initial state (optionally with MOPO's multipliers set); returns the final
    state, the metrics of every step and the policy's parameters before every step."""
    optimizer = make_optimizer(config.optimizer)
    state = init_train_state(model, config, params, optimizer, jax.random.PRNGKey(1))
    if multipliers is not None:
        state = state._replace(objective_state=state.objective_state._replace(
            multipliers=jnp.asarray(multipliers, jnp.float32)))
    mesh = mesh or sharding.make_mesh(sharding.MeshConfig(fsdp=1), jax.devices()[:1])
    step, shardings = compile_train_step(model, config, optimizer, mesh, jax.eval_shape(lambda: state), batch)
    state = jax.device_put(state, shardings)  # placed once, so the first call's trace is the steady-state one
    history, before = [], []
    for _ in range(steps):
        before.append(jax.tree.map(np.asarray, jax.device_get(state.params)))
        state, metrics = step(state, batch)
        history.append(jax.tree.map(np.asarray, metrics))
    return state, history, before


def _pair_log_probs(params, batch):
    flat = {k: batch[k].reshape(PROMPTS * 2, LENGTH) for k in ("tokens", "completion_mask", "attention_mask")}
    logps, valid = _direct_log_probs(params, flat["tokens"], flat["completion_mask"], flat["attention_mask"])
    return logps.reshape(PROMPTS, 2), valid.reshape(PROMPTS, 2)


def test_first_dpo_step_equals_numpy_and_drops_empty_and_unlabelled_rows(params):
    batch = _pair_batch()
    batch["preference_probs"] = np.array([[0.9, 1], [1, 0.2], [0.7, 1], [0.3, 0.6]], np.float32)
    config = TrainConfig(objective=DPO(beta=0.1), optimizer=OptimizerConfig(learning_rate=1e-3))
    _, history, _ = _run(config, params, batch)
    # Policy == reference at step 0: h = 0 on every row, the loss is log 2 whatever the label.
    logps, valid = _pair_log_probs(params, batch)
    keep = valid[:, 0] & valid[:, 1] & batch["label_mask"][:, 0]
    assert keep.tolist() == [True, False, True, True]
    np.testing.assert_allclose(history[0]["loss"], np.log(2.0), rtol=1e-6)
    assert history[0]["loss_denominator"] == 3 and history[0]["dropped_rows"] == 1


def _numpy_mopo_pairwise(logps, ref_logps, valid, probs, labels, multipliers, tau):
    """The pairwise estimator of docs/algorithm.md written out in NumPy: the loss (missing labels left out, each
    objective renormalised by its label rate) and the self-normalised value estimate of every objective."""
    kept = valid[:, 0] & valid[:, 1] & labels.any(1)
    rates = labels[kept].mean(0)
    c = np.concatenate([[1.0], multipliers])
    m = np.where(labels, probs - 0.5, 0.0)
    target = (m / np.where(rates > 0, rates, 1.0) * (rates > 0)) @ c / tau
    log_ratio = logps - ref_logps
    h = log_ratio[:, 0] - log_ratio[:, 1]
    loss = np.mean(tau**2 / 2 * (h[kept] - target[kept]) ** 2)  # Eq. 8 in win-rate units
    values = []
    for k in range(labels.shape[1]):
        rows = kept & labels[:, k]
        rho = np.exp(log_ratio[rows] - log_ratio[rows].max())
        values.append(0.5 + np.sum((rho[:, 0] - rho[:, 1]) * (probs[rows, k] - 0.5)) / np.sum(rho))
    return loss, np.array(values)


def test_mopo_pairwise_step_matches_numpy_estimator(params):
    """Loss and dual estimate of two steps against NumPy on a batch with an empty completion (row 1: its margin is not
    0 after a step, so it would bias the estimate if it were counted), disjoint labels (rows 0 and 2 primary only,
    row 1 secondary only), soft labels, and lambda = 0.7."""
    batch = _pair_batch()
    batch["preference_probs"] = np.array([[0.9, 1], [1, 0.2], [0.7, 1], [0.35, 0.8]], np.float32)
    mopo = MOPOConfig(tau=0.1, multiplier_lr=0.5, eps=0.0, refresh_every=None)
    config = TrainConfig(objective=MOPOPairwise(mopo, thresholds=(0.6,)), optimizer=OptimizerConfig(learning_rate=3e-2))
    state, history, before = _run(config, params, batch, steps=2, multipliers=[0.7])
    probs, labels = batch["preference_probs"].astype(np.float64), batch["label_mask"]
    multipliers = 0.7
    for step in range(2):
        logps, valid = _pair_log_probs(before[step], batch)
        ref_logps, _ = _pair_log_probs(params, batch)
        loss, values = _numpy_mopo_pairwise(logps, ref_logps, valid, probs, labels, np.array([multipliers]), 0.1)
        np.testing.assert_allclose(history[step]["loss"], loss, rtol=2e-4)
        np.testing.assert_allclose(history[step]["secondary_estimates"], values[1:], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(history[step]["secondary_estimates_plain"], values[1:], rtol=1e-4, atol=1e-5)
        multipliers = max(0.0, multipliers - 0.5 * (values[1] - 0.6))
        np.testing.assert_allclose(history[step]["multipliers"], [multipliers], rtol=1e-4, atol=1e-6)
    assert abs(values[1] - 0.5) > 1e-3  # the second step's estimate is not the reference's 1/2
    dropped = _pair_log_probs(before[1], batch)[0] - _pair_log_probs(params, batch)[0]
    assert abs(dropped[1, 0] - dropped[1, 1]) > 1e-3  # the dropped row's margin is not 0 (so it would matter)


def test_precomputed_reference_matches_live(params):
    batch = _pair_batch()
    flat = {k: batch[k].reshape(PROMPTS * 2, LENGTH) for k in ("tokens", "completion_mask", "attention_mask")}
    logps = sequence_log_probs(MODEL, params, flat["tokens"], flat["completion_mask"], flat["attention_mask"])
    live_config = TrainConfig(objective=DPO(), optimizer=OptimizerConfig(learning_rate=1e-3))
    pre_config = dataclasses.replace(live_config, reference="precomputed")
    precomputed = {**batch, "ref_log_probs": np.asarray(logps.log_probs).reshape(PROMPTS, 2)}
    _, live, _ = _run(live_config, params, batch, steps=3)
    _, pre, _ = _run(pre_config, params, precomputed, steps=3)
    for a, b in zip(live, pre):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)


def same_tree(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_lagged_reference_refreshes_every_period(params):
    """The reference lags the policy by one period, while the pairwise dual keeps measuring the policy against the
    initial reference (the distribution the pairs came from): the logged estimate of every step, refreshed or not,
    equals NumPy's with rho = pi / pi_initial."""
    batch = _pair_batch(empty_row=False)
    batch["preference_probs"] = np.array([[0.9, 1], [1, 0.2], [0.7, 1], [0.35, 0.8]], np.float32)
    config = TrainConfig(objective=MOPOPairwise(MOPOConfig(tau=0.1, refresh_every=2)),
                         optimizer=OptimizerConfig(learning_rate=1e-2))
    optimizer = make_optimizer(config.optimizer)
    state = init_train_state(MODEL, config, params, optimizer, jax.random.PRNGKey(1))
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=1), jax.devices()[:1])
    step, shardings = compile_train_step(MODEL, config, optimizer, mesh, jax.eval_shape(lambda: state), batch)
    state = jax.device_put(state, shardings)
    policies = [jax.tree.map(np.asarray, state.params)]
    references, history = [], []
    for _ in range(6):
        state, metrics = step(state, batch)
        policies.append(jax.tree.map(np.asarray, state.params))
        references.append(jax.tree.map(np.asarray, state.reference))
        history.append(jax.tree.map(np.asarray, metrics))
    probs, labels = batch["preference_probs"].astype(np.float64), batch["label_mask"]
    initial, _ = _pair_log_probs(params, batch)
    for t in range(6):
        logps, valid = _pair_log_probs(policies[t], batch)
        _, values = _numpy_mopo_pairwise(logps, initial, valid, probs, labels, np.zeros(1), 0.1)
        np.testing.assert_allclose(history[t]["secondary_estimates_plain"], values[1:], rtol=1e-4, atol=1e-5)
    assert same_tree(state.initial_reference, policies[0])
    same = same_tree
    # Refreshes at steps 2, 4, 6: the reference becomes the snapshot taken at the previous refresh (the initial
    # policy at step 2), so right after step 2k it is the policy of step 2k - 2.
    expected = [0, 0, 0, 2, 2, 4]
    for got, index in zip(references, expected):
        assert same(got, policies[index])
    assert not same(references[5], policies[5])


def test_lora_trains_adapters_only_and_starts_at_base(params):
    batch = _pair_batch()
    config = TrainConfig(objective=DPO(), trainable=TrainableConfig(lora_rank=4),
                         optimizer=OptimizerConfig(learning_rate=1e-2))
    state, history, _ = _run(config, params, batch, steps=3)
    assert set(state.params) == {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
    base = jax.tree.map(np.asarray, state.base)
    for original, kept in zip(jax.tree.leaves(params), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(original), kept)
    # The reference is the base: the adapters it holds are the initial ones, whose B factor is zero.
    merged_reference = reference_params(config.trainable, state)
    for original, ref in zip(jax.tree.leaves(params), jax.tree.leaves(merged_reference)):
        np.testing.assert_allclose(np.asarray(original), np.asarray(ref), atol=0)
    assert history[-1]["reward_margin"] > history[0]["reward_margin"]


def test_candidate_step_uses_leave_one_out_closed_form_and_no_reference_pass(params, monkeypatch):
    """MOPO on sampled candidates: win rates are leave-one-out means over the other samples, the weights the closed
    form at lambda = 0.4 over the valid candidates, the dual estimate (``batch_estimate="closed_form"``) its value
    (NumPy throughout); a candidate with an empty completion is left out of the pool; the step runs the policy
    forward only (neither the weighted-BC loss nor the closed form's estimate reads the reference)."""
    import importlib

    train_step_module = importlib.import_module("mopo_jax.training.train_step")

    rng = np.random.default_rng(3)
    candidates = 3
    tokens = rng.integers(0, MODEL.vocab_size, (PROMPTS, candidates, LENGTH)).astype(np.int32)
    completion = np.zeros_like(tokens)
    completion[..., 8:] = 1
    completion[2, 1] = 0  # prompt 2 has two valid candidates
    prefs = rng.uniform(size=(PROMPTS, OBJECTIVES, candidates, candidates)).astype(np.float32)
    prefs = np.triu(prefs, 1) + np.tril(1 - np.swapaxes(np.triu(prefs, 1), -1, -2), -1)
    prefs[..., np.arange(candidates), np.arange(candidates)] = 0.5
    batch = {"tokens": tokens, "completion_mask": completion, "attention_mask": np.ones_like(tokens),
             "candidate_preferences": prefs, "candidate_label_mask": np.ones(prefs.shape, bool)}
    objective = MOPOCandidates(MOPOConfig(tau=0.2, eps=0.0, refresh_every=None), thresholds=(0.5,),
                               batch_estimate="closed_form")
    config = TrainConfig(objective=objective, optimizer=OptimizerConfig(learning_rate=1e-3))

    calls = []
    original = train_step_module.sequence_log_probs
    monkeypatch.setattr(train_step_module, "sequence_log_probs",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    _, history, _ = _run(config, params, batch, multipliers=[0.4])
    assert len(calls) == 1  # traced once, for the policy

    flat = {k: batch[k].reshape(-1, LENGTH) for k in ("tokens", "completion_mask", "attention_mask")}
    logps, valid = _direct_log_probs(params, flat["tokens"], flat["completion_mask"], flat["attention_mask"])
    logps, valid = logps.reshape(PROMPTS, candidates), valid.reshape(PROMPTS, candidates)
    loss, secondary = 0.0, 0.0
    for x in range(PROMPTS):
        pool = np.flatnonzero(valid[x])
        w = np.array([[np.mean([prefs[x, k, i, j] for j in pool if j != i]) for i in pool] for k in range(2)])
        g = (w[0] + 0.4 * w[1]) / 0.2
        weights = np.exp(g - g.max()) / np.exp(g - g.max()).sum()
        loss -= np.sum(weights * logps[x, pool]) / PROMPTS
        secondary += np.sum(weights * w[1]) / PROMPTS
    np.testing.assert_allclose(history[0]["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(history[0]["secondary_estimates"][0], secondary, rtol=1e-5)
    np.testing.assert_allclose(history[0]["secondary_estimates_plain"][0], secondary, rtol=1e-5)
    np.testing.assert_allclose(history[0]["multipliers"][0], max(0.0, 0.4 - 0.5 * (secondary - 0.5)), rtol=1e-5)


def _candidate_batch(seed, candidates):
    """Sampled candidates for :class:`MOPOCandidates`: one empty completion (out of the pool) and one pair of
    candidates without a harmlessness label (both orders)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, MODEL.vocab_size, (PROMPTS, candidates, LENGTH)).astype(np.int32)
    completion = np.zeros_like(tokens)
    completion[..., 8:] = 1
    completion[2, 1] = 0
    prefs = rng.uniform(size=(PROMPTS, OBJECTIVES, candidates, candidates)).astype(np.float32)
    prefs = np.triu(prefs, 1) + np.tril(1 - np.swapaxes(np.triu(prefs, 1), -1, -2), -1)
    labels = np.ones(prefs.shape, bool)
    labels[0, 1, 0, 2] = labels[0, 1, 2, 0] = False
    return {"tokens": tokens, "completion_mask": completion, "attention_mask": np.ones_like(tokens),
            "candidate_preferences": prefs, "candidate_label_mask": labels}


def _numpy_leave_one_out_win_rates(prefs, labels, pool):
    """``w_k(y_i) = mean over the labelled j != i in the pool of P_k(y_i > y_j)``, ``[K, len(pool)]``."""
    return np.array([[np.mean([prefs[k, i, j] for j in pool if j != i and labels[k, i, j]]) for i in pool]
                     for k in range(prefs.shape[0])])


def test_candidate_batch_dual_reads_the_trained_policy_not_the_closed_form(params):
    """Algorithm 1's batch dual (``batch_estimate="policy"``, the default) reads the policy being trained: at every
    step ``G`` is the pool's leave-one-out win rates weighted by ``pi/pi_ref`` of the policy before the step,
    self-normalised per prompt (NumPy from the model's logits, with the reference the initial parameters), while
    ``closed_form_estimates`` logs the closed form's value at the same multipliers. Two policy steps (weighted BC,
    pairwise over the pool) from the same start move the policy differently, so their duals must read differently:
    a dual that read the closed form (what the step aims at) would log the same multipliers for both."""
    candidates, tau, steps = 3, 0.2, 3
    batch = _candidate_batch(5, candidates)
    flat = {k: batch[k].reshape(-1, LENGTH) for k in ("tokens", "completion_mask", "attention_mask")}
    reference, valid = _direct_log_probs(params, flat["tokens"], flat["completion_mask"], flat["attention_mask"])
    reference, valid = reference.reshape(PROMPTS, candidates), valid.reshape(PROMPTS, candidates)
    pools = [np.flatnonzero(valid[x]) for x in range(PROMPTS)]
    assert [len(p) for p in pools] == [3, 3, 2, 3]
    rates = [_numpy_leave_one_out_win_rates(batch["candidate_preferences"][x], batch["candidate_label_mask"][x],
                                            pools[x]) for x in range(PROMPTS)]

    multipliers_by_step = {}
    for policy_step in ("weighted_bc", "pairwise"):
        objective = MOPOCandidates(MOPOConfig(tau=tau, eps=0.0, multiplier_lr=2.0, refresh_every=None),
                                   thresholds=(0.55,), policy_step=policy_step)
        config = TrainConfig(objective=objective, optimizer=OptimizerConfig(learning_rate=3e-2))
        _, history, before = _run(config, params, batch, steps=steps, multipliers=[0.4])
        multiplier = 0.4
        for t in range(steps):
            logps, _ = _direct_log_probs(before[t], flat["tokens"], flat["completion_mask"], flat["attention_mask"])
            logps = logps.reshape(PROMPTS, candidates)
            policy_value, closed_form_value, effective_sizes = 0.0, 0.0, []
            for x, pool in enumerate(pools):
                ratio = logps[x, pool] - reference[x, pool]
                weights = np.exp(ratio - ratio.max()) / np.exp(ratio - ratio.max()).sum()
                effective_sizes.append(1.0 / np.sum(weights ** 2))
                policy_value += np.sum(weights * rates[x][1]) / PROMPTS
                g = (rates[x][0] + multiplier * rates[x][1]) / tau
                target = np.exp(g - g.max()) / np.exp(g - g.max()).sum()
                closed_form_value += np.sum(target * rates[x][1]) / PROMPTS
            np.testing.assert_allclose(history[t]["secondary_estimates_plain"][0], policy_value, atol=2e-4)
            np.testing.assert_allclose(history[t]["secondary_estimates"][0], policy_value, atol=2e-4)
            np.testing.assert_allclose(history[t]["closed_form_estimates"][0], closed_form_value, atol=2e-5)
            np.testing.assert_allclose(history[t]["pool_effective_size_mean"], np.mean(effective_sizes), rtol=1e-4)
            np.testing.assert_allclose(history[t]["pool_effective_size_min"], np.min(effective_sizes), rtol=1e-4)
            multiplier = max(0.0, multiplier - 2.0 * (policy_value - 0.55))
            np.testing.assert_allclose(history[t]["multipliers"][0], multiplier, atol=5e-4)
        # Step 0 reads the reference itself (the pool's plain mean), so only later steps can tell the policies apart.
        assert abs(history[0]["secondary_estimates"][0] - history[0]["closed_form_estimates"][0]) > 1e-2
        multipliers_by_step[policy_step] = [h["multipliers"][0] for h in history]
    assert abs(multipliers_by_step["weighted_bc"][-1] - multipliers_by_step["pairwise"][-1]) > 1e-3


def test_upper_layers_on_cached_activations_match_full_model_and_freeze_embedding(params):
    from mopo_jax.models import residual_stream, split_layers

    batch = _pair_batch(empty_row=False)
    config = TrainConfig(objective=DPO(), optimizer=OptimizerConfig(learning_rate=1e-2),
                         trainable=TrainableConfig(frozen=("embed",)))
    lower_config, lower, upper_config, upper = split_layers(MODEL, params, 1)
    flat_tokens = batch["tokens"].reshape(-1, LENGTH)
    flat_mask = batch["attention_mask"].reshape(-1, LENGTH)
    cached = np.asarray(residual_stream(lower_config, lower, jnp.asarray(flat_tokens), mask=jnp.asarray(flat_mask)))
    cached_batch = {**batch, "inputs_hidden": cached.reshape(PROMPTS, 2, LENGTH, -1)}

    optimizer = make_optimizer(config.optimizer)
    state = init_train_state(upper_config, config, upper, optimizer, jax.random.PRNGKey(1))
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=1), jax.devices()[:1])
    step, shardings = compile_train_step(upper_config, config, optimizer, mesh, jax.eval_shape(lambda: state),
                                         cached_batch)
    state = jax.device_put(state, shardings)
    history = []
    for _ in range(2):
        state, metrics = step(state, cached_batch)
        history.append(float(metrics["loss"]))
    # At step 0 the upper model on cached activations is the full model: the same loss as the core computation.
    np.testing.assert_allclose(history[0], np.log(2.0), rtol=1e-6)
    assert "embed" not in state.params  # frozen: held in state.base, no gradient or optimizer state
    np.testing.assert_array_equal(np.asarray(state.base["embed"]), np.asarray(upper["embed"]))
    assert not np.allclose(np.asarray(state.params["layers"]["wq"]), np.asarray(upper["layers"]["wq"]))
    assert np.isfinite(float(metrics["loss"]))


def test_an_estimate_without_data_is_logged_as_null_and_moves_nothing(params, tmp_path):
    """Step 1's batch carries no harmlessness label: the dual has nothing to read, so the log says null (not 0, not
    the threshold), the multiplier stays where it was and the run goes on; step 2's batch has the labels and the
    multiplier steps on that step's estimate, lambda = max(0, 0 - 0.5 (G - 0.6))."""
    from mopo_jax.training import LoopConfig, train

    without = _pair_batch()
    without["label_mask"] = np.array([[1, 0], [1, 0], [1, 0], [1, 0]], bool)
    labelled = _pair_batch()
    labelled["preference_probs"] = np.array([[0.9, 1], [1, 0.2], [0.7, 1], [0.35, 0.8]], np.float32)
    config = TrainConfig(objective=MOPOPairwise(MOPOConfig(tau=0.1, multiplier_lr=0.5), thresholds=(0.6,)),
                         optimizer=OptimizerConfig(learning_rate=3e-2))

    def batch_at(position, state):
        index = position.get("index", 0)
        return (without, labelled)[index], {"index": index + 1}

    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=1), jax.devices()[:1])
    metrics_path = tmp_path / "metrics.jsonl"
    train(MODEL, config, params, batch_at, mesh, LoopConfig(2, metrics_path=str(metrics_path)))
    first, second = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    assert first["secondary_estimates"] == [None] and first["secondary_estimates_plain"] == [None]
    assert first["multipliers"] == [0.0]
    (estimate,) = second["secondary_estimates"]
    assert isinstance(estimate, float) and 0.0 < estimate < 1.0 and estimate != 0.5
    assert second["secondary_estimates_plain"] == [estimate]
    np.testing.assert_allclose(second["multipliers"], [max(0.0, -0.5 * (estimate - 0.6))], rtol=1e-5, atol=1e-7)
    # An infinity in such a metric is still a failure, and a NaN anywhere else still stops the run.
    from mopo_jax.training.loop import _non_finite

    no_data = config.objective.no_data_metrics
    assert _non_finite({"secondary_estimates": np.array([np.inf])}, no_data) == ["secondary_estimates"]
    assert _non_finite({"multipliers": np.array([np.nan])}, no_data) == ["multipliers"]
