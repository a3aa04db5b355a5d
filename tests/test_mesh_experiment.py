"""The HH experiment on any mesh, through the command line: the same per-step losses on every mesh of 8 simulated
devices and `mopo eval` giving the same numbers on two meshes (the `tiny` profile, real SmolLM2 and HH-RLHF pairs).
Several processes of one job: tests/test_multiprocess_experiment.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lm_assets import needs_hh_data, needs_smollm2
from tiny_runs import STEPS, common, logged_losses

MESHES = ("fsdp=4,tensor=2", "data=2,fsdp=4")

pytestmark = [needs_hh_data, needs_smollm2]







@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_work_dir, release_memory):
    """Every method x mesh trained in this process (8 simulated devices) through `mopo train`; what a run compiled
    and placed is released before the next (six runs' programs and placed models would hold about 9 GB)."""
    from mopo_jax.cli import main

    root = tmp_path_factory.mktemp("mesh")
    out = {}
    for method in ("dpo_helpful", "mopo_pairwise"):
        for mesh in ("fsdp=1", *MESHES):
            run_dir = root / f"{method}_{mesh.replace(',', '_').replace('=', '')}"
            assert main(["train", *common(tiny_work_dir), f"run_dir={run_dir}", f"method.name={method}", "--mesh",
                         mesh]) == 0
            out[method, mesh] = run_dir
            release_memory()
    return tiny_work_dir, out


@pytest.mark.parametrize("method", ["dpo_helpful", "mopo_pairwise"])
@pytest.mark.parametrize("mesh", MESHES)
def test_same_losses_on_every_mesh(runs, method, mesh):
    _, run_dirs = runs
    reference, steps = logged_losses(run_dirs[method, "fsdp=1"])
    losses, other_steps = logged_losses(run_dirs[method, mesh])
    assert steps == other_steps == list(range(1, STEPS + 1))
    # Relative 1e-5: MOPO pairwise's loss is ~40-70 here, where float32's spacing is already ~4e-6 and a mesh only
    # reorders the sums.
    np.testing.assert_allclose(losses, reference, rtol=1e-5, atol=1e-6)
    # The runs learn: a mesh that silently dropped the gradient would repeat the first loss.
    assert np.ptp(reference) > 1e-3


def test_eval_same_numbers_on_two_meshes(runs, release_memory):
    from mopo_jax.cli import main

    _, run_dirs = runs
    run_dir = run_dirs["mopo_pairwise", "fsdp=1"]
    results = []
    for mesh in ("fsdp=1", "data=2,fsdp=4"):
        assert main(["eval", str(run_dir), "--mesh", mesh]) == 0
        release_memory()
        results.append(json.loads((run_dir / "eval.json").read_text())["evaluation"])
    first, second = results
    for name in first["win_rate"]:
        assert first["win_rate"][name] == pytest.approx(second["win_rate"][name], abs=1e-6)
        assert first["expected_win_rate"][name] == pytest.approx(second["expected_win_rate"][name], abs=1e-6)
    assert first["kl"] == pytest.approx(second["kl"], abs=1e-4)
    for name, values in first["implicit"]["per_objective"].items():
        assert values["accuracy"] == pytest.approx(second["implicit"]["per_objective"][name]["accuracy"], abs=1e-6)
    assert first["response_length"] == second["response_length"]


