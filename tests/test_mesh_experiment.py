"""The HH experiment on any mesh, through the command line: the same per-step losses on every mesh of 8 simulated
devices, two `mopo train` processes (gloo) equal to one process, a SIGTERM to both mid-run then a rerun equal to an
uninterrupted run, and `mopo eval` giving the same numbers on two meshes (the `tiny` profile, real SmolLM2 and
HH-RLHF pairs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lm_assets import HH_DATA as DATA, needs_hh_data, needs_smollm2
from mopo_jax.training import distributed
from processes import communicate, free_port

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "experiments" / "configs" / "hh_tiny.yaml"
STEPS = 4
MESHES = ("fsdp=4,tensor=2", "data=2,fsdp=4")

pytestmark = [needs_hh_data, needs_smollm2]

# A signal at a fixed step, for the test: the method trains MOPO pairwise like `mopo_pairwise` and, when
# MOPO_TEST_SIGNAL_AT is set, its data source sends MOPO_TEST_SIGNAL (TERM by default) to its own process as it draws
# that step's batch: on every process of the job (a scheduler signalling all of them), or only on process
# MOPO_TEST_SIGNAL_PROCESS (one host preempted, or lost with SIGKILL), once the file MOPO_TEST_SIGNAL_AFTER (a
# checkpoint's commit manifest) exists when that is set.
PLUGIN = """
import os
import signal
import time

import jax

from mopo_jax.experiment import methods


def _signalling(config, context):
    batches = methods.offline_pairs()(config, context)
    at = os.environ.get("MOPO_TEST_SIGNAL_AT")
    which = os.environ.get("MOPO_TEST_SIGNAL_PROCESS")
    signum = getattr(signal, "SIG" + os.environ.get("MOPO_TEST_SIGNAL", "TERM"))

    def signalled(position):
        for index, item in enumerate(batches(position)):
            if at is not None and index == int(at) and which in (None, str(jax.process_index())):
                after = os.environ.get("MOPO_TEST_SIGNAL_AFTER")
                deadline = time.monotonic() + 60
                while after and not os.path.exists(after) and time.monotonic() < deadline:
                    time.sleep(0.05)
                os.kill(os.getpid(), signum)
            yield item

    return signalled


base = methods.get_method("mopo_pairwise")
methods.register_method(methods.Method(name="mopo_pairwise_sigterm", summary="MOPO pairwise, SIGTERM on demand",
                                       objective=base.objective, data=_signalling, knob="threshold"))
"""


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> np.ndarray:
    records = _records(run_dir)
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


def _launch_two_processes(work_dir: Path, run_dir: Path, plugin_dir: Path, mesh: str = "data=2,fsdp=4",
                          local_devices: int = 4, signal_at: int | None = None, signal_name: str = "TERM",
                          signal_process: int | None = None, signal_after: Path | None = None,
                          timeout_s: int = 420):
    """Two `mopo train` processes (gloo) of one job on ``mesh``, ``local_devices`` CPU devices each; with
    ``signal_at`` the data source of process ``signal_process`` (of both without it) sends SIG``signal_name`` to
    itself as it draws batch ``signal_at`` (once ``signal_after`` exists, if given). Returns ``[(exit status, output)]`` per process."""
    port = free_port()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(plugin_dir), str(REPO), os.environ.get("PYTHONPATH", "")]))
    for name in ("MOPO_TEST_SIGNAL_AT", "MOPO_TEST_SIGNAL", "MOPO_TEST_SIGNAL_PROCESS", "MOPO_TEST_SIGNAL_AFTER"):
        env.pop(name, None)
    if signal_at is not None:
        env.update(MOPO_TEST_SIGNAL_AT=str(signal_at), MOPO_TEST_SIGNAL=signal_name)
        if signal_process is not None:
            env["MOPO_TEST_SIGNAL_PROCESS"] = str(signal_process)
        if signal_after is not None:
            env["MOPO_TEST_SIGNAL_AFTER"] = str(signal_after)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "mopo_jax.cli", "train", *_common(work_dir), f"run_dir={run_dir}",
         "method.name=mopo_pairwise_sigterm", "plugins=[mopo_sigterm_plugin]", "--mesh", mesh,
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=env, cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    for proc in procs:
        out, _ = communicate(proc, procs, timeout_s, f"a process of the two-process job on {mesh}")
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

    first = _launch_two_processes(work_dir, run_dir, tmp_path, signal_at=1)
    for code, out in first:
        assert code == PREEMPTED_EXIT_CODE, out[-3000:]
        assert "preempted (SIGTERM): checkpoint saved at step" in out, out[-3000:]
    interrupted, steps_before = _losses(run_dir)
    assert 1 <= len(steps_before) < STEPS  # stopped mid-run, after saving what it had

    second = _launch_two_processes(work_dir, run_dir, tmp_path)
    for code, out in second:
        assert code == 0, out[-3000:]
    losses, steps = _losses(run_dir)
    assert steps == list(range(1, STEPS + 1))  # no step repeated or lost across the restart
    reference, _ = _losses(run_dirs["mopo_pairwise", "data=2,fsdp=4"])
    np.testing.assert_allclose(losses, reference, rtol=1e-5, atol=1e-6)


# Layouts where the parameters' own axes span the two processes (each process holds only part of every sharded
# parameter and of the optimizer state), each with one way a host can go: none, a SIGTERM to one process only (a
# single host's maintenance notice), a SIGKILL of one process (a lost host).
ACROSS_PROCESSES = (("fsdp=2", 1, None), ("fsdp=4", 2, "TERM"), ("fsdp=2,tensor=2", 2, "KILL"))


@pytest.mark.skipif(not distributed.gloo_available(), reason="this jaxlib has no gloo CPU collectives")
@pytest.mark.parametrize("mesh,local_devices,lost", ACROSS_PROCESSES)
def test_parameters_sharded_across_processes_match_one_process(runs, tmp_path, mesh, local_devices, lost):
    """`fsdp` and `tensor` spanning two processes give the per-step losses of one process (relative 1e-5); after
    one process alone is preempted or killed the job stops, and the same command resumes it to those losses."""
    from mopo_jax.training.preemption import PREEMPTED_EXIT_CODE

    work_dir, run_dirs = runs
    (tmp_path / "mopo_sigterm_plugin.py").write_text(textwrap.dedent(PLUGIN))
    run_dir = tmp_path / "two_processes"
    reference, _ = _losses(run_dirs["mopo_pairwise", "fsdp=1"])
    if lost is not None:
        # Process 1 gets the signal as it draws batch 2, once step 2's checkpoint (save_every=2) has committed.
        from mopo_jax.training.checkpoint import MANIFEST_NAME

        first = _launch_two_processes(work_dir, run_dir, tmp_path, mesh, local_devices, signal_at=2,
                                      signal_name=lost, signal_process=1,
                                      signal_after=run_dir / "checkpoints" / "2" / MANIFEST_NAME, timeout_s=300)
        codes = [code for code, _ in first]
        if lost == "TERM":
            # The notice reaches the other process too: both save after the same step and exit as preempted.
            assert codes == [PREEMPTED_EXIT_CODE] * 2, [out[-3000:] for _, out in first]
        else:
            # The killed process dies with SIGKILL; its peer must not go on (or hang) without it.
            assert codes[1] == -9 and codes[0] != 0, first[0][1][-3000:]
        before = _records(run_dir)
        assert [r["step"] for r in before][:2] == [1, 2] and len(before) < STEPS
    outputs = _launch_two_processes(work_dir, run_dir, tmp_path, mesh, local_devices)
    for code, out in outputs:
        assert code == 0, out[-3000:]
    losses, steps = _losses(run_dir)
    assert steps == list(range(1, STEPS + 1))  # no step repeated or lost across the restart
    if lost is not None:  # resumed from step 2's checkpoint: steps 1-2 are the first attempt's records
        assert [r["time"] for r in _records(run_dir)[:2]] == [r["time"] for r in before[:2]]
    np.testing.assert_allclose(losses, reference, rtol=1e-5, atol=1e-6)
