"""Does Algorithm 1's candidate estimate under-read because its pools are small? A test of that hypothesis.

The multiplier step reads ``G = mean_x sum_i rho~_i w(y_i)``, with ``y_1..y_N ~ pi_ref`` (N = 8 candidates),
``rho~`` the self-normalised ``pi/pi_ref`` over the pool and ``w(y_i)`` the leave-one-out win rate of ``y_i`` against
the rest of its pool under the gold harmlessness model. A self-normalised estimate over few draws is biased towards
the draws' plain mean (the reference's 1/2) when the policy has moved its mass to responses the pool rarely holds.
If that bias is the under-read, the same estimator over larger pools of the same reference draws reads higher, and
the largest pool reads closest to the evaluated gold value.

For each run given: on the first P evaluation prompts (the evaluation's own prompts, an equal share per objective),
S reference samples per prompt (the evaluation's length and temperature; one draw shared by every run), their gold
harmlessness rewards and ``log pi/pi_ref`` under the run's policy (``--tokens`` draws them at another length:
the candidates' own 48 tokens rather than the evaluation's 32); the estimator over disjoint pools of n in
{4, 8, 16, S} of those samples, averaged over pools and prompts, with a standard error over prompts; and the
evaluation's own gold value on the same P prompts (eval.json's per-prompt expected win rates), for comparison.

    cd <clone with the runs' shared work directory> &&
    python pool_size_probe.py --prompts 32 --samples 32 RUN_DIR... > pool_size_probe.md
"""
import argparse
import json
import pathlib
import types

import jax
import numpy as np

from mopo_jax import storage
from mopo_jax.evaluation import policy_eval
from mopo_jax.evaluation.preference_models import response_features, rewards
from mopo_jax.experiment.evaluate import eval_prompt_rows
from mopo_jax.experiment.hh_rlhf import (base_model, end_of_turn_and_pad, experiment_mesh, feature_batch_size,
                                         prepare_data, preference_models, split_model, trainable_for)
from mopo_jax.experiment.run_dir import load_policy, load_run_config
from mopo_jax.parallel import sharding


def pool_estimate(log_ratio, reward):
    """``[P]`` the self-normalised estimate over one pool per prompt with leave-one-out win rates (NumPy, float64);
    ``log_ratio``, ``reward``: ``[P, n]``."""
    n = reward.shape[-1]
    wins = 1.0 / (1.0 + np.exp(-(reward[:, :, None] - reward[:, None, :])))
    loo = (wins.sum(-1) - 0.5) / (n - 1)  # the diagonal is sigmoid(0) = 1/2
    weights = np.exp(log_ratio - log_ratio.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return (weights * loo).sum(-1)


def jackknife_estimate(log_ratio, reward):
    """``[P]`` the jackknife's bias-corrected pool estimate, ``n G - (n - 1) mean_i G_(-i)`` with ``G_(-i)`` the
    estimate over the pool without candidate ``i``: removes the ``O(1/n)`` part of a self-normalised estimate's bias."""
    n = reward.shape[-1]
    dropped = [pool_estimate(np.delete(log_ratio, i, -1), np.delete(reward, i, -1)) for i in range(n)]
    return n * pool_estimate(log_ratio, reward) - (n - 1) * np.mean(dropped, axis=0)


def pool_estimates(log_ratio, reward, pool, estimator=pool_estimate):
    """``[P]`` per-prompt means of ``estimator`` over the disjoint pools of size ``pool`` of the ``[P, S]`` draws."""
    pools = reward.shape[-1] // pool
    return np.mean([estimator(log_ratio[:, p * pool:(p + 1) * pool], reward[:, p * pool:(p + 1) * pool])
                    for p in range(pools)], axis=0)


def experiment(run):
    """What both probes load for a run's experiment (its config, mesh, data, base model, the gold harmlessness
    model, the frozen/trained split, end-of-turn and pad ids), as ``mopo eval`` does."""
    config = load_run_config(run)
    mesh = experiment_mesh(config, check_training_batch=False)
    data = prepare_data(config)
    model = base_model(config, mesh)
    judge = preference_models(config, data, model, mesh)["models"]["judge_1"]
    return types.SimpleNamespace(config=config, mesh=mesh, data=data, model=model, judge=judge,
                                 split=split_model(config, *model), tokens=end_of_turn_and_pad(config))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--split", default="eval", choices=("eval", "policy_train"),
                        help="whose prompts: the evaluation's (default) or a draw of the training split's (half per objective), "
                             "the prompts Algorithm 1's candidates are sampled on")
    parser.add_argument("--tokens", type=int, default=None,
                        help="response length of the draws (default eval.max_new_tokens; the candidates' own length "
                             "is data.max_response_tokens)")
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args()

    loaded = experiment(args.runs[0])
    config, mesh, data, model, judge = loaded.config, loaded.mesh, loaded.data, loaded.model, loaded.judge
    model_config, params = model
    lower_config, lower, upper_config, upper = loaded.split
    end_of_turn, pad = loaded.tokens
    eval_pairs = data["eval"]
    rows = eval_prompt_rows(eval_pairs["objective"], args.prompts, eval_pairs["prompt_tokens"], 2)
    evaluated_rows = eval_prompt_rows(eval_pairs["objective"], config.data.eval_prompts, eval_pairs["prompt_tokens"],
                                      2)
    positions = np.searchsorted(evaluated_rows, rows)
    assert (evaluated_rows[positions] == rows).all(), "the probe's prompts must be evaluation prompts"
    prompt_tokens, prompt_mask = eval_pairs["prompt_tokens"][rows], eval_pairs["prompt_mask"][rows]
    if args.split == "policy_train":  # the eval's own columns below then stay the eval prompts' values
        train = data["policy_train"]
        # An equal share per objective, as the split holds them (and as the eval's rows are chosen).
        rng = np.random.default_rng(0)
        drawn = np.sort(np.concatenate([rng.choice(np.flatnonzero(train["objective"] == k), args.prompts // 2,
                                                   replace=False) for k in (0, 1)]))
        prompt_tokens, prompt_mask = train["prompt_tokens"][drawn], train["prompt_mask"][drawn]
        print(f"prompts: {args.prompts} drawn from the {len(train['prompt_tokens'])} policy-train pairs, half per objective; "
              f"objective shares of the draw {np.bincount(train['objective'][drawn], minlength=2).tolist()}, of "
              f"the split {np.bincount(train['objective'], minlength=2).tolist()}\n")
    length = args.tokens or config.eval.max_new_tokens

    # One draw of reference samples for every run (a key of its own, not the evaluation's).
    responses, response_mask = policy_eval.generate_responses(
        model_config, params, prompt_tokens, prompt_mask, length, jax.random.PRNGKey(12345),
        temperature=config.eval.temperature, top_p=None, eos_id=end_of_turn, pad_id=pad,
        batch_size=8, mesh=mesh, num_samples=args.samples)
    tokens, attention, completion = policy_eval.response_rows(
        np.repeat(prompt_tokens, args.samples, 0), np.repeat(prompt_mask, args.samples, 0), responses, response_mask)
    features = response_features(model_config, params, tokens, attention, completion,
                                 layer=config.preference.feature_layer, batch_size=feature_batch_size(mesh), mesh=mesh)
    reward = np.asarray(rewards(judge, features), np.float64).reshape(args.prompts, args.samples)
    hidden = policy_eval.batched_residual_stream(lower_config, lower, tokens, attention, 16, mesh)
    placed_reference = sharding.put_params(upper_config, upper, mesh)
    reference_log_probs = policy_eval.batched_sequence_log_probs(upper_config, placed_reference, tokens, completion,
                                                                 attention, inputs_hidden=hidden, mesh=mesh)
    sizes = sorted({n for n in (4, 8, 16, args.samples) if 2 <= n <= args.samples})
    which = "evaluation" if args.split == "eval" else "policy-train"
    print(f"{args.prompts} {which} prompts x {args.samples} reference samples ({length} "
          "tokens, temperature 1); gold harmlessness; estimate = mean over prompts of the per-prompt mean over "
          "disjoint pools of size n (+- standard error over prompts)\n")
    print(f"| run | KL(pi, pi_ref), self-normalised over the {args.samples} draws | "
          + " | ".join(f"n = {n}" for n in sizes) + f" | n = {args.samples} minus n = 8 | jackknife, n = 8 | "
          "evaluated gold, these prompts | evaluated gold, all prompts |")
    print("| --- | ---: | " + " | ".join("---:" for _ in sizes) + " | ---: | ---: | ---: | ---: |")
    for run in args.runs:
        run_config = load_run_config(run)
        policy = load_policy(storage.path(run) / "policy.npz", upper, trainable_for(run_config))
        placed = sharding.put_params(upper_config, policy, mesh)
        log_probs = policy_eval.batched_sequence_log_probs(upper_config, placed, tokens, completion, attention,
                                                           inputs_hidden=hidden, mesh=mesh)
        log_ratio = (np.asarray(log_probs, np.float64) - reference_log_probs).reshape(args.prompts, args.samples)
        weights = np.exp(log_ratio - log_ratio.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        kl = float(np.mean((weights * log_ratio).sum(-1)))  # self-normalised E_pi log pi/pi_ref over the S draws
        estimates = {n: pool_estimates(log_ratio, reward, n) for n in sizes}
        evaluated = json.loads((pathlib.Path(run) / "eval.json").read_text())["evaluation"]
        per_prompt = np.asarray(evaluated["judges"]["harmlessness"]["per_prompt"]["expected_win_rate"])
        cells = [f"{e.mean():.3f} +- {e.std(ddof=1) / np.sqrt(len(e)):.3f}" for e in estimates.values()]
        gap = estimates[args.samples] - estimates[8]
        jackknife = pool_estimates(log_ratio, reward, 8, jackknife_estimate)
        print(f"| {pathlib.Path(run).name} | {kl:.3f} | " + " | ".join(cells)
              + f" | {gap.mean():+.4f} +- {gap.std(ddof=1) / np.sqrt(len(gap)):.4f} | "
              f"{jackknife.mean():.3f} +- {jackknife.std(ddof=1) / np.sqrt(len(jackknife)):.3f} | "
              f"{per_prompt[positions].mean():.3f} | {evaluated['expected_win_rate']['harmlessness']:.3f} |")


if __name__ == "__main__":
    main()
