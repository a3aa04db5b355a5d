"""Several `mopo train` processes of one job (gloo on localhost), through the command line, against one process:
`data` across the processes SIGTERMed on both mid-run then rerun; `fsdp` and `tensor` spanning the processes (each
builds only its shards), each after one process alone is SIGTERMed or SIGKILLed (the `tiny` profile, real SmolLM2
and HH-RLHF pairs). The one-process reference runs in a subprocess too, so this module's own memory stays small
while the jobs' processes run (tests/test_mesh_experiment.py holds the in-process runs)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lm_assets import needs_hh_data, needs_smollm2
from tiny_runs import REPO, STEPS, common, logged_losses, records
from mopo_jax.parallel import distributed
from processes import communicate, free_port


pytestmark = [needs_hh_data, needs_smollm2,
              pytest.mark.skipif(not distributed.gloo_available(), reason="this jaxlib has no gloo CPU collectives")]

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


def _hold_until_every_counter_is_posted(deadline):
    # The coordination service stops the job at (the largest step any process has reported) + 1, from counters the
    # processes post once the notice reaches them. Drawing on before they are posted lets this process report a
    # later step first, and the stop would depend on timing; held here, every process is at the signalled step.
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    while time.monotonic() < deadline:
        if len(client.key_value_dir_get("PREEMPTION_CURRENT_COUNTER/")) >= jax.process_count():
            return
        time.sleep(0.05)
    raise RuntimeError("the preemption notice did not reach every process within 60 s")


def _signalling(config, context):
    batches = methods.offline_pairs()(config, context)
    at = os.environ.get("MOPO_TEST_SIGNAL_AT")
    which = os.environ.get("MOPO_TEST_SIGNAL_PROCESS")
    signum = getattr(signal, "SIG" + os.environ.get("MOPO_TEST_SIGNAL", "TERM"))

    drawn = [0]  # batches this process has drawn

    def signalled(position, state):
        if at is not None and drawn[0] == int(at) and which in (None, str(jax.process_index())):
            after = os.environ.get("MOPO_TEST_SIGNAL_AFTER")
            deadline = time.monotonic() + 60
            while after and not os.path.exists(after) and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signum)
            if signum == signal.SIGTERM and jax.process_count() > 1:
                _hold_until_every_counter_is_posted(time.monotonic() + 60)
        drawn[0] += 1
        return batches(position, state)

    return signalled


base = methods.get_method("mopo_pairwise")
methods.register_method(methods.Method(name="mopo_pairwise_sigterm", summary="MOPO pairwise, SIGTERM on demand",
                                       objective=base.objective, data=_signalling, knob="threshold"))
"""










@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_work_dir):
    """MOPO pairwise trained by one process on one device (`fsdp=1`), in a subprocess (its memory is returned when
    it ends): ``(work_dir, run_dir)``. One reference serves every layout: tests/test_mesh_experiment.py shows that
    every mesh of one process logs these losses (relative 1e-5)."""
    root = tmp_path_factory.mktemp("one_process")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    run_dir = root / "fsdp1"
    proc = subprocess.Popen([sys.executable, "-m", "mopo_jax.cli", "train", *common(tiny_work_dir),
                             f"run_dir={run_dir}", "method.name=mopo_pairwise", "--mesh", "fsdp=1"],
                            env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = communicate(proc, [proc], 600, "the one-process reference")
    assert proc.returncode == 0, output[-3000:]
    return tiny_work_dir, run_dir


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
        [sys.executable, "-m", "mopo_jax.cli", "train", *common(work_dir), f"run_dir={run_dir}",
         "method.name=mopo_pairwise_sigterm", "plugins=[mopo_sigterm_plugin]", "--mesh", mesh,
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=env, cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    for proc in procs:
        out, _ = communicate(proc, procs, timeout_s, f"a process of the two-process job on {mesh}")
        outputs.append((proc.returncode, out))
    return outputs


def test_two_processes_preempted_and_resumed_match_one_process(reference, tmp_path):
    """2 processes x 4 devices on data=2,fsdp=4, SIGTERM to both while step 2's batch is drawn, then the same
    command again: the metrics equal those of one process that was never interrupted."""
    from mopo_jax.training.preemption import PREEMPTED_EXIT_CODE

    work_dir, reference_dir = reference
    (tmp_path / "mopo_sigterm_plugin.py").write_text(textwrap.dedent(PLUGIN))
    run_dir = tmp_path / "two_processes"

    first = _launch_two_processes(work_dir, run_dir, tmp_path, signal_at=1)
    for code, out in first:
        assert code == PREEMPTED_EXIT_CODE, out[-3000:]
        assert "preempted (SIGTERM): checkpoint saved at step" in out, out[-3000:]
    interrupted, steps_before = logged_losses(run_dir)
    assert steps_before == [1, 2]  # stopped one step after the signalled one, after saving what it had

    second = _launch_two_processes(work_dir, run_dir, tmp_path)
    for code, out in second:
        assert code == 0, out[-3000:]
    losses, steps = logged_losses(run_dir)
    assert steps == list(range(1, STEPS + 1))  # no step repeated or lost across the restart
    np.testing.assert_allclose(losses, logged_losses(reference_dir)[0], rtol=1e-5, atol=1e-6)


# Layouts where the parameters' own axes span the two processes (each process holds only part of every sharded
# parameter and of the optimizer state): `tensor=4` (the MLP width and the vocabulary split across the processes;
# SmolLM2's 9 heads stay whole) and `fsdp=2,tensor=2` (devices are process-major, so `fsdp` spans the processes and
# `tensor` each process's pair), each with one way a host can go: a SIGTERM to one process only (a single host's
# maintenance notice), a SIGKILL of one process (a lost host). Both train across the processes before the signal
# (steps 1-2) and after the resume (steps 3-4), so an uninterrupted run of its own adds no layout.
ACROSS_PROCESSES = (("tensor=4", 2, "TERM"), ("fsdp=2,tensor=2", 2, "KILL"))


@pytest.mark.parametrize("mesh,local_devices,lost", ACROSS_PROCESSES)
def test_parameters_sharded_across_processes_match_one_process(reference, tmp_path, mesh, local_devices, lost):
    """`fsdp` and `tensor` spanning two processes give the per-step losses of one process (relative 1e-5); after
    one process alone is preempted or killed the job stops, and the same command resumes it to those losses."""
    from mopo_jax.training.checkpoint import MANIFEST_NAME
    from mopo_jax.training.preemption import PREEMPTED_EXIT_CODE

    work_dir, reference_dir = reference
    (tmp_path / "mopo_sigterm_plugin.py").write_text(textwrap.dedent(PLUGIN))
    run_dir = tmp_path / "two_processes"
    # Process 1 gets the signal as it draws batch 2, once step 2's checkpoint (save_every=2) has committed.
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
    before = records(run_dir)
    # TERM: the job stops one step after the signalled process's last (the plugin holds it until every process has
    # posted its step, so no timing decides it). KILL: the survivor cannot finish step 3 without its peer.
    assert [r["step"] for r in before] == ([1, 2, 3] if lost == "TERM" else [1, 2])
    outputs = _launch_two_processes(work_dir, run_dir, tmp_path, mesh, local_devices)
    for code, out in outputs:
        assert code == 0, out[-3000:]
    losses, steps = logged_losses(run_dir)
    assert steps == list(range(1, STEPS + 1))  # no step repeated or lost across the restart
    # Resumed from the first attempt's last checkpoint: steps 1-2 are that attempt's records.
    assert [r["time"] for r in records(run_dir)[:2]] == [r["time"] for r in before[:2]]
    np.testing.assert_allclose(losses, logged_losses(reference_dir)[0], rtol=1e-5, atol=1e-6)
