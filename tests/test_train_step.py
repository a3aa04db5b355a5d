"""The LM train step: log-probs against a direct computation, losses against the core functions, reference modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mopo_jax as mj
from mopo_jax.models import forward, get_preset, init_params
from mopo_jax.state import MOPOConfig
from mopo_jax.training import sharding
from mopo_jax.training.logprobs import sequence_log_probs
from mopo_jax.training.train_step import (
    TrainConfig,
    compile_train_step,
    init_train_state,
    make_optimizer,
    merge_lora,
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


def _run(config, params, batch, steps=1, mesh=None):
    optimizer = make_optimizer(config)
    state = init_train_state(MODEL, config, params, optimizer, jax.random.PRNGKey(1))
    mesh = mesh or sharding.make_mesh(sharding.MeshConfig(fsdp=1), jax.devices()[:1])
    step, shardings = compile_train_step(MODEL, config, optimizer, mesh, jax.eval_shape(lambda: state), batch)
    state = jax.device_put(state, shardings)  # placed once, so the first call's trace is the steady-state one
    history = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        history.append(jax.tree.map(np.asarray, metrics))
    return state, history


def _core_pair_loss(params, batch, loss):
    """The step's first loss from the core loss functions and the direct log-probs."""
    flat = {k: batch[k].reshape(PROMPTS * 2, LENGTH) for k in ("tokens", "completion_mask", "attention_mask")}
    logps, valid = _direct_log_probs(params, flat["tokens"], flat["completion_mask"], flat["attention_mask"])
    logps, valid = logps.reshape(PROMPTS, 2), valid.reshape(PROMPTS, 2)
    pair_valid = valid[:, 0] & valid[:, 1]
    args = (logps[:, 0], logps[:, 1], logps[:, 0], logps[:, 1])  # policy == reference at step 0
    labels = batch["label_mask"]
    if loss == "dpo":
        return mj.dpo_loss(*args, 0.1, valid_mask=pair_valid & labels[:, 0]).mean()
    margins = mj.pairwise_win_rate_margins(batch["preference_probs"], labels)
    return mj.mopo_pairwise_loss(*args, margins, jnp.zeros(1), 0.1, valid_mask=pair_valid & labels.any(-1)).mean()


@pytest.mark.parametrize("loss", ["dpo", "mopo_pairwise"])
def test_first_step_loss_equals_core_loss_and_drops_empty_rows(params, loss):
    batch = _pair_batch()
    config = TrainConfig(loss=loss, beta=0.1, mopo=MOPOConfig(tau=0.1, refresh_every=None), learning_rate=1e-3)
    _, history = _run(config, params, batch)
    np.testing.assert_allclose(history[0]["loss"], float(_core_pair_loss(params, batch, loss)), rtol=1e-5)
    assert history[0]["dropped_rows"] == 1 and np.isfinite(history[0]["grad_norm"])


def test_precomputed_reference_matches_live(params):
    batch = _pair_batch()
    flat = {k: batch[k].reshape(PROMPTS * 2, LENGTH) for k in ("tokens", "completion_mask", "attention_mask")}
    logps = sequence_log_probs(MODEL, params, flat["tokens"], flat["completion_mask"], flat["attention_mask"])
    live_config = TrainConfig(loss="dpo", learning_rate=1e-3)
    pre_config = TrainConfig(loss="dpo", learning_rate=1e-3, reference="precomputed")
    precomputed = {**batch, "ref_log_probs": np.asarray(logps.log_probs).reshape(PROMPTS, 2)}
    _, live = _run(live_config, params, batch, steps=3)
    _, pre = _run(pre_config, params, precomputed, steps=3)
    for a, b in zip(live, pre):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)


def test_lagged_reference_refreshes_every_period(params):
    batch = _pair_batch(empty_row=False)
    config = TrainConfig(loss="mopo_pairwise", mopo=MOPOConfig(tau=0.1, refresh_every=2), learning_rate=1e-2)
    optimizer = make_optimizer(config)
    state = init_train_state(MODEL, config, params, optimizer, jax.random.PRNGKey(1))
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=1), jax.devices()[:1])
    step, shardings = compile_train_step(MODEL, config, optimizer, mesh, jax.eval_shape(lambda: state), batch)
    state = jax.device_put(state, shardings)
    policies = [jax.tree.map(np.asarray, state.params)]
    references = []
    for _ in range(6):
        state, _ = step(state, batch)
        policies.append(jax.tree.map(np.asarray, state.params))
        references.append(jax.tree.map(np.asarray, state.reference))
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # noqa
    # Refreshes at steps 2, 4, 6: the reference becomes the snapshot taken at the previous refresh (the initial
    # policy at step 2), so right after step 2k it is the policy of step 2k - 2.
    expected = [0, 0, 0, 2, 2, 4]
    for got, index in zip(references, expected):
        assert same(got, policies[index])
    assert not same(references[5], policies[5])


def test_lora_trains_adapters_only_and_starts_at_base(params):
    batch = _pair_batch()
    config = TrainConfig(loss="dpo", lora_rank=4, learning_rate=1e-2)
    state, history = _run(config, params, batch, steps=3)
    assert set(state.params) == {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
    base = jax.tree.map(np.asarray, state.base)
    for original, kept in zip(jax.tree.leaves(params), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(original), kept)
    # The reference is the base: the adapters it holds are the initial ones, whose B factor is zero.
    merged_reference = merge_lora(config, state.base, state.reference)
    for original, ref in zip(jax.tree.leaves(params), jax.tree.leaves(merged_reference)):
        np.testing.assert_allclose(np.asarray(original), np.asarray(ref), atol=0)
    assert history[-1]["reward_margin"] > history[0]["reward_margin"]


def test_weighted_bc_step_uses_closed_form_weights(params):
    rng = np.random.default_rng(3)
    candidates = 3
    tokens = rng.integers(0, MODEL.vocab_size, (PROMPTS, candidates, LENGTH)).astype(np.int32)
    completion = np.zeros_like(tokens)
    completion[..., 8:] = 1
    prefs = rng.uniform(size=(PROMPTS, OBJECTIVES, candidates, candidates)).astype(np.float32)
    prefs = np.triu(prefs, 1) + np.tril(1 - np.swapaxes(np.triu(prefs, 1), -1, -2), -1)
    prefs[..., np.arange(candidates), np.arange(candidates)] = 0.5
    batch = {"tokens": tokens, "completion_mask": completion, "attention_mask": np.ones_like(tokens),
             "candidate_preferences": prefs, "candidate_label_mask": np.ones(prefs.shape, bool)}
    config = TrainConfig(loss="mopo_weighted_bc", mopo=MOPOConfig(tau=0.2, refresh_every=None), learning_rate=1e-3)
    _, history = _run(config, params, batch)
    # Independent recomputation: uniform mu over the sampled candidates, closed form with lambda = 0.
    w = mj.win_rates(np.moveaxis(prefs, 1, 0), np.full((PROMPTS, candidates), 1 / candidates))
    log_weights = mj.closed_form_log_weights(w, jnp.zeros(1), 0.2)
    flat = {k: batch[k].reshape(-1, LENGTH) for k in ("tokens", "completion_mask", "attention_mask")}
    logps, _ = _direct_log_probs(params, flat["tokens"], flat["completion_mask"], flat["attention_mask"])
    want = -np.mean(np.sum(np.exp(np.asarray(log_weights)) * logps.reshape(PROMPTS, candidates), -1))
    np.testing.assert_allclose(history[0]["loss"], want, rtol=1e-5)
    expected_g = float(mj.secondary_values(log_weights, w)[0])
    np.testing.assert_allclose(history[0]["secondary_estimates"][0], expected_g, rtol=1e-5)


def test_upper_layers_on_cached_activations_match_full_model_and_freeze_embedding(params):
    from mopo_jax.models import residual_stream, split_layers

    batch = _pair_batch(empty_row=False)
    config = TrainConfig(loss="dpo", learning_rate=1e-2, frozen_params=("embed",))
    lower_config, lower, upper_config, upper = split_layers(MODEL, params, 1)
    flat_tokens = batch["tokens"].reshape(-1, LENGTH)
    flat_mask = batch["attention_mask"].reshape(-1, LENGTH)
    cached = np.asarray(residual_stream(lower_config, lower, jnp.asarray(flat_tokens), mask=jnp.asarray(flat_mask)))
    cached_batch = {**batch, "inputs_hidden": cached.reshape(PROMPTS, 2, LENGTH, -1)}

    optimizer = make_optimizer(config)
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
    np.testing.assert_allclose(history[0], float(_core_pair_loss(params, batch, "dpo")), rtol=1e-5)
    assert "embed" not in state.params  # frozen: held in state.base, no gradient or optimizer state
    np.testing.assert_array_equal(np.asarray(state.base["embed"]), np.asarray(upper["embed"]))
    assert not np.allclose(np.asarray(state.params["layers"]["wq"]), np.asarray(upper["layers"]["wq"]))
    assert np.isfinite(float(metrics["loss"]))
