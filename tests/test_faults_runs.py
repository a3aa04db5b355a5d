"""Runs that cannot lie: a non-finite step stops the run without saving it, invalid settings stop before anything
loads, a run directory holds one configuration, and a broken run is kept off the Pareto front."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mopo_jax import policy_objectives as po
from mopo_jax.models import get_preset, init_params
from mopo_jax.training import CheckpointConfig, LoopConfig, sharding, train
from mopo_jax.training.loop import NonFiniteError
from mopo_jax.training.train_step import OptimizerConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "experiments" / "configs" / "hh_tiny.yaml"
MODEL = get_preset("tiny", dtype="float32", param_dtype="float32")


@dataclasses.dataclass(frozen=True)
class PoisonedAfter(po.DPO):
    """DPO whose loss turns NaN from the state's step ``after`` on: a run made to go non-finite at a known step."""

    after: int = 2

    def init(self):
        return {"steps": jnp.zeros((), jnp.int32)}

    def update(self, state, batch, aux):
        return {"steps": state["steps"] + 1}

    def loss(self, state, batch, log_probs):
        terms, metrics = super().loss(state, batch, log_probs)
        poison = jnp.where(state["steps"] >= self.after, jnp.nan, 0.0)
        return terms._replace(total=terms.total + poison), metrics


def _batch(prompts=4, length=12):
    rng = np.random.default_rng(0)
    completion = np.zeros((prompts, 2, length), np.int32)
    completion[..., 6:] = 1
    return {
        "tokens": rng.integers(0, MODEL.vocab_size, (prompts, 2, length)).astype(np.int32),
        "completion_mask": completion,
        "attention_mask": np.ones((prompts, 2, length), np.int32),
        "preference_probs": np.ones((prompts, 2), np.float32),
        "label_mask": np.ones((prompts, 2), bool),
    }


def _batch_at(position, state):
    """Copies of :func:`_batch`, one per position."""
    return _batch(), {"index": position.get("index", 0) + 1}


def _one_device():
    return sharding.make_mesh(sharding.MeshConfig(fsdp=1), jax.devices()[:1])


def test_non_finite_step_stops_without_saving_it(tmp_path):
    config = TrainConfig(objective=PoisonedAfter(after=2), optimizer=OptimizerConfig(learning_rate=1e-3))
    mesh = _one_device()
    params = init_params(MODEL, jax.random.PRNGKey(0))
    metrics_path = tmp_path / "metrics.jsonl"
    with pytest.raises(NonFiniteError, match=r"step 3 produced non-finite .*loss.*newest checkpoint is step 2"):
        train(MODEL, config, params, _batch_at, mesh,
              LoopConfig(6, CheckpointConfig(str(tmp_path / "ckpt"), save_every=1), metrics_path=str(metrics_path)))
    saved = sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())
    assert saved == [1, 2]  # nothing of the non-finite step 3
    steps = [json.loads(line)["step"] for line in metrics_path.read_text().splitlines()]
    assert steps == [1, 2]
    assert all(np.isfinite(json.loads(line)["loss"]) for line in metrics_path.read_text().splitlines())


@pytest.mark.parametrize("override, field", [
    ("optimizer.learning_rate=.inf", "learning_rate"), ("optimizer.learning_rate=-1.0", "learning_rate"),
    ("dpo.beta=-0.1", "DPO.beta"), ("mopo.tau=0", "MOPOConfig.tau"), ("training.steps=-1", "training.steps"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens"), ("onpolicy.temperature=-1.0", "onpolicy.temperature"),
    ("onpolicy.policy_step=bc", "onpolicy.policy_step"),
    ("data.policy_pairs=0", "data.policy_pairs"), ("preference.l2_grid=[nan]", "preference.l2_grid"),
    ("preference.cv_folds=0", "preference.cv_folds"), ("preference.feature_layer=0", "preference.feature_layer"),
    ("method.weights=[nan, nan]", "method.weights"), ("method.weights=[0, 0]", "method.weights"),
])
def test_invalid_settings_stop_before_anything_loads(tmp_path, capsys, override, field):
    from mopo_jax.cli import main

    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(TINY), f"run_dir={run_dir}", f"work_dir={tmp_path / 'work'}",
                 override]) == 2
    error = capsys.readouterr().err
    assert field in error and error.count("\n") == 1  # one line, no traceback
    assert not run_dir.exists() and not (tmp_path / "work").exists()


def test_algorithm_1_refuses_tempered_candidates(tmp_path, capsys):
    """Algorithm 1's estimates take its candidates as reference draws: a temperature other than 1 stops the run
    before anything loads (the other methods never sample candidates, so the setting does not concern them)."""
    from mopo_jax.cli import main

    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(TINY), f"run_dir={run_dir}", f"work_dir={tmp_path / 'work'}",
                 "method.name=mopo_onpolicy", "onpolicy.temperature=0.7"]) == 2
    error = capsys.readouterr().err
    assert "onpolicy.temperature=0.7" in error and error.count("\n") == 1
    assert not run_dir.exists() and not (tmp_path / "work").exists()


def test_an_empty_config_file_is_an_error(tmp_path, capsys):
    from mopo_jax.cli import main

    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert main(["train", "--config", str(empty), f"run_dir={tmp_path / 'run'}"]) == 2
    error = capsys.readouterr().err
    assert str(empty) in error and "empty" in error and not (tmp_path / "run").exists()


def test_a_run_directory_holds_one_configuration(tmp_path, capsys):
    from mopo_jax.cli import main
    from mopo_jax.configs import load_config
    from mopo_jax.experiment.config import ExperimentConfig
    from mopo_jax.experiment.run_dir import claim_run_dir

    run_dir = tmp_path / "run"
    common = [f"run_dir={run_dir}", f"work_dir={tmp_path / 'work'}"]
    first = load_config(ExperimentConfig, str(TINY), common)
    claim_run_dir(first, force_new=False)
    stored = (run_dir / "config.yaml").read_bytes()
    (run_dir / "checkpoints").mkdir()

    # Resuming the same configuration (another mesh or more steps do not make another run) is silent; the stored
    # config then records the steps the run is trained to.
    claim_run_dir(load_config(ExperimentConfig, str(TINY), [*common, "mesh.fsdp=2", "training.steps=9"]), False)
    import yaml

    resumed = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resumed["training"]["steps"] == 9 and resumed["mesh"]["fsdp"] == 2
    claim_run_dir(first, force_new=False)
    assert (run_dir / "config.yaml").read_bytes() == stored

    # Another learning rate through the command line: exit 2, the diff named, nothing touched.
    assert main(["train", "--config", str(TINY), *common, "optimizer.learning_rate=2.0e-4"]) == 2
    error = capsys.readouterr().err
    assert "optimizer.learning_rate" in error and "--force-new" in error
    assert (run_dir / "config.yaml").read_bytes() == stored and (run_dir / "checkpoints").is_dir()

    # --force-new moves the old run aside (nothing lost) and claims the directory for the new configuration.
    other = load_config(ExperimentConfig, str(TINY), [*common, "method.name=dpo_pooled"])
    claim_run_dir(other, force_new=True)
    (aside,) = tmp_path.glob("run.replaced-*")
    assert (aside / "config.yaml").read_bytes() == stored and (aside / "checkpoints").is_dir()
    assert "dpo_pooled" in (run_dir / "config.yaml").read_text()


def test_a_broken_run_is_kept_off_the_front():
    from mopo_jax.evaluation.pareto import result_from_eval

    judge = {"win_rate": 0.5, "per_prompt": {"expected_win_rate": [0.6, 0.6]}}
    good = {"name": "a", "method": "dpo_helpful",
            "evaluation": {"judges": {"helpfulness": judge, "harmlessness": judge}, "per_prompt": {"kl": [0.1, 0.1]}}}
    assert result_from_eval(good)["helpfulness"] == 0.6
    broken = json.loads(json.dumps(good).replace("0.6, 0.6", "0.6, NaN"))
    with pytest.raises(ValueError, match="runs/a: eval.json holds non-finite helpfulness"):
        result_from_eval(broken, "runs/a")
    broken_kl = json.loads(json.dumps(good).replace("0.1]", "Infinity]"))
    with pytest.raises(ValueError, match="non-finite kl"):
        result_from_eval(broken_kl, "runs/a")


def test_pareto_refuses_impossible_win_rates_and_missing_runs(tmp_path, capsys):
    from mopo_jax.cli import main

    judge = {"win_rate": 0.5, "per_prompt": {"expected_win_rate": [0.6, 0.4]}}
    record = {"name": "a", "method": "dpo_helpful",
              "evaluation": {"judges": {"helpfulness": judge, "harmlessness": judge}, "per_prompt": {"kl": [0.1, 0.2]}}}
    good, impossible, judged, never = (tmp_path / name for name in ("good", "impossible", "judged", "never"))
    for directory, text in ((good, json.dumps(record)), (impossible, json.dumps(record).replace("0.6, 0.4", "7.5, 0.4")),
                            (judged, json.dumps(record).replace('"win_rate": 0.5', '"win_rate": -0.1'))):
        directory.mkdir()
        (directory / "eval.json").write_text(text)
    never.mkdir()  # trained, never evaluated
    out = str(tmp_path / "p.png")
    for run, words in ((impossible, "helpfulness per-prompt win rate 7.5"), (judged, "judged win rate -0.1"),
                       (never, "cannot read eval.json"), (tmp_path / "no-such-run", "cannot read eval.json")):
        assert main(["pareto", str(good), str(run), "--out", out]) == 2, run
        error = capsys.readouterr().err
        assert str(run) in error and words in error and error.count("\n") == 1, error
    with pytest.warns(UserWarning, match="skipping .*never"):
        assert main(["pareto", str(good), str(never), "--out", out, "--skip-missing"]) == 0


def test_metrics_hold_each_step_once_after_resumes(tmp_path):
    import shutil

    config = TrainConfig(objective=po.DPO(beta=0.1), optimizer=OptimizerConfig(learning_rate=1e-3))
    mesh = _one_device()
    params = init_params(MODEL, jax.random.PRNGKey(0))
    checkpoints = CheckpointConfig(str(tmp_path / "ckpt"), save_every=2)
    metrics_path = tmp_path / "metrics.jsonl"
    loop = LoopConfig(4, checkpoints, metrics_path=str(metrics_path))
    train(MODEL, config, params, _batch_at, mesh, loop)
    uninterrupted = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    # A crash after step 4's metrics reached the file but before its checkpoint was committed, plus a line torn
    # in the middle: the rerun resumes from step 2 and runs steps 3 and 4 again.
    shutil.rmtree(tmp_path / "ckpt" / "4")
    with open(metrics_path, "a") as handle:
        handle.write('{"step": 5, "lo')
    for _ in range(2):  # any number of resumes
        train(MODEL, config, params, _batch_at, mesh, loop)
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in uninterrupted], rtol=1e-6)


@dataclasses.dataclass(frozen=True)
class Frozen(po.DPO):
    """DPO on log-probabilities cut from the gradient: every step's gradient norm is exactly 0."""

    def loss(self, state, batch, log_probs):
        return super().loss(state, batch, jax.lax.stop_gradient(log_probs))


def test_a_gradient_norm_of_zero_is_reported(tmp_path):
    from mopo_jax.training.loop import ZeroGradientWarning

    config = TrainConfig(objective=Frozen(beta=0.1), optimizer=OptimizerConfig(learning_rate=1e-3))
    mesh = _one_device()
    with pytest.warns(ZeroGradientWarning, match="step 1: the gradient norm is exactly 0") as caught:
        train(MODEL, config, init_params(MODEL, jax.random.PRNGKey(0)), _batch_at, mesh, LoopConfig(3))
    assert sum(issubclass(w.category, ZeroGradientWarning) for w in caught) == 1  # once per run, not per step


def test_the_loop_hands_each_batch_the_state_it_will_update_and_calls_hooks_on_their_steps():
    """``next_batch(position, state)`` sees the state of the step it feeds (what on-policy data samples from), a
    ``None`` ends the data, and each hook runs on the steps of its period with that step's record and state."""
    from mopo_jax.training import Hook

    config = TrainConfig(objective=po.DPO(beta=0.1), optimizer=OptimizerConfig(learning_rate=1e-3))
    seen_steps, every_step, every_other = [], [], []

    def next_batch(position, state):
        seen_steps.append(int(jax.device_get(state.step)))
        return None if position.get("index", 0) == 3 else _batch_at(position, state)

    hooks = [Hook(lambda info: every_step.append((info.step, info.metrics["step"], int(info.state.step)))),
             Hook(lambda info: every_other.append(info.step), every=2)]
    state, history = train(MODEL, config, init_params(MODEL, jax.random.PRNGKey(0)), next_batch, _one_device(),
                           LoopConfig(5), hooks)
    assert seen_steps == [0, 1, 2, 3]  # the fourth call ended the data
    assert [r["step"] for r in history] == [1, 2, 3] and int(state.step) == 3
    assert every_step == [(1, 1, 1), (2, 2, 2), (3, 3, 3)] and every_other == [2]
    with pytest.raises(ValueError, match="Hook.every"):
        Hook(print, every=0)
    with pytest.raises(ValueError, match="log_every"):
        LoopConfig(3, log_every=0)
