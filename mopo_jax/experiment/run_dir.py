"""A run directory holds one run: its config written once (a rerun must match it, or move it aside with
``force_new``), the trained policy's parameters, and nothing of another configuration."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np
import yaml

from mopo_jax import storage
from mopo_jax.experiment.config import ExperimentConfig
from mopo_jax.experiment.progress import log
from mopo_jax.parallel import sharding


#: Fields that may differ between the runs of one run directory: where things live, how the devices are arranged,
#: how long it trains and how it is evaluated. Anything else defines another run.
RUN_INDEPENDENT_FIELDS = ("run_dir", "work_dir", "mesh", "eval", "training.steps", "training.save_every")


#: What ``mopo eval`` may override in a run's stored config: how it is evaluated, never what was trained.
EVAL_OVERRIDE_FIELDS = ("work_dir", "mesh", "eval")


def _flat_fields(mapping: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(_flat_fields(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_config_diff(stored: dict, new: dict) -> list[str]:
    """``"field: stored -> new"`` for every field (dotted) that makes ``new`` another run than ``stored``."""
    def keep(name):
        return not any(name == f or name.startswith(f + ".") for f in RUN_INDEPENDENT_FIELDS)

    old, fresh = _flat_fields(stored), _flat_fields(new)
    return [f"{name}: {old.get(name)!r} -> {fresh.get(name)!r}" for name in sorted(set(old) | set(fresh))
            if keep(name) and old.get(name) != fresh.get(name)]


def _stored_config_diff(config: ExperimentConfig) -> list[str] | None:
    """How ``config`` differs from the run stored in its ``run_dir`` (``[]``: the same run), or ``None`` when the
    directory holds no run yet."""
    stored_path = storage.path(config.run_dir) / "config.yaml"
    if not stored_path.exists():
        return None
    return run_config_diff(yaml.safe_load(stored_path.read_text()) or {}, _plain_config(config))


def _plain_config(config: ExperimentConfig) -> dict:
    return json.loads(json.dumps(as_plain(dataclasses.asdict(config))))  # tuples as lists, as YAML stores them


def as_plain(value):
    if isinstance(value, dict):
        return {k: as_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_plain(v) for v in value]
    return value


def check_run_dir(config: ExperimentConfig, force_new: bool) -> list[str] | None:
    """Raises ``ValueError`` (touching nothing) when ``run_dir`` holds a run of another configuration and
    ``force_new`` does not ask to move it aside; returns :func:`_stored_config_diff`."""
    diff = _stored_config_diff(config)
    if not diff:
        return diff
    if not force_new:
        raise ValueError(f"{config.run_dir} holds a run of another configuration ({'; '.join(diff)}); resume it "
                         "with its own config, choose a new run_dir, or pass --force-new to move it aside")
    if not storage.is_local(config.run_dir):
        raise ValueError(f"--force-new cannot move a remote run directory ({config.run_dir}); choose a new run_dir")
    return diff


def claim_run_dir(config: ExperimentConfig, force_new: bool) -> None:
    """A run directory holds one run: its config is written once; a rerun must match it (resume), or, with
    ``force_new``, the old run is moved aside first. Raises ``ValueError`` (touching nothing) on a mismatch. The
    stored config follows the settings that do not make another run (``training.steps``, the mesh, ...), so it
    says what the run was last trained with."""
    if check_run_dir(config, force_new):  # another run, and force_new (checked) moves it aside
        if storage.is_primary():
            aside = f"{os.path.normpath(config.run_dir)}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(config.run_dir, aside)
            log(f"moved the previous run in {config.run_dir} to {aside}")
        storage.barrier("run-dir-moved")
    if storage.is_primary():
        storage.save_text(storage.path(config.run_dir) / "config.yaml",
                          yaml.safe_dump(_plain_config(config), sort_keys=False))


def load_run_config(run_dir: str, overrides=()) -> ExperimentConfig:
    """The config stored in ``run_dir`` (with ``overrides``, e.g. another mesh for evaluation)."""
    from mopo_jax.configs import config_from_mapping

    path = storage.path(run_dir) / "config.yaml"
    if not path.exists():
        raise ValueError(f"{path} does not exist: {run_dir} is not a trained run directory")
    return config_from_mapping(ExperimentConfig, yaml.safe_load(path.read_text()) or {}, os.fspath(path),
                               [f"run_dir={run_dir}", *overrides])


def save_policy(path, params) -> None:
    """Writes a policy's parameters (gathered from the mesh on every process; process 0 writes): what the run trained
    (the train state's ``params``: the trained entries, or the LoRA adapters), or a whole model for a method that
    builds its policy without training."""
    host = sharding.to_host(params)
    flat = {_key(keypath): leaf for keypath, leaf in jax.tree_util.tree_leaves_with_path(host)}
    if storage.is_primary():
        storage.save_arrays(path, flat)
    storage.barrier("policy-saved")


def _key(keypath) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in keypath)


def load_policy(path, upper, trainable=None):
    """The policy of a run as host arrays in the structure of ``upper`` (the model's trained blocks' parameters, or
    the whole model's): a saved trained part (:class:`mopo_jax.training.TrainableConfig`'s trained entries, or
    LoRA adapters) merged onto ``upper``'s frozen part, or a saved whole ``upper`` as it is (a method that does not
    train, or a run saved before the policy file held only what was trained)."""
    from mopo_jax.training import trainable as trainable_lib

    stored = storage.load_arrays(path)
    whole = {_key(k) for k, _ in jax.tree_util.tree_leaves_with_path(upper)}
    if set(stored) == whole:
        return jax.tree_util.tree_map_with_path(lambda keypath, leaf: stored[_key(keypath)], upper)
    if trainable is None:
        raise ValueError(f"{path}: holds {len(stored)} arrays that are not the model's parameters")
    like = jax.eval_shape(lambda params, key: trainable_lib.split(trainable, params, key)[0], upper,
                          jax.random.PRNGKey(0))
    expected = {_key(k) for k, _ in jax.tree_util.tree_leaves_with_path(like)}
    if set(stored) != expected:
        missing, extra = sorted(expected - set(stored)), sorted(set(stored) - expected)
        raise ValueError(f"{path}: not this run's trained parameters (missing {missing[:4]}, unexpected "
                         f"{extra[:4]}); was it trained with another model or model.* setting?")
    trained = jax.tree_util.tree_map_with_path(lambda keypath, leaf: stored[_key(keypath)], like)
    merged = trainable_lib.merge(trainable, trainable_lib.base_of(trainable, upper), trained)
    return jax.tree.map(np.asarray, merged)
