"""Policy evaluation (implicit accuracy, generation, KL, judge win rates) and Pareto analysis on tiny random models."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mopo_jax.evaluation.pareto import (
    collect_run_results,
    compare,
    dominance_table,
    dominates,
    markdown_table,
    pareto_front,
    pareto_plot,
    write_pareto,
)
from mopo_jax.evaluation.policy_eval import (
    batched_continuation_log_probs,
    EvalSettings,
    evaluate_policy,
    generate_responses,
    implicit_preference_accuracy,
    judge_win_rates,
    make_feature_fn,
    pair_log_probs,
    response_rows,
    sequence_kl,
    sequence_kl_terms,
)
from mopo_jax.evaluation.preference_models import BradleyTerryModel
from mopo_jax.models import forward, generate, get_preset, init_params, join_layers, residual_stream, split_layers

P, R = 6, 5
CONFIG = get_preset("tiny")


@pytest.fixture(scope="module")
def models():
    reference = init_params(CONFIG, jax.random.PRNGKey(0))
    # A sharper, different policy (larger init) so its KL from the reference is clearly positive.
    policy = init_params(CONFIG.replace(init_std=0.3), jax.random.PRNGKey(1))
    return reference, policy


def _pairs(seed=0, num_pairs=7):
    """Synthetic ``format_and_tokenize`` arrays: varied prompt / response lengths, both objectives labeled."""
    rng = np.random.default_rng(seed)
    V = CONFIG.vocab_size
    tokens = np.zeros((num_pairs, 2, P + R), np.int32)
    attention = np.zeros_like(tokens)
    completion = np.zeros_like(tokens)
    for b in range(num_pairs):
        p = int(rng.integers(1, P + 1))
        for s in range(2):
            r = int(rng.integers(1, R + 1))
            tokens[b, s, P - p:P] = rng.integers(0, V, p) if s == 0 else tokens[b, 0, P - p:P]
            tokens[b, s, P:P + r] = rng.integers(0, V, r)
            attention[b, s, P - p:P + r] = 1
            completion[b, s, P:P + r] = 1
    label_mask = np.zeros((num_pairs, 2), bool)
    label_mask[np.arange(num_pairs), np.arange(num_pairs) % 2] = True
    probs = np.where(label_mask, 1.0, 0.0).astype(np.float32)
    probs[0, 0] = 0.7  # one soft label
    return {"tokens": tokens, "attention_mask": attention, "completion_mask": completion,
            "preference_probs": probs, "label_mask": label_mask,
            "prompt_tokens": tokens[:, 0, :P].copy(), "prompt_mask": attention[:, 0, :P].copy()}


def _numpy_log_probs(params, tokens, attention, completion):
    """Sums of completion-token log-probs ``[N]``, independent of the masking logic under test: each row's real tokens
    are moved to the LEFT (positions 0..n-1) and the model runs without any mask; the causal mask makes the trailing
    filler irrelevant, and the log-softmax is done in NumPy."""
    tokens, attention, completion = (np.asarray(a) for a in (tokens, attention, completion))
    N, T = tokens.shape
    packed, scored = np.zeros((N, T), np.int32), np.zeros((N, T), bool)
    for i in range(N):
        keep = attention[i].astype(bool)
        n = int(keep.sum())
        packed[i, :n], scored[i, :n] = tokens[i, keep], completion[i, keep].astype(bool)
    assert not scored[:, 0].any()
    logits = np.asarray(forward(CONFIG, params, jnp.asarray(packed)), np.float64)
    logits = logits - logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    target = np.take_along_axis(log_probs[:, :-1], packed[:, 1:, None], axis=-1)[..., 0]
    return np.where(scored[:, 1:], target, 0.0).sum(-1)


def test_implicit_accuracy_reference_is_neutral(models):
    reference, _ = models
    arrays = _pairs()
    out = implicit_preference_accuracy(CONFIG, reference, reference, arrays, batch_size=4)
    assert out["num_pairs"] == 7 and out["mean_margin"] == 0.0
    for name in ("helpfulness", "harmlessness"):
        stats = out["per_objective"][name]
        assert stats["accuracy"] == 0.5 and stats["constraint_value"] == pytest.approx(0.5, abs=1e-7)
        assert isinstance(stats["accuracy"], float) and isinstance(stats["count"], int)
    assert out["per_objective"]["helpfulness"]["count"] == 4 and out["per_objective"]["harmlessness"]["count"] == 3


def test_implicit_accuracy_matches_numpy(models):
    reference, policy = models
    arrays = _pairs(seed=3)
    out = implicit_preference_accuracy(CONFIG, policy, reference, arrays, batch_size=3, return_margins=True)
    B = arrays["tokens"].shape[0]
    flat = [arrays[k].reshape(2 * B, -1) for k in ("tokens", "attention_mask", "completion_mask")]
    lp = {name: _numpy_log_probs(params, *flat).reshape(B, 2)
          for name, params in (("policy", policy), ("reference", reference))}
    h = (lp["policy"][:, 0] - lp["reference"][:, 0]) - (lp["policy"][:, 1] - lp["reference"][:, 1])
    np.testing.assert_allclose(out["margins"], h, rtol=1e-4, atol=1e-3)
    assert np.all(np.abs(h) > 1e-2)  # no ties hidden by float error
    probs, labels = arrays["preference_probs"], arrays["label_mask"]
    rho = np.exp(lp["policy"] - lp["reference"])
    for k, name in enumerate(("helpfulness", "harmlessness")):
        sel = labels[:, k]
        p = probs[sel, k]
        accuracy = np.mean(p * (h[sel] > 0) + (1 - p) * (h[sel] < 0))
        # The pairwise value estimate: self-normalised importance sampling over the labelled pairs.
        value = 0.5 + np.sum((rho[sel, 0] - rho[sel, 1]) * (p - 0.5)) / np.sum(rho[sel])
        stats = out["per_objective"][name]
        assert stats["accuracy"] == pytest.approx(accuracy, abs=1e-9)
        assert stats["constraint_value"] == pytest.approx(value, abs=1e-5)
        assert stats["count"] == int(sel.sum())
    # Cached reference log-probs give the same answer.
    cached = pair_log_probs(CONFIG, reference, arrays, batch_size=5)
    again = implicit_preference_accuracy(CONFIG, policy, None, arrays, batch_size=3, reference_log_probs=cached,
                                         return_margins=True)
    np.testing.assert_allclose(again["margins"], out["margins"], atol=1e-5)
    # Upper blocks on the cached residual stream of shared frozen lower blocks (policies that train only the top):
    # the lower blocks and embedding are the reference's for both, so compare with that joined policy.
    lower_config, lower, upper_config, reference_upper = split_layers(CONFIG, reference, 1)
    policy_upper = {**reference_upper, "layers": split_layers(CONFIG, policy, 1)[3]["layers"]}
    hidden = np.asarray(residual_stream(lower_config, lower, jnp.asarray(flat[0]), mask=jnp.asarray(flat[1])))
    split = implicit_preference_accuracy(upper_config, policy_upper, reference_upper, arrays, batch_size=3,
                                         inputs_hidden=hidden.reshape(B, 2, P + R, -1), completion_start=P,
                                         return_margins=True)
    joined = join_layers(lower, policy_upper)
    lp_joined = _numpy_log_probs(joined, *flat).reshape(B, 2)
    h_joined = (lp_joined[:, 0] - lp["reference"][:, 0]) - (lp_joined[:, 1] - lp["reference"][:, 1])
    np.testing.assert_allclose(split["margins"], h_joined, rtol=1e-4, atol=1e-3)


def test_generate_responses_greedy_matches_generate_per_row(models):
    reference, _ = models
    arrays = _pairs(seed=5)
    prompts, masks = arrays["prompt_tokens"], arrays["prompt_mask"]
    free, free_mask = generate_responses(CONFIG, reference, prompts, masks, R, temperature=0.0, batch_size=3)
    assert free.shape == (7, R) and free.dtype == np.int32 and free_mask.all()
    for i in range(prompts.shape[0]):
        single = generate(CONFIG, reference, prompts[i:i + 1], R, prompt_mask=masks[i:i + 1])
        np.testing.assert_array_equal(free[i], np.asarray(single.tokens[0]))
    # Make row 0's third token the eos: the mask is a prefix ending at its first eos, padding after it.
    eos, pad = int(free[0, 2]), 255 if int(free[0, 2]) != 255 else 254
    toks, mask = generate_responses(CONFIG, reference, prompts, masks, R, temperature=0.0, eos_id=eos, pad_id=pad,
                                    batch_size=3)
    first = free[0].tolist().index(eos)
    assert mask[0].tolist() == [j <= first for j in range(R)]
    np.testing.assert_array_equal(toks[0, :first + 1], free[0, :first + 1])
    for row_toks, row_mask in zip(toks, mask):
        n = int(row_mask.sum())
        assert row_mask[:n].all() and not row_mask[n:].any()
        assert (row_toks[n:] == pad).all()
        assert eos not in row_toks[:n - 1].tolist()
        if n < R:
            assert row_toks[n - 1] == eos


def test_generate_responses_sampling_is_deterministic(models):
    _, policy = models
    arrays = _pairs(seed=6)
    key = jax.random.PRNGKey(42)
    a = generate_responses(CONFIG, policy, arrays["prompt_tokens"], arrays["prompt_mask"], R, key, batch_size=4)
    b = generate_responses(CONFIG, policy, arrays["prompt_tokens"], arrays["prompt_mask"], R, key, batch_size=4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(ValueError):
        generate_responses(CONFIG, policy, arrays["prompt_tokens"], arrays["prompt_mask"], R, None, temperature=1.0)


def test_sequence_kl(models):
    reference, policy = models
    arrays = _pairs(seed=7, num_pairs=8)
    prompts, masks = arrays["prompt_tokens"], arrays["prompt_mask"]
    responses = generate_responses(CONFIG, policy, prompts, masks, R, jax.random.PRNGKey(3), temperature=1.0,
                                   top_p=None, batch_size=4)
    assert sequence_kl(CONFIG, reference, reference, prompts, masks, *responses) == 0.0
    kl = sequence_kl(CONFIG, policy, reference, prompts, masks, *responses, batch_size=3)
    assert kl > 0.5
    tokens, attention, completion = response_rows(prompts, masks, *responses)
    terms = _numpy_log_probs(policy, tokens, attention, completion) - \
        _numpy_log_probs(reference, tokens, attention, completion)
    assert kl == pytest.approx(np.mean(terms), rel=1e-4, abs=1e-3)


def test_continuation_log_probs_match_numpy_and_the_sampler(models):
    """Responses scored on a shared prompt prefill (3 per prompt, 5 prompts in batches of 2: a padded batch) against
    NumPy log-probs of the full [prompt; response] rows, with ragged left-padded prompts, an empty prompt, an empty
    response and responses cut by eos; and the sampler's own log-probabilities of the same responses."""
    reference, policy = models
    arrays = _pairs(seed=4, num_pairs=5)
    prompts, prompt_mask = arrays["prompt_tokens"].copy(), arrays["prompt_mask"].astype(bool)
    prompts[2], prompt_mask[2] = 0, False  # an empty prompt: its first response token has no context
    S = 3
    tokens, mask, sampled = generate_responses(CONFIG, policy, prompts, prompt_mask, R, jax.random.PRNGKey(2),
                                               temperature=1.0, top_p=None, batch_size=2, num_samples=S, eos_id=7,
                                               pad_id=0, return_log_probs=True)
    mask[4] = False  # an empty response scores 0
    tokens[4] = 0
    rows = response_rows(np.repeat(prompts, S, axis=0), np.repeat(prompt_mask, S, axis=0), tokens, mask)
    assert mask.sum(axis=1).min() == 0 and 0 < mask.sum(axis=1).max() and len(set(mask.sum(axis=1))) > 1
    for params in (policy, reference):
        expected = _numpy_log_probs(params, *rows)
        scored = batched_continuation_log_probs(CONFIG, params, prompts, prompt_mask, tokens, mask, batch_size=2,
                                                num_samples=S)
        assert scored.shape == (15,) and scored[4] == 0.0
        np.testing.assert_allclose(scored, expected, rtol=1e-4, atol=1e-4)
    expected = _numpy_log_probs(policy, *rows)
    keep = np.arange(15) != 4  # row 4's sampled tokens were replaced
    np.testing.assert_allclose(sampled[keep], expected[keep], rtol=1e-4, atol=1e-4)
    terms = sequence_kl_terms(CONFIG, policy, reference, prompts, prompt_mask, tokens, mask, batch_size=4,
                              num_samples=S, policy_log_probs=sampled)
    np.testing.assert_allclose(terms[keep], (expected - _numpy_log_probs(reference, *rows))[keep], rtol=1e-4,
                               atol=1e-4)
    with pytest.raises(ValueError, match="policy_log_probs"):
        sequence_kl_terms(CONFIG, policy, reference, prompts, prompt_mask, tokens, mask, num_samples=S,
                          policy_log_probs=sampled[:3])
    with pytest.raises(ValueError, match="5 prompts x 2 samples"):
        batched_continuation_log_probs(CONFIG, policy, prompts, prompt_mask, tokens, mask, num_samples=2)


def _token_features(tokens, attention_mask, completion_mask):
    """Trivial features: (sum of response tokens, response length)."""
    c = np.asarray(completion_mask, bool)
    return np.stack([np.where(c, tokens, 0).sum(1), c.sum(1)], axis=1).astype(np.float32)


def test_judge_win_rates_hand_count():
    prompts, prompt_mask = np.array([[0, 7], [3, 4], [0, 0], [5, 6]]), np.array([[0, 1], [1, 1], [0, 1], [1, 1]])
    policy = (np.array([[10, 2, 0], [1, 1, 0], [4, 0, 0], [9, 9, 9]]),
              np.array([[1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1]], bool))
    reference = (np.array([[3, 0, 0], [2, 0, 0], [1, 3, 0], [9, 9, 9]]),
                 np.array([[1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]], bool))
    # Token sums: policy 12, 2, 4, 27 vs reference 3, 2, 4, 27; lengths: policy 2, 2, 1, 3 vs 1, 1, 2, 3.
    ones, zeros = jnp.ones(2), jnp.zeros(2)
    judges = {0: BradleyTerryModel(jnp.array([1.0, 0.0]), zeros, ones),  # reward = token sum
              1: BradleyTerryModel(jnp.array([0.0, -2.0]), zeros, ones)}  # reward = -2 * length (shorter wins)
    out = judge_win_rates(judges, _token_features, prompts, prompt_mask, policy, reference)
    help_, harm = out["helpfulness"], out["harmlessness"]
    assert help_["win_rate"] == pytest.approx((1 + 0.5 + 0.5 + 0.5) / 4)
    assert help_["ties"] == pytest.approx(0.75) and help_["count"] == 4
    assert help_["mean_reward_diff"] == pytest.approx(9 / 4)
    assert help_["reward_diff_stderr"] == pytest.approx(np.std([9, 0, 0, 0], ddof=1) / 2)
    assert help_["win_rate_stderr"] == pytest.approx(np.std([1, .5, .5, .5], ddof=1) / 2)
    assert harm["win_rate"] == pytest.approx((0 + 0 + 1 + 0.5) / 4)
    assert harm["mean_reward_diff"] == pytest.approx((-2 - 2 + 2 + 0) / 4)
    sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    assert help_["expected_win_rate"] == pytest.approx(np.mean(sigmoid(np.array([9.0, 0.0, 0.0, 0.0]))))
    assert harm["per_prompt"]["expected_win_rate"] == pytest.approx(list(sigmoid(np.array([-2.0, -2.0, 2.0, 0.0]))))
    # Cached reference features stand in for featurising the reference responses: given the policy's own
    # features, every comparison is a tie.
    cached = _token_features(*response_rows(prompts, prompt_mask, *policy))
    tied = judge_win_rates(judges, _token_features, prompts, prompt_mask, policy, reference,
                           reference_features=cached)
    assert all(v["win_rate"] == 0.5 and v["ties"] == 1.0 for v in tied.values())


def test_judge_win_rates_with_two_samples_per_prompt():
    prompts, prompt_mask = np.array([[1, 2], [0, 3]]), np.array([[1, 1], [0, 1]])
    # rows 0, 1 answer prompt 0; rows 2, 3 prompt 1. Token sums: policy 5, 1, 2, 8; reference 3, 4, 2, 1.
    policy = (np.array([[5, 0], [1, 0], [2, 0], [4, 4]]), np.array([[1, 0], [1, 0], [1, 0], [1, 1]], bool))
    reference = (np.array([[3, 0], [4, 0], [2, 0], [1, 0]]), np.array([[1, 0], [1, 0], [1, 0], [1, 0]], bool))
    judges = {0: BradleyTerryModel(jnp.array([1.0, 0.0]), jnp.zeros(2), jnp.ones(2))}
    out = judge_win_rates(judges, _token_features, prompts, prompt_mask, policy, reference, samples_per_prompt=2)
    help_ = out["helpfulness"]
    assert help_["count"] == 2 and help_["per_prompt"]["win"] == [0.5, 0.75]  # (5>3, 1<4), (2=2, 8>1)
    sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    expected = [np.mean(sigmoid(np.array([5 - 3, 5 - 4, 1 - 3, 1 - 4.0]))),
                np.mean(sigmoid(np.array([2 - 2, 2 - 1, 8 - 2, 8 - 1.0])))]
    assert help_["per_prompt"]["expected_win_rate"] == pytest.approx(expected)
    assert help_["expected_win_rate"] == pytest.approx(np.mean(expected))
    assert help_["mean_reward_diff"] == pytest.approx(((3 - 3.5) + (5 - 1.5)) / 2)
    with pytest.raises(ValueError, match="2 prompts x 3 samples"):
        judge_win_rates(judges, _token_features, prompts, prompt_mask, policy, reference, samples_per_prompt=3)


def test_evaluate_policy_end_to_end(models):
    reference, policy = models
    arrays = _pairs(seed=9, num_pairs=6)
    judges = {0: BradleyTerryModel(jnp.linspace(-1, 1, CONFIG.d_model), jnp.zeros(CONFIG.d_model),
                                   jnp.ones(CONFIG.d_model)),
              1: BradleyTerryModel(jnp.linspace(1, -1, CONFIG.d_model), jnp.zeros(CONFIG.d_model),
                                   jnp.ones(CONFIG.d_model))}
    feature_fn = make_feature_fn(CONFIG, reference, layer=1, batch_size=4)
    settings = EvalSettings(max_new_tokens=R, batch_size=4)
    common = dict(prompt_tokens=arrays["prompt_tokens"], prompt_mask=arrays["prompt_mask"],
                  judges=judges, feature_fn=feature_fn, rng=jax.random.PRNGKey(0))
    same = evaluate_policy(CONFIG, reference, reference, settings, eval_arrays=arrays, **common)
    # The policy's log-probabilities come from its sampler, the reference's from scoring: equal up to float32
    # rounding when the two are the same model.
    assert same.kl == pytest.approx(0.0, abs=1e-5) and same.num_prompts == 6
    assert same.implicit["per_objective"]["helpfulness"]["accuracy"] == 0.5
    # Common random numbers: a policy equal to its reference draws the reference's very responses (all ties).
    assert all(j["win_rate"] == 0.5 and j["ties"] == 1.0 for j in same.judges.values())
    out = evaluate_policy(CONFIG, policy, reference, settings, eval_arrays=arrays, return_responses=True, **common)
    assert out.kl > 0 and set(out.win_rate) == {"helpfulness", "harmlessness"}
    assert all(0.0 <= v <= 1.0 for v in out.win_rate.values())
    # The reference samples depend only on rng (so they are shared across evaluated policies) and use the policy's
    # sampling key.
    sample_key = jax.random.split(jax.random.PRNGKey(0))[0]
    for name, params in (("reference", reference), ("policy", policy)):
        np.testing.assert_array_equal(out.responses[name][0],
                                      generate_responses(CONFIG, params, arrays["prompt_tokens"],
                                                         arrays["prompt_mask"], R, sample_key, batch_size=4)[0])
    json.dumps(out.as_dict())  # plain Python values
    # Win-rate samples at temperature 1 without top-p are exact policy samples: the KL reuses them.
    exact = evaluate_policy(CONFIG, policy, reference, dataclasses.replace(settings, temperature=1.0, top_p=None),
                            return_responses=True, **common)
    assert "policy_kl" not in exact.responses
    kl = sequence_kl(CONFIG, policy, reference, arrays["prompt_tokens"], arrays["prompt_mask"],
                     *exact.responses["policy"], batch_size=4)
    assert exact.kl == pytest.approx(kl, rel=1e-6)


def test_evaluate_policy_with_several_samples_per_prompt(models):
    reference, policy = models
    arrays = _pairs(seed=3, num_pairs=5)
    judges = {0: BradleyTerryModel(jnp.linspace(-1, 1, CONFIG.d_model), jnp.zeros(CONFIG.d_model),
                                   jnp.ones(CONFIG.d_model))}
    feature_fn = make_feature_fn(CONFIG, reference, layer=1, batch_size=4)
    settings = EvalSettings(max_new_tokens=R, batch_size=4, temperature=1.0, top_p=None, samples_per_prompt=3)
    common = dict(prompt_tokens=arrays["prompt_tokens"], prompt_mask=arrays["prompt_mask"], judges=judges,
                  feature_fn=feature_fn, rng=jax.random.PRNGKey(5), return_responses=True)
    same = evaluate_policy(CONFIG, reference, reference, settings, **common)
    assert same.judges["helpfulness"]["per_prompt"]["expected_win_rate"] == pytest.approx([0.5] * 5, abs=1e-12)
    assert same.per_prompt["kl"] == pytest.approx([0.0] * 5, abs=1e-5)
    out = evaluate_policy(CONFIG, policy, reference, settings, **common)
    responses = out.responses["policy"]
    assert responses[0].shape == (15, R)
    # Rows 3i..3i+2 answer prompt i: the KL is the per-prompt mean of the rows' log-ratios (a NumPy reference).
    repeated = np.repeat(arrays["prompt_tokens"], 3, axis=0), np.repeat(arrays["prompt_mask"], 3, axis=0)
    tokens, attention, completion = response_rows(*repeated, *responses)
    terms = (_numpy_log_probs(policy, tokens, attention, completion)
             - _numpy_log_probs(reference, tokens, attention, completion))
    np.testing.assert_allclose(out.per_prompt["kl"], terms.reshape(5, 3).mean(axis=1), rtol=1e-4, atol=1e-3)
    low, high = out.kl_interval
    assert low <= out.kl <= high and out.settings["samples_per_prompt"] == 3
    low, high = out.expected_win_rate_interval["helpfulness"]
    assert low <= out.expected_win_rate["helpfulness"] <= high


# ---------------------------------------------------------------------------------------------------------------
# Pareto.

POINTS = {"a": (0.6, 0.4), "b": (0.55, 0.55), "c": (0.5, 0.5), "d": (0.7, 0.3), "e": (0.55, 0.5),
          "f": (0.7, 0.3), "g": (float("nan"), 0.9)}


def test_dominance_and_front():
    assert dominates((0.6, 0.5), (0.5, 0.5)) and not dominates((0.5, 0.5), (0.5, 0.5))
    assert not dominates((0.6, 0.4), (0.5, 0.5)) and not dominates((0.9, float("nan")), (0.1, 0.1))
    table = dominance_table(POINTS)
    assert sorted(table["b"]["dominates"]) == ["c", "e"]
    assert table["c"]["dominated_by"] == ["b", "e"] and table["e"]["dominated_by"] == ["b"]
    assert table["a"] == {"dominates": [], "dominated_by": []}
    assert table["d"]["dominates"] == [] and table["g"] == {"dominates": [], "dominated_by": []}
    assert pareto_front(POINTS) == ["a", "b", "d", "f"]


def _eval_record(name, method, help_values, harm_values, seed=0, threshold=None, kl=1.5, protocol="gold"):
    """An ``eval.json`` record with per-prompt expected win rates (the judged win rates set to their means) and the
    run's own intervals and constraint verdict, as evaluation writes them."""
    from mopo_jax.evaluation.paired import bootstrap_interval, constraint_verdict

    help_values, harm_values = np.asarray(help_values, float), np.asarray(harm_values, float)
    judges = {key: {"win_rate": float(values.mean()), "expected_win_rate": float(values.mean()),
                    "per_prompt": {"expected_win_rate": values.tolist(), "win": values.tolist()}}
              for key, values in (("helpfulness", help_values), ("harmlessness", harm_values))}
    intervals = {key: bootstrap_interval(values) for key, values in (("helpfulness", help_values),
                                                                      ("harmlessness", harm_values))}
    verdict = None if threshold is None else constraint_verdict(intervals["harmlessness"], threshold)
    return {"name": name, "method": method, "protocol": protocol, "config": {"lr": 1e-5}, "seed": seed,
            "constraint_verdict": verdict,
            "evaluation": {"judges": judges, "per_prompt": {"kl": [kl] * len(help_values)},
                           "expected_win_rate_interval": {k: list(v[1:]) for k, v in intervals.items()},
                           "kl_interval": [kl, kl], "settings": {"samples_per_prompt": 4},
                           "implicit": {"per_objective": {"helpfulness": {"accuracy": 0.6, "constraint_value": 0.52},
                                                          "harmlessness": {"accuracy": 0.55,
                                                                           "constraint_value": 0.51}}}},
            "threshold": threshold, "constraint_met_pairs": None}


def _write_runs(tmp_path, records):
    runs = []
    for i, record in enumerate(records):
        directory = tmp_path / f"run{i}"
        directory.mkdir(parents=True)
        (directory / "eval.json").write_text(json.dumps(record))
        runs.append(str(directory))
    return runs


def test_plot_draws_interval_bars(tmp_path):
    results = [
        dict(name="dpo", method="dpo", helpfulness=0.68, harmlessness=0.38, helpfulness_interval=[0.64, 0.72],
             harmlessness_interval=[0.33, 0.42]),
        dict(name="mopo_b0.50", method="mopo", helpfulness=0.63, harmlessness=0.52, threshold=0.5,
             constraint_verdict="undecided"),
        dict(name="mopo_b0.55", method="mopo", helpfulness=0.58, harmlessness=0.54, threshold=0.55,
             constraint_verdict="not met"),
        dict(name="modpo", method="modpo", helpfulness=0.6, harmlessness=0.5),
        dict(name="custom", method="something_new", helpfulness=0.52, harmlessness=0.45),
    ]
    png = tmp_path / "pareto.png"
    front = pareto_plot(results, png)
    assert png.stat().st_size > 5000
    assert front == ["dpo", "mopo_b0.50", "mopo_b0.55"]  # modpo, custom and the reference are dominated


def test_compare_decides_only_from_paired_intervals(tmp_path):
    rng = np.random.default_rng(0)
    prompts = 200
    difficulty = rng.normal(scale=0.15, size=prompts)  # what every method sees at a prompt

    def values(mean, noise=0.02):
        return np.clip(mean + difficulty + noise * rng.normal(size=prompts), 0.0, 1.0)

    records = [
        _eval_record("dpo", "dpo_helpful", values(0.60), values(0.45), seed=0),
        _eval_record("dpo", "dpo_helpful", values(0.62), values(0.44), seed=1),
        _eval_record("mopo_b0.52", "mopo_pairwise", values(0.63), values(0.56), threshold=0.52),
        _eval_record("mopo_b0.56", "mopo_pairwise", values(0.63), values(0.562), threshold=0.56),
        _eval_record("mopo_b0.60", "mopo_pairwise", values(0.63), values(0.55), threshold=0.60),
        _eval_record("close", "modpo", values(0.63), values(0.559)),
    ]
    runs = _write_runs(tmp_path, records)
    missing = tmp_path / "missing"
    with pytest.warns(UserWarning):
        collected = collect_run_results(runs + [str(missing)])
    assert len(collected) == 6
    summary = compare(collected)
    points = {p["name"]: p for p in summary["points"]}
    assert list(points) == ["dpo", "mopo_b0.52", "mopo_b0.56", "mopo_b0.60", "close"]
    dpo = points["dpo"]
    assert dpo["num_seeds"] == 2 and dpo["seeds"] == [0, 1]
    grid = np.array([r["per_prompt"]["helpfulness"] for r in collected[:2]])
    assert dpo["helpfulness"] == pytest.approx(grid.mean())
    assert dpo["helpfulness_interval"][0] < grid.mean() < dpo["helpfulness_interval"][1]
    assert [points[n]["constraint_verdict"] for n in ("mopo_b0.52", "mopo_b0.56", "mopo_b0.60")] == [
        "met", "undecided", "not met"]
    assert dpo["constraint_verdict"] is None and points["mopo_b0.52"]["constraint_met"] is True
    dominance = summary["dominance"]
    assert "dpo" in dominance["mopo_b0.52"]["dominates"] and "mopo_b0.52" in dominance["dpo"]["dominated_by"]
    # 0.003 apart on harmlessness with identical helpfulness: the intervals cannot decide.
    assert "close" not in dominance["mopo_b0.56"]["dominates"] + dominance["mopo_b0.56"]["dominated_by"]
    assert "reference" in dominance["mopo_b0.52"]["dominates"]  # 1/2 at every prompt, added when no run has it
    pair = next(c for c in summary["comparisons"] if {c["a"], c["b"]} == {"dpo", "mopo_b0.52"})
    assert pair["verdict"] in ("dominates", "dominated") and len(pair["helpfulness"]) == 3

    out_png, out_json = tmp_path / "front.png", tmp_path / "results.json"
    written = write_pareto(runs, out_png, out_json)
    saved = json.loads(out_json.read_text())
    assert out_png.stat().st_size > 5000 and saved["dominance"] == written["dominance"]
    assert len(saved["runs"]) == 6 and len(saved["points"]) == 5
    own = saved["runs"][4]  # mopo_b0.60 alone: the interval evaluation wrote is the pooled point's
    assert own["harmlessness_interval"] == pytest.approx(points["mopo_b0.60"]["harmlessness_interval"])
    assert own["kl_interval"] == [1.5, 1.5]
    assert own["constraint_verdict"] == "not met" and "config" not in own
    table = markdown_table(saved)
    assert "| mopo_b0.60 | 0 |" in table and "not met" in table


def test_compare_refuses_inconsistent_groups(tmp_path):
    base = np.full(10, 0.5)
    with pytest.raises(ValueError, match="differ in threshold"):
        compare(collect_run_results(_write_runs(tmp_path / "a", [
            _eval_record("mopo", "mopo_pairwise", base, base, threshold=0.5, seed=0),
            _eval_record("mopo", "mopo_pairwise", base, base, threshold=0.6, seed=1)])))
    with pytest.raises(ValueError, match="repeat a seed"):
        compare(collect_run_results(_write_runs(tmp_path / "b", [
            _eval_record("dpo", "dpo_helpful", base, base), _eval_record("dpo", "dpo_helpful", base, base)])))
    with pytest.raises(ValueError, match="different numbers of prompts"):
        compare(collect_run_results(_write_runs(tmp_path / "c", [
            _eval_record("a", "dpo_helpful", base, base), _eval_record("b", "dpo_helpful", base[:5], base[:5])])))
    both = compare(collect_run_results(_write_runs(tmp_path / "d", [
        _eval_record("dpo", "dpo_helpful", base, base, protocol="human"),
        _eval_record("dpo", "dpo_helpful", base, base, protocol="gold")])))
    assert [p["name"] for p in both["points"]] == ["dpo@human", "dpo@gold"]
    old = _eval_record("old", "dpo_helpful", base, base)
    del old["evaluation"]["per_prompt"]
    with pytest.raises(ValueError, match="re-run `mopo eval`"):
        collect_run_results(_write_runs(tmp_path / "e", [old]))
