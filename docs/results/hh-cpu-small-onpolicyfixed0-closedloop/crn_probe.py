"""Is the evaluation's expected win rate the V(pi) of Eq. 2? A test of the hypothesis that its common random numbers
bias it.

``mopo eval`` draws the policy's S samples with the same random numbers as the reference's S samples (row j of
both from one key), then averages ``sigmoid(r(y_j) - r(y'_j'))`` over all S x S pairs. The S diagonal pairs
``(y_j, y'_j)`` are coupled, not independent draws, so their expectation need not be ``V(pi) = E_{y ~ pi, y' ~ pi_ref}
sigmoid(r(y) - r(y'))``; the S (S - 1) off-diagonal pairs are independent and estimate V(pi) without bias. For
each run this recomputes the evaluation's own samples (the same keys, prompts and settings as ``mopo eval``; the
reference's from the evaluation's cache), checks that the all-pairs mean equals eval.json's per-prompt values, and
reports the off-diagonal and diagonal means of the gold harmlessness win rate with standard errors over prompts.

    cd <clone with the runs' shared work directory> && python crn_probe.py RUN_DIR... > crn_probe.md
"""
import json
import pathlib
import sys

import jax
import numpy as np

from mopo_jax import storage
from mopo_jax.evaluation import policy_eval
from mopo_jax.evaluation.preference_models import response_features, rewards
from mopo_jax.experiment.evaluate import _reference_eval_cache, _reference_eval_features, eval_prompt_rows
from mopo_jax.experiment.hh_rlhf import feature_batch_size, lower_activations, trainable_for
from mopo_jax.experiment.run_dir import load_policy, load_run_config
from mopo_jax.models import join_layers
from mopo_jax.parallel import sharding
from pool_size_probe import experiment  # this directory's other probe (the script's directory is on sys.path)


def mean_se(values):
    return f"{values.mean():.3f} +- {values.std(ddof=1) / np.sqrt(len(values)):.3f}"


def main(runs):
    loaded = experiment(runs[0])
    config, mesh, data, model, judge = loaded.config, loaded.mesh, loaded.data, loaded.model, loaded.judge
    model_config, params = model
    lower_config, lower, upper_config, upper = loaded.split
    end_of_turn, pad = loaded.tokens
    eval_pairs = data["eval"]
    rows = eval_prompt_rows(eval_pairs["objective"], config.data.eval_prompts, eval_pairs["prompt_tokens"], 2)
    prompt_tokens, prompt_mask = eval_pairs["prompt_tokens"][rows], eval_pairs["prompt_mask"][rows]
    hidden = lower_activations(config, lower_config, lower, eval_pairs, "eval", mesh)
    S = config.eval.samples_per_prompt

    def feature_fn(tokens, attention, completion):
        return response_features(model_config, params, tokens, attention, completion,
                                 layer=config.preference.feature_layer, batch_size=feature_batch_size(mesh), mesh=mesh)

    cached = _reference_eval_cache(config, model, prompt_tokens, prompt_mask, end_of_turn, pad, eval_pairs, hidden,
                                   upper_config, upper, mesh)
    reference_rewards = np.asarray(rewards(judge, _reference_eval_features(
        config, prompt_tokens, prompt_mask, cached, feature_fn, mesh)), np.float64).reshape(-1, S)
    sample_key = policy_eval.sampling_keys(jax.random.PRNGKey(config.eval.seed))[0]
    off = ~np.eye(S, dtype=bool)
    print(f"{len(rows)} evaluation prompts x {S} samples per prompt, gold harmlessness, standard errors over prompts\n")
    print("| run | all S x S pairs (eval.json) | off-diagonal pairs (independent) | diagonal pairs (common random "
          "numbers) | all - off-diagonal | identical diagonal pairs |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for run in runs:
        run_config = load_run_config(run)
        trained = sharding.put_params(upper_config, load_policy(storage.path(run) / "policy.npz", upper,
                                                                trainable_for(run_config)), mesh)
        policy = join_layers(lower, trained)
        *responses, _ = policy_eval.generate_responses(
            model_config, policy, prompt_tokens=prompt_tokens, prompt_mask=prompt_mask,
            max_new_tokens=config.eval.max_new_tokens, eos_id=end_of_turn, pad_id=pad,
            batch_size=config.eval.batch_size, mesh=mesh, num_samples=S, rng=sample_key,
            temperature=config.eval.temperature, top_p=config.eval.top_p, return_log_probs=True)
        rows_ = policy_eval.response_rows(np.repeat(prompt_tokens, S, 0), np.repeat(prompt_mask, S, 0), *responses)
        policy_rewards = np.asarray(rewards(judge, feature_fn(*rows_)), np.float64).reshape(-1, S)
        wins = 1.0 / (1.0 + np.exp(-(policy_rewards[:, :, None] - reference_rewards[:, None, :])))
        every = wins.mean(axis=(1, 2))
        independent = wins[:, off].mean(axis=1)
        coupled = wins[:, ~off].mean(axis=1)
        stored = json.loads((pathlib.Path(run) / "eval.json").read_text())["evaluation"]["judges"]["harmlessness"]
        np.testing.assert_allclose(every, stored["per_prompt"]["expected_win_rate"], atol=1e-6)
        identical = float(np.mean(policy_rewards == reference_rewards))
        print(f"| {pathlib.Path(run).name} | {mean_se(every)} | {mean_se(independent)} | {mean_se(coupled)} | "
              f"{(every - independent).mean():+.4f} +- {(every - independent).std(ddof=1) / np.sqrt(len(every)):.4f} "
              f"| {identical:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
