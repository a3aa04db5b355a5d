"""Policy evaluation (implicit accuracy, generation, KL, judge win rates) and Pareto analysis on tiny random models."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mopo_jax.evaluation.pareto import (
    aggregate_seeds,
    collect_run_results,
    dominance_table,
    dominates,
    pareto_front,
    pareto_plot,
    write_pareto,
)
from mopo_jax.evaluation.policy_eval import (
    evaluate_policy,
    generate_responses,
    implicit_preference_accuracy,
    judge_win_rates,
    make_feature_fn,
    pair_log_probs,
    response_rows,
    sequence_kl,
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


def test_evaluate_policy_end_to_end(models):
    reference, policy = models
    arrays = _pairs(seed=9, num_pairs=6)
    judges = {0: BradleyTerryModel(jnp.linspace(-1, 1, CONFIG.d_model), jnp.zeros(CONFIG.d_model),
                                   jnp.ones(CONFIG.d_model)),
              1: BradleyTerryModel(jnp.linspace(1, -1, CONFIG.d_model), jnp.zeros(CONFIG.d_model),
                                   jnp.ones(CONFIG.d_model))}
    feature_fn = make_feature_fn(CONFIG, reference, layer=1, batch_size=4)
    common = dict(prompt_tokens=arrays["prompt_tokens"], prompt_mask=arrays["prompt_mask"],
                  judges=judges, feature_fn=feature_fn, max_new_tokens=R, rng=jax.random.PRNGKey(0), batch_size=4)
    same = evaluate_policy(CONFIG, reference, reference, arrays, **common)
    assert same["kl"] == 0.0 and same["num_prompts"] == 6
    assert same["implicit"]["per_objective"]["helpfulness"]["accuracy"] == 0.5
    # Common random numbers: a policy equal to its reference draws the reference's very responses (all ties).
    assert all(j["win_rate"] == 0.5 and j["ties"] == 1.0 for j in same["judges"].values())
    out = evaluate_policy(CONFIG, policy, reference, eval_arrays=arrays, return_responses=True, **common)
    assert out["kl"] > 0 and set(out["win_rate"]) == {"helpfulness", "harmlessness"}
    assert all(0.0 <= v <= 1.0 for v in out["win_rate"].values())
    # The reference samples depend only on rng (so they are shared across evaluated policies) and use the policy's
    # sampling key.
    sample_key = jax.random.split(jax.random.PRNGKey(0))[0]
    for name, params in (("reference", reference), ("policy", policy)):
        np.testing.assert_array_equal(out["responses"][name][0],
                                      generate_responses(CONFIG, params, arrays["prompt_tokens"],
                                                         arrays["prompt_mask"], R, sample_key, batch_size=4)[0])
    json.dumps({k: v for k, v in out.items() if k != "responses"})  # plain Python values
    # Win-rate samples at temperature 1 without top-p are exact policy samples: the KL reuses them.
    exact = evaluate_policy(CONFIG, policy, reference, None, return_responses=True,
                            **{**common, "temperature": 1.0, "top_p": None})
    assert "policy_kl" not in exact["responses"]
    kl = sequence_kl(CONFIG, policy, reference, arrays["prompt_tokens"], arrays["prompt_mask"],
                     *exact["responses"]["policy"], batch_size=4)
    assert exact["kl"] == pytest.approx(kl, rel=1e-6)


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


def _eval_record(name, method, help_, harm, seed=0, threshold=None, met=None):
    return {"name": name, "method": method, "config": {"lr": 1e-5}, "seed": seed,
            "evaluation": {"win_rate": {"helpfulness": help_, "harmlessness": harm},
                           "win_rate_stderr": {"helpfulness": 0.02, "harmlessness": 0.03}, "kl": 1.5,
                           "implicit": {"per_objective": {"helpfulness": {"accuracy": 0.6, "constraint_value": 0.52},
                                                          "harmlessness": {"accuracy": 0.55,
                                                                           "constraint_value": 0.51}}}},
            "threshold": threshold, "constraint_met": met}


def test_plot_and_collect(tmp_path):
    results = [
        dict(name="dpo", method="dpo", helpfulness=0.68, harmlessness=0.38, helpfulness_stderr=0.02,
             harmlessness_stderr=0.02),
        dict(name="mopo_b0.50", method="mopo", helpfulness=0.63, harmlessness=0.52, threshold=0.5,
             constraint_met=True),
        dict(name="mopo_b0.55", method="mopo", helpfulness=0.58, harmlessness=0.54, threshold=0.55,
             constraint_met=False),
        dict(name="modpo", method="modpo", helpfulness=0.6, harmlessness=0.5),
        dict(name="custom", method="something_new", helpfulness=0.52, harmlessness=0.45),
    ]
    png = tmp_path / "pareto.png"
    front = pareto_plot(results, png)
    assert png.stat().st_size > 5000
    assert front == ["dpo", "mopo_b0.50", "mopo_b0.55"]  # modpo, custom and the reference are dominated

    runs = []
    for i, rec in enumerate([_eval_record("dpo", "dpo", 0.66, 0.40, seed=0),
                             _eval_record("dpo", "dpo", 0.70, 0.36, seed=1),
                             _eval_record("mopo_b0.5", "mopo", 0.62, 0.53, threshold=0.5, met=True),
                             _eval_record("weak", "ipo", 0.49, 0.49)]):
        d = tmp_path / f"run{i}"
        d.mkdir()
        (d / "eval.json").write_text(json.dumps(rec))
        runs.append(str(d))
    missing = tmp_path / "missing"
    with pytest.warns(UserWarning):
        collected = collect_run_results(runs + [str(missing)])
    assert len(collected) == 4 and collected[2]["threshold"] == 0.5 and collected[0]["helpfulness_stderr"] == 0.02
    agg = aggregate_seeds(collected)
    dpo = next(r for r in agg if r["name"] == "dpo")
    assert dpo["num_seeds"] == 2 and dpo["helpfulness"] == pytest.approx(0.68)
    assert dpo["helpfulness_stderr"] == pytest.approx(np.std([0.66, 0.70], ddof=1) / np.sqrt(2))
    out_png, out_json = tmp_path / "front.png", tmp_path / "results.json"
    summary = write_pareto(runs, out_png, out_json)
    assert out_png.stat().st_size > 5000 and os.path.exists(out_json)
    saved = json.loads(out_json.read_text())
    assert saved["dominance"]["reference"]["dominates"] == ["weak"]
    assert set(saved["pareto_front"]) == {"dpo", "mopo_b0.5"} == set(summary["pareto_front"])
    assert len(saved["runs"]) == 4 and len(saved["points"]) == 3
