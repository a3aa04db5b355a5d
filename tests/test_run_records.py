"""A run's files say what happened: a constraint or an objective without a single labelled pair stops the run before
its directory is claimed, a rerun of a finished run keeps its final metrics, and the stored config records the steps
the run was trained to (the `tiny` profile, real SmolLM2 and HH-RLHF pairs, through `mopo train`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from lm_assets import HH_DATA as DATA, needs_hh_data, needs_smollm2

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "experiments" / "configs" / "hh_tiny.yaml"

pytestmark = [needs_hh_data, needs_smollm2]


def _train(work_dir, run_dir, *overrides):
    from mopo_jax.cli import main

    return main(["train", "--config", str(CONFIG), f"work_dir={work_dir}", f"data.source={DATA}",
                 f"run_dir={run_dir}", "training.batch_pairs=8", "training.save_every=2", *overrides])


@pytest.mark.parametrize("method,missing", [("mopo_pairwise", "harmlessness"), ("dpo_harmless", "harmlessness")])
def test_an_objective_without_labelled_pairs_stops_the_run(tiny_work_dir, tmp_path, capsys, method, missing):
    run_dir = tmp_path / "run"
    assert _train(tiny_work_dir, run_dir, f"method.name={method}", "data.subsets=[helpful-base]") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and missing in errors[0] and "data.subsets" in errors[0] and method in errors[0], errors
    assert not run_dir.exists()  # nothing claimed: the fixed command runs without --force-new


def test_reruns_keep_the_final_metrics_and_the_config_records_the_steps(tiny_work_dir, tmp_path):
    run_dir = tmp_path / "run"
    assert _train(tiny_work_dir, run_dir, "method.name=dpo_helpful", "training.steps=2") == 0
    first = json.loads((run_dir / "train.json").read_text())
    assert first["final_metrics"]["step"] == 2
    assert _train(tiny_work_dir, run_dir, "method.name=dpo_helpful", "training.steps=2") == 0  # nothing left to do
    again = json.loads((run_dir / "train.json").read_text())
    assert again["final_metrics"] == first["final_metrics"]
    assert _train(tiny_work_dir, run_dir, "method.name=dpo_helpful", "training.steps=3") == 0  # extended
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["training"]["steps"] == 3
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert json.loads((run_dir / "train.json").read_text())["final_metrics"]["step"] == 3


def test_eval_evaluates_every_run_it_can_and_names_the_others(tiny_work_dir, tmp_path, capsys):
    from mopo_jax.cli import main

    run_dir, untrained = tmp_path / "run", tmp_path / "untrained"
    assert _train(tiny_work_dir, run_dir, "method.name=dpo_helpful", "training.steps=1") == 0
    untrained.mkdir()
    assert main(["eval", str(untrained), str(run_dir)]) == 2
    errors = capsys.readouterr().err
    assert f"{untrained}:" in errors and "1 of 2 runs not evaluated" in errors
    assert (run_dir / "eval.json").exists()  # the run after the broken one was evaluated

    # How it is evaluated may change (eval.*), what it trained may not.
    assert main(["eval", str(run_dir), "eval.max_new_tokens=4"]) == 0
    assert json.loads((run_dir / "eval.json").read_text())["evaluation"]["settings"]["max_new_tokens"] == 4
    assert main(["eval", str(run_dir), "optimizer.learning_rate=1.0"]) == 2
    assert "optimizer.learning_rate cannot change at evaluation" in capsys.readouterr().err


def test_one_job_per_run_directory(tiny_work_dir, tmp_path, capsys):
    import os
    import socket
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    lock = tmp_path / "run.lock"
    # A live job holds it: the second one stops, naming it, and touches nothing.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "holder": "mopo train x"}))
        assert _train(tiny_work_dir, run_dir, "method.name=dpo_helpful", "training.steps=1") == 2
        error = capsys.readouterr().err
        assert f"pid {holder.pid}" in error and "mopo train x" in error and str(lock) in error
        assert not run_dir.exists() and lock.exists()
    finally:
        holder.kill()
        holder.wait()
    # Its process is gone (a kill -9): the lock is stale, taken over with a warning, and released at the end.
    with pytest.warns(UserWarning, match="taking over the lock"):
        assert _train(tiny_work_dir, run_dir, "method.name=dpo_helpful", "training.steps=1") == 0
    assert (run_dir / "policy.npz").exists() and not lock.exists()
    assert os.path.exists(run_dir / "config.yaml")


@pytest.mark.parametrize("override,key", [("preference.feature_layer=999", "preference.feature_layer"),
                                          ("model.trainable_top_layers=999", "model.trainable_top_layers"),
                                          ("data.max_prompt_tokens=100000", "data.max_prompt_tokens")])
def test_settings_that_do_not_fit_the_model_stop_before_it_runs(tiny_work_dir, tmp_path, capsys, override, key):
    run_dir = tmp_path / "run"
    assert _train(tiny_work_dir, run_dir, "method.name=dpo_helpful", override) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and key in errors[0] and "smollm2" in errors[0], errors
    assert not run_dir.exists()


def test_an_unknown_model_name_is_one_line(tiny_work_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _train(tiny_work_dir, run_dir, "method.name=dpo_helpful", "model.name=smollm3-typo") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "smollm3-typo" in errors[0] and "model" in errors[0], errors
    assert not run_dir.exists()


def test_a_source_too_small_for_the_splits(tmp_path, capsys):
    """A source whose prompts leave a split empty stops with one line naming the source and the split (not a
    reshape error); a split smaller than its cap is reported with the cap's key."""
    import gzip

    from mopo_jax.configs import load_config
    from mopo_jax.data.hh_rlhf import HHRLHFWarning
    from mopo_jax.experiment.config import ExperimentConfig
    from mopo_jax.experiment.hh_rlhf import prepare_data

    small = tmp_path / "hh3"
    small.mkdir()
    for subset in ("helpful-base", "harmless-base"):
        with gzip.open(Path(DATA) / f"{subset}-test.jsonl.gz", "rt") as source:
            lines = [next(source) for _ in range(3)]
        with gzip.open(small / f"{subset}-test.jsonl.gz", "wt") as out:
            out.writelines(lines)
    run_dir = tmp_path / "run"
    assert _train(tmp_path / "work", run_dir, f"data.source={small}", "method.name=dpo_helpful") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and str(small) in errors[0] and "split has no pair" in errors[0], errors
    assert not run_dir.exists()

    config = load_config(ExperimentConfig, str(CONFIG), [f"work_dir={tmp_path / 'work2'}", f"data.source={DATA}",
                                                         "data.policy_pairs=100000"])
    with pytest.warns(HHRLHFWarning, match=r"data.policy_pairs=100000: the policy_train split has only \d+"):
        prepare_data(config)


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A full disk while a file (e.g. the policy) is written: the old file stays whole and the partial temporary
    file is removed, not left taking the space."""
    import errno

    from mopo_jax import storage

    target = tmp_path / "policy.npz"
    storage.save_bytes(target, b"old")
    cls = type(storage.path(target))
    original = cls.open

    class FullDisk:  # a file that takes half of the first write, then runs out of space
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()
            return False

    def full_disk(self, mode="r", *args, **kwargs):
        handle = original(self, mode, *args, **kwargs)
        return FullDisk(handle) if "w" in mode else handle

    monkeypatch.setattr(cls, "open", full_disk)
    with pytest.raises(OSError, match="No space left"):
        storage.save_bytes(target, b"x" * 4096)
    with pytest.raises(OSError, match="No space left"):  # a streamed write (mopo export's weights) alike
        storage.save_streamed(target, lambda handle: handle.write(b"y" * 4096))
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["policy.npz"]


def test_the_policy_file_holds_what_was_trained_and_loads_onto_the_frozen_part(tmp_path):
    """policy.npz holds the trained entries (top blocks: not the frozen embedding) or the LoRA adapters; loading
    merges them onto the model's frozen part (LoRA: W + alpha/r a b, computed here in NumPy). A whole-model file
    (a method that does not train, an older run) loads as it is; a file of other parameters is a named error."""
    from mopo_jax import storage
    from mopo_jax.experiment.run_dir import load_policy
    from mopo_jax.training import TrainableConfig

    rng = np.random.default_rng(0)
    upper = {"embed": rng.normal(size=(5, 2)), "layers": {"wq": rng.normal(size=(1, 2, 2))},
             "final_norm": {"scale": rng.normal(size=2)}}
    top = TrainableConfig(frozen=("embed",))
    trained = {"layers/wq": rng.normal(size=(1, 2, 2)), "final_norm/scale": rng.normal(size=2)}
    storage.save_arrays(tmp_path / "top.npz", trained)
    loaded = load_policy(tmp_path / "top.npz", upper, top)
    np.testing.assert_array_equal(loaded["embed"], upper["embed"])
    np.testing.assert_allclose(loaded["layers"]["wq"], trained["layers/wq"], rtol=1e-6)

    lora = TrainableConfig(lora_rank=1, lora_alpha=2.0, lora_targets=("wq",))
    a, b = rng.normal(size=(1, 2, 1)), rng.normal(size=(1, 1, 2))
    storage.save_arrays(tmp_path / "lora.npz", {"wq/a": a, "wq/b": b})
    loaded = load_policy(tmp_path / "lora.npz", upper, lora)
    np.testing.assert_allclose(loaded["layers"]["wq"], upper["layers"]["wq"] + 2.0 * a @ b, rtol=1e-5)
    np.testing.assert_array_equal(loaded["embed"], upper["embed"])

    whole = {"embed": upper["embed"] + 1, "layers/wq": upper["layers"]["wq"],
             "final_norm/scale": upper["final_norm"]["scale"]}
    storage.save_arrays(tmp_path / "whole.npz", whole)
    np.testing.assert_array_equal(load_policy(tmp_path / "whole.npz", upper, top)["embed"], upper["embed"] + 1)
    storage.save_arrays(tmp_path / "other.npz", {"layers/wk": a})
    with pytest.raises(ValueError, match="other.npz: not this run's trained parameters"):
        load_policy(tmp_path / "other.npz", upper, top)
