"""The HH experiment on any mesh, through the command line: the same per-step losses on every mesh of 8 simulated
devices and `mopo eval` giving the same numbers on two meshes (the `tiny` profile, real SmolLM2 and HH-RLHF pairs).
Several processes of one job: tests/test_multiprocess_experiment.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lm_assets import needs_hh_data, needs_smollm2
from processes import run_python
from tiny_runs import STEPS, common, logged_losses

MESHES = ("fsdp=4,tensor=2", "data=2,fsdp=4")

pytestmark = [needs_hh_data, needs_smollm2]


# MOPO on every mesh trained through `mopo train` in one child process (8 simulated devices), what a run compiled
# and placed released before the next, then the fsdp=1 MOPO run evaluated on two meshes (each eval.json kept).
TRAIN_AND_EVALUATE = """
import json, shutil, sys
from pathlib import Path

from memory import free_memory
from mopo_jax.cli import main

spec = json.loads(sys.argv[1])
for run_dir, mesh, arguments in spec["train"]:
    assert main(["train", *arguments, f"run_dir={run_dir}", "--mesh", mesh]) == 0
    free_memory()
for run_dir, mesh, kept in spec["eval"]:
    assert main(["eval", run_dir, "--mesh", mesh]) == 0
    shutil.copy(Path(run_dir) / "eval.json", kept)
    free_memory()
"""


def _slug(mesh: str) -> str:
    return mesh.replace(",", "_").replace("=", "")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_work_dir):
    """The runs of every mesh and the two evaluations, made apart from this worker: the runs' programs and placed
    models peak at about 3 GB above what the worker held, which the child hands back when it exits."""
    root = tmp_path_factory.mktemp("mesh")
    out, train = {}, []
    # MOPO only: the baselines' sharded step is compared with one device in tests/test_sharding.py (dpo on
    # data=2,fsdp=2,tensor=2), and three more runs here cost about a minute of the suite's 15.
    for method in ("mopo_pairwise",):
        for mesh in ("fsdp=1", *MESHES):
            run_dir = root / f"{method}_{_slug(mesh)}"
            train.append([str(run_dir), mesh, [*common(tiny_work_dir), f"method.name={method}"]])
            out[method, mesh] = run_dir
    evaluated = {mesh: root / f"eval_{_slug(mesh)}.json"
                 for mesh in ("fsdp=1", "data=2,fsdp=4")}
    spec = {"train": train, "eval": [[str(out["mopo_pairwise", "fsdp=1"]), mesh, str(path)]
                                     for mesh, path in evaluated.items()]}
    run_python(TRAIN_AND_EVALUATE, [json.dumps(spec)], timeout_s=900, what="the mesh experiment's runs")
    return out, evaluated


@pytest.mark.parametrize("method", ["mopo_pairwise"])
@pytest.mark.parametrize("mesh", MESHES)
def test_same_losses_on_every_mesh(runs, method, mesh):
    run_dirs, _ = runs
    reference, steps = logged_losses(run_dirs[method, "fsdp=1"])
    losses, other_steps = logged_losses(run_dirs[method, mesh])
    assert steps == other_steps == list(range(1, STEPS + 1))
    # Relative 1e-5: MOPO pairwise's loss is ~40-70 here, where float32's spacing is already ~4e-6 and a mesh only
    # reorders the sums.
    np.testing.assert_allclose(losses, reference, rtol=1e-5, atol=1e-6)
    # The runs learn: a mesh that silently dropped the gradient would repeat the first loss.
    assert np.ptp(reference) > 1e-3


def test_eval_same_numbers_on_two_meshes(runs):
    _, evaluated = runs
    results = [json.loads(path.read_text())["evaluation"] for path in evaluated.values()]
    first, second = results
    for name in first["win_rate"]:
        assert first["win_rate"][name] == pytest.approx(second["win_rate"][name], abs=1e-6)
        assert first["expected_win_rate"][name] == pytest.approx(second["expected_win_rate"][name], abs=1e-6)
    assert first["kl"] == pytest.approx(second["kl"], abs=1e-4)
    for name, values in first["implicit"]["per_objective"].items():
        assert values["accuracy"] == pytest.approx(second["implicit"]["per_objective"][name]["accuracy"], abs=1e-6)
    assert first["response_length"] == second["response_length"]


