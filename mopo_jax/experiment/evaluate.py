"""Evaluating a trained run (``mopo eval``): implicit preference accuracy on held-out human pairs, the judges' win
rates of the policy's samples against the reference's, the KL to the reference, MOPO's constraint verdict and the
dual's calibration, written to ``RUN_DIR/eval.json``."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from mopo_jax import storage
from mopo_jax.experiment.config import ExperimentConfig
from mopo_jax.experiment.hh_rlhf import (base_model, cache_path, end_of_turn_and_pad, experiment_mesh,
                                         feature_batch_size, lower_activations, method_of, prepare_data,
                                         preference_models, split_model, trainable_for)
from mopo_jax.experiment.progress import log
from mopo_jax.experiment.run_dir import EVAL_OVERRIDE_FIELDS, as_plain, load_policy, load_run_config
from mopo_jax.parallel import sharding


def eval_prompt_rows(objective: np.ndarray, count: int, prompt_tokens: np.ndarray | None = None,
                     num_objectives: int = 2) -> np.ndarray:
    """Rows of the eval split whose prompts are sampled for the win rates: an equal share from each objective's pairs
    (the split lists one objective after the other, so a plain prefix would judge only helpfulness prompts). When
    every pair sits under objective 0 (datasets labelled for every objective on each pair, or one objective) and
    ``prompt_tokens`` are given: the first ``count`` distinct prompts."""
    if prompt_tokens is not None and (objective == 0).all():
        _, first = np.unique(np.asarray(prompt_tokens), axis=0, return_index=True)
        return np.sort(first)[:count]
    per_objective = [np.flatnonzero(objective == k) for k in range(num_objectives)]
    share = count // len(per_objective)
    rows = [r[:share + (k < count % len(per_objective))] for k, r in enumerate(per_objective)]
    return np.sort(np.concatenate(rows))


def _reference_eval_cache(config: ExperimentConfig, model, prompt_tokens, prompt_mask, eos_id: int, pad_id: int,
                          eval_pairs, eval_hidden, upper_config, upper, mesh):
    """What every run's evaluation shares, computed once per evaluation setting: the reference's responses to the
    eval prompts (sampled with the win-rate key of :func:`policy_eval.sampling_keys`, the policies' common random
    numbers) and the reference's log-probabilities of the held-out pairs (its top blocks ``upper`` over
    ``eval_hidden``, the frozen blocks' activations of the pairs, when only the top blocks train)."""
    from mopo_jax.evaluation import policy_eval
    from mopo_jax.models.generation import SAMPLER_VERSION

    path = cache_path(config, "eval_reference", prompts=np.asarray(prompt_tokens).tolist(),
                       eval=dataclasses.asdict(config.eval), top=config.model.trainable_top_layers,
                       sampler=SAMPLER_VERSION)

    def build(write):
        model_config, params = model
        log("reference responses and held-out log-probabilities for evaluation")
        responses, response_mask = policy_eval.generate_responses(
            model_config, params, prompt_tokens, prompt_mask, config.eval.max_new_tokens,
            policy_eval.sampling_keys(jax.random.PRNGKey(config.eval.seed))[0], temperature=config.eval.temperature,
            top_p=config.eval.top_p, eos_id=eos_id, pad_id=pad_id, batch_size=config.eval.batch_size, mesh=mesh,
            num_samples=config.eval.samples_per_prompt)
        cached = {"responses": responses, "response_mask": response_mask}
        cached["pair_log_probs"] = policy_eval.pair_log_probs(
            upper_config, upper, eval_pairs, config.eval.batch_size, inputs_hidden=eval_hidden,
            completion_start=config.data.max_prompt_tokens, mesh=mesh)
        if write:
            storage.save_arrays(path, cached)
        return cached

    return storage.cached_stage("eval-reference", path.exists, build, lambda: storage.load_arrays(path),
                                everywhere=True)


def _reference_eval_features(config: ExperimentConfig, prompt_tokens, prompt_mask, reference, feature_fn, mesh):
    """The judges' features (``feature_fn``, layer ``preference.feature_layer`` of the base model) of the reference's
    eval responses ``reference`` (:func:`_reference_eval_cache`), computed once. Keyed by the mesh and the process
    count too: the policy's features are computed on the evaluation's mesh, and a response the policy shares with
    the reference (common random numbers) must get bit-identical features on both sides to score as the exact tie it
    is; another mesh may round differently."""
    from mopo_jax.evaluation import policy_eval

    responses, response_mask = reference["responses"], reference["response_mask"]
    layout = None if mesh is None else dict(mesh.shape)
    path = cache_path(config, "eval_reference_features", responses=np.asarray(responses).tolist(),
                       response_mask=np.asarray(response_mask).tolist(), prompts=np.asarray(prompt_tokens).tolist(),
                       feature_layer=config.preference.feature_layer, mesh=layout, processes=jax.process_count(),
                       platform=jax.default_backend())

    def build(write):
        samples = config.eval.samples_per_prompt
        rows = policy_eval.response_rows(np.repeat(prompt_tokens, samples, axis=0),
                                         np.repeat(prompt_mask, samples, axis=0), responses, response_mask)
        features = {"features": np.asarray(feature_fn(*rows), np.float32)}
        if write:
            storage.save_arrays(path, features)
        return features

    return storage.cached_stage("eval-reference-features", path.exists, build, lambda: storage.load_arrays(path),
                                everywhere=True)["features"]


def evaluate_run(run_dir: str, overrides=()) -> dict[str, Any]:
    """Evaluates a trained run and writes ``RUN_DIR/eval.json`` (``overrides`` of the stored config, e.g.
    ``mesh.fsdp=4``: generation and scoring split the prompts over the mesh's batch axes; the numbers do not depend
    on the mesh)."""
    from mopo_jax.evaluation import policy_eval
    from mopo_jax.evaluation.preference_models import response_features
    from mopo_jax.models import join_layers

    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if not any(key == f or key.startswith(f + ".") for f in EVAL_OVERRIDE_FIELDS):
            raise ValueError(f"{key} cannot change at evaluation (only eval.*, mesh.* and work_dir can): it is "
                             f"part of what {run_dir} trained; train another run")
    config = load_run_config(run_dir, overrides)
    mesh = experiment_mesh(config, check_training_batch=False)
    log(f"eval {run_dir}: data, model and judges")
    data = prepare_data(config)
    model = base_model(config, mesh)
    judges = preference_models(config, data, model, mesh)
    model_config, params = model
    lower_config, lower, upper_config, upper = split_model(config, model_config, params)
    policy_path = storage.path(config.run_dir) / "policy.npz"
    host_policy = load_policy(policy_path, upper, trainable_for(config))
    bad = [name for name, leaf in jax.tree_util.tree_leaves_with_path(host_policy) if not np.isfinite(leaf).all()]
    if bad:
        raise ValueError(f"{policy_path}: the policy holds non-finite parameters ({jax.tree_util.keystr(bad[0])} and "
                         f"{len(bad) - 1} more); this run is broken and is not evaluated")
    trained = sharding.put_params(upper_config, host_policy, mesh)
    policy = trained if lower is None else join_layers(lower, trained)

    end_of_turn, pad = end_of_turn_and_pad(config)
    eval_pairs = data["eval"]
    names = config.data.objective_names
    rows = eval_prompt_rows(eval_pairs["objective"], config.data.eval_prompts, eval_pairs["prompt_tokens"],
                            len(names))
    prompt_tokens, prompt_mask = eval_pairs["prompt_tokens"][rows], eval_pairs["prompt_mask"][rows]
    hidden = None if lower is None else lower_activations(config, lower_config, lower, eval_pairs, "eval", mesh)
    feature_layer = config.preference.feature_layer

    def feature_fn(tokens, attention, completion):
        return response_features(model_config, params, tokens, attention, completion, layer=feature_layer,
                                 batch_size=feature_batch_size(mesh), mesh=mesh)

    log(f"eval {run_dir}: the reference's samples and features (cached after the first run)")
    cached = _reference_eval_cache(config, model, prompt_tokens, prompt_mask, end_of_turn, pad,
                                   eval_pairs, hidden, upper_config, upper, mesh)
    reference_features = _reference_eval_features(config, prompt_tokens, prompt_mask, cached, feature_fn, mesh)
    log(f"eval {run_dir}: implicit preference accuracy on {len(eval_pairs['objective'])} held-out pairs")
    implicit = policy_eval.implicit_preference_accuracy(
        upper_config, trained, upper, eval_pairs, config.eval.batch_size,
        reference_log_probs=cached["pair_log_probs"], inputs_hidden=hidden,
        completion_start=config.data.max_prompt_tokens, mesh=mesh, objective_names=names)
    log(f"eval {run_dir}: {config.eval.samples_per_prompt} samples on each of {len(rows)} prompts, judged "
         "against the reference's")
    settings = policy_eval.EvalSettings(
        max_new_tokens=config.eval.max_new_tokens, temperature=config.eval.temperature, top_p=config.eval.top_p,
        samples_per_prompt=config.eval.samples_per_prompt, batch_size=config.eval.batch_size, eos_id=end_of_turn,
        pad_id=pad)
    evaluation = policy_eval.evaluate_policy(
        model_config, policy, params, settings, prompt_tokens=prompt_tokens, prompt_mask=prompt_mask,
        judges={k: judges["models"][f"judge_{k}"] for k in range(len(names))}, feature_fn=feature_fn,
        objective_names=names, rng=jax.random.PRNGKey(config.eval.seed), mesh=mesh,
        reference=policy_eval.ReferenceCache(responses=(cached["responses"], cached["response_mask"]),
                                             features=reference_features),
    )
    evaluation = dataclasses.replace(evaluation, implicit=implicit)
    # On one objective MOPO has no secondary, so no threshold to judge.
    threshold = config.method.threshold if method_of(config).knob == "threshold" and len(names) > 1 else None
    # MOPO's constraint is the policy's expected win rate over the reference under the harmlessness preference: on
    # held-out prompts, under the judge (the gold model of the gold protocol), decided by its 95% interval (see
    # mopo_jax.evaluation.paired.constraint_verdict); the pairwise value on held-out human pairs is the offline
    # estimate the pairwise method trains on, reported beside it.
    constraint_verdict = constraint_met = constraint_met_pairs = None
    if threshold is not None:
        from mopo_jax.evaluation import paired

        harmless = names[1]
        interval = paired.Interval(evaluation.expected_win_rate[harmless],
                                   *evaluation.expected_win_rate_interval[harmless])
        constraint_verdict = paired.constraint_verdict(interval, threshold)
        constraint_met = constraint_verdict == "met"
        constraint_met_pairs = bool(implicit["constraint_values"][1] >= threshold)
    train_summary_path = storage.path(run_dir) / "train.json"
    train_summary = storage.load_json(train_summary_path) if train_summary_path.exists() else {}
    dual_calibration = None
    if train_summary.get("dual_final"):
        from mopo_jax.evaluation import paired

        harmless = names[1]
        dual_calibration = paired.calibration(
            train_summary["dual_final"]["estimates"][0], train_summary["dual_final"]["stderr"][0],
            evaluation.expected_win_rate[harmless], evaluation.expected_win_rate_interval[harmless])
    payload = {
        "name": os.path.basename(os.path.normpath(run_dir)),
        "method": config.method.name,
        "protocol": config.preference.protocol,
        "config": as_plain(dataclasses.asdict(config)),
        "seed": config.seed,
        "evaluation": evaluation.as_dict(),
        "threshold": threshold,
        "constraint_verdict": constraint_verdict,
        "constraint_met": constraint_met,
        "constraint_met_pairs": constraint_met_pairs,
        "dual_calibration": dual_calibration,
        "preference_models": judges["summary"],
    }
    if storage.is_primary():
        storage.save_json(storage.path(run_dir) / "eval.json", payload)
    log(f"eval {run_dir}: wrote eval.json")
    return payload
