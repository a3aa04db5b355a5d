"""The HH experiment on any mesh, through the command line: the same per-step losses on every mesh of 8 simulated
devices, two `mopo train` processes (gloo) equal to one process, a SIGTERM to both mid-run then a rerun equal to an
uninterrupted run, and `mopo eval` giving the same numbers on two meshes (the `tiny` profile, real SmolLM2 and
HH-RLHF pairs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lm_assets import HH_DATA as DATA, needs_hh_data, needs_smollm2
from mopo_jax.training import distributed

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "experiments" / "configs" / "hh_tiny.yaml"
STEPS = 4
MESHES = ("fsdp=4,tensor=2", "data=2,fsdp=4")

pytestmark = [needs_hh_data, needs_smollm2]

# A preemption notice at a fixed step, for the test: the method trains MOPO pairwise like `mopo_pairwise` and, when
# MOPO_TEST_SIGTERM_AT is set, its data source sends SIGTERM to its own process as it draws that step's batch (every
# process of the job does, as a scheduler would signal all of them).
PLUGIN = """
import os
import signal

from mopo_jax.experiment import methods


def _signalling(config, context):
    batches = methods.offline_pairs()(config, context)
    at = os.environ.get("MOPO_TEST_SIGTERM_AT")

    def signalled(position):
        for index, item in enumerate(batches(position)):
            if at is not None and index == int(at):
                os.kill(os.getpid(), signal.SIGTERM)
            yield item

    return signalled


base = methods.get_method("mopo_pairwise")
methods.register_method(methods.Method(name="mopo_pairwise_sigterm", summary="MOPO pairwise, SIGTERM on demand",
                                       objective=base.objective, data=_signalling, knob="threshold"))
"""


def _losses(run_dir: Path) -> np.ndarray:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return np.asarray([r["loss"] for r in records]), [r["step"] for r in records]


def _common(work_dir: Path) -> list[str]:
    return ["--config", str(CONFIG), f"work_dir={work_dir}", f"data.source={DATA}",
            f"training.steps={STEPS}", "training.batch_pairs=8", "training.save_every=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_work_dir):
    """Every method x mesh trained in this process (8 simulated devices) through `mopo train`."""
    from mopo_jax.cli import main

    root = tmp_path_factory.mktemp("mesh")
    out = {}
    for method in ("dpo_helpful", "mopo_pairwise"):
        for mesh in ("fsdp=1", *MESHES):
            run_dir = root / f"{method}_{mesh.replace(',', '_').replace('=', '')}"
            assert main(["train", *_common(tiny_work_dir), f"run_dir={run_dir}", f"method.name={method}", "--mesh", mesh]) == 0
            out[method, mesh] = run_dir
    return tiny_work_dir, out


@pytest.mark.parametrize("method", ["dpo_helpful", "mopo_pairwise"])
@pytest.mark.parametrize("mesh", MESHES)
def test_same_losses_on_every_mesh(runs, method, mesh):
    _, run_dirs = runs
    reference, steps = _losses(run_dirs[method, "fsdp=1"])
    losses, other_steps = _losses(run_dirs[method, mesh])
    assert steps == other_steps == list(range(1, STEPS + 1))
    # Relative 1e-5: MOPO pairwise's loss is ~40-70 here, where float32's spacing is already ~4e-6 and a mesh only
    # reorders the sums.
    np.testing.assert_allclose(losses, reference, rtol=1e-5, atol=1e-6)
    # The runs learn: a mesh that silently dropped the gradient would repeat the first loss.
    assert np.ptp(reference) > 1e-3


def test_eval_same_numbers_on_two_meshes(runs):
    from mopo_jax.cli import main

    _, run_dirs = runs
    run_dir = run_dirs["mopo_pairwise", "fsdp=1"]
    results = []
    for mesh in ("fsdp=1", "data=2,fsdp=4"):
        assert main(["eval", str(run_dir), "--mesh", mesh]) == 0
        results.append(json.loads((run_dir / "eval.json").read_text())["evaluation"])
    first, second = results
    for name in first["win_rate"]:
        assert first["win_rate"][name] == pytest.approx(second["win_rate"][name], abs=1e-6)
        assert first["expected_win_rate"][name] == pytest.approx(second["expected_win_rate"][name], abs=1e-6)
    assert first["kl"] == pytest.approx(second["kl"], abs=1e-4)
    for name, values in first["implicit"]["per_objective"].items():
        assert values["accuracy"] == pytest.approx(second["implicit"]["per_objective"][name]["accuracy"], abs=1e-6)
    assert first["response_length"] == second["response_length"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_processes(work_dir: Path, run_dir: Path, plugin_dir: Path, sigterm_at: int | None):
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")]))
    env.pop("MOPO_TEST_SIGTERM_AT", None)
    if sigterm_at is not None:
        env["MOPO_TEST_SIGTERM_AT"] = str(sigterm_at)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "mopo_jax.cli", "train", *_common(work_dir), f"run_dir={run_dir}",
         "method.name=mopo_pairwise_sigterm", "plugins=[mopo_sigterm_plugin]", "--mesh", "data=2,fsdp=4",
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=env, cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=420)
        outputs.append((proc.returncode, out))
    return outputs


@pytest.mark.skipif(not distributed.gloo_available(), reason="this jaxlib has no gloo CPU collectives")
def test_two_processes_preempted_and_resumed_match_one_process(runs, tmp_path):
    """2 processes x 4 devices on data=2,fsdp=4, SIGTERM to both while step 2's batch is drawn, then the same
    command again: the metrics equal those of one process with 8 devices that was never interrupted."""
    from mopo_jax.training.preemption import PREEMPTED_EXIT_CODE

    work_dir, run_dirs = runs
    (tmp_path / "mopo_sigterm_plugin.py").write_text(textwrap.dedent(PLUGIN))
    run_dir = tmp_path / "two_processes"

    first = _launch_two_processes(work_dir, run_dir, tmp_path, sigterm_at=1)
    for code, out in first:
        assert code == PREEMPTED_EXIT_CODE, out[-3000:]
        assert "preempted (SIGTERM): checkpoint saved at step" in out, out[-3000:]
    interrupted, steps_before = _losses(run_dir)
    assert 1 <= len(steps_before) < STEPS  # stopped mid-run, after saving what it had

    second = _launch_two_processes(work_dir, run_dir, tmp_path, sigterm_at=None)
    for code, out in second:
        assert code == 0, out[-3000:]
    losses, steps = _losses(run_dir)
    assert steps == list(range(1, STEPS + 1))  # no step repeated or lost across the restart
    reference, _ = _losses(run_dirs["mopo_pairwise", "data=2,fsdp=4"])
    np.testing.assert_allclose(losses, reference, rtol=1e-5, atol=1e-6)
