"""Multi-process training on localhost: 2 processes x 2 CPU devices (gloo collectives) run the same train step as one
process with 4 devices, each process loading only its rows of the global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mopo_jax.parallel import distributed
from processes import communicate, free_port

TIMEOUT_S = 240
# data=2 across the two processes is covered through the command line (tests/test_mesh_experiment.py).
MESHES = ("fsdp=4",)
REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import json, sys
    from mopo_jax.parallel import distributed

    process_id, num_processes, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[5]
    distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id, initialization_timeout=120)

    import jax
    import numpy as np
    import optax
    from jax.experimental import multihost_utils
    from mopo_jax.models import get_preset, init_params
    from mopo_jax.policy_objectives import MOPOPairwise
    from mopo_jax.state import MOPOConfig
    from mopo_jax.parallel import sharding
    from mopo_jax.training.train_step import (
        OptimizerConfig, TrainConfig, compile_train_step, init_train_state, make_optimizer)

    assert jax.process_count() == num_processes and jax.device_count() == 4, (jax.process_count(), jax.devices())
    model = get_preset("tiny", dtype="float32")
    config = TrainConfig(objective=MOPOPairwise(MOPOConfig(tau=0.1), thresholds=(0.5,)),
                         optimizer=OptimizerConfig(learning_rate=1e-4, max_grad_norm=None))
    optimizer = make_optimizer(config.optimizer)

    prompts, length = 8, 16
    rng = np.random.default_rng(0)
    completion = np.zeros((prompts, 2, length), np.int32)
    completion[..., 9:] = 1
    completion[1, 1] = 0  # a dropped row
    batch = {
        "tokens": rng.integers(0, model.vocab_size, (prompts, 2, length)).astype(np.int32),
        "completion_mask": completion,
        "attention_mask": np.ones((prompts, 2, length), np.int32),
        "preference_probs": rng.uniform(0.05, 0.95, (prompts, 2)).astype(np.float32),
        "label_mask": np.ones((prompts, 2), bool),
    }

    def init():
        return init_train_state(model, config, init_params(model, jax.random.PRNGKey(0)), optimizer,
                                jax.random.PRNGKey(1))

    results = {}
    for mesh_text in sys.argv[4].split(";"):
        mesh = sharding.make_mesh(sharding.parse_mesh(mesh_text))
        rows = distributed.process_batch_slice(prompts, mesh)
        local = {k: v[rows] for k, v in batch.items()}
        step, shardings = compile_train_step(model, config, optimizer, mesh, jax.eval_shape(init), local)
        state = jax.jit(init, out_shardings=shardings)()  # every process builds its shards, nothing is sent
        state, metrics = step(state, sharding.global_batch(local, mesh))
        # The full updated parameters on every process (they are sharded across processes on these meshes).
        # Gradients: AdamW's first moment after one unclipped step is (1 - b1) * grads.
        mu = optax.tree_utils.tree_get(state.opt_state, "mu")
        params, mu = multihost_utils.process_allgather((state.params, mu), tiled=True)
        name = f"{num_processes}procs_{process_id}_{mesh_text.replace(',', '_')}"
        np.savez(f"{out_dir}/params_{name}.npz", *[np.asarray(x) for x in jax.tree.leaves(params)])
        np.savez(f"{out_dir}/grads_{name}.npz", *[np.asarray(x) / 0.1 for x in jax.tree.leaves(mu)])
        results[mesh_text] = {
            "rows": [rows.start, rows.stop],
            "loss": float(metrics["loss"]),
            "grad_norm": float(metrics["grad_norm"]),
            "dropped_rows": int(metrics["dropped_rows"]),
            "multipliers": np.asarray(metrics["multipliers"]).tolist(),
        }
    print("RESULT " + json.dumps({"process": jax.process_index(), "results": results}), flush=True)
    """
)


def _launch(script: Path, process_id: int, num_processes: int, port: int, local_devices: int) -> subprocess.Popen:
    """``worker.py PROCESS_ID NUM_PROCESSES PORT MESHES OUT_DIR`` with ``local_devices`` simulated CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, str(script), str(process_id), str(num_processes), str(port), ";".join(MESHES),
         str(script.parent)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _result(proc: subprocess.Popen, name: str, procs) -> dict:
    out, err = communicate(proc, procs, TIMEOUT_S, name)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        for p in procs:
            p.kill()
        if "gloo" in err.lower() and ("not available" in err.lower() or "unimplemented" in err.lower()):
            pytest.skip(f"gloo CPU collectives unavailable in this jaxlib: {err.strip().splitlines()[-1]}")
        pytest.fail(f"{name} exited with {proc.returncode}\nstdout:\n{out}\nstderr (tail):\n{err[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.skipif(not distributed.gloo_available(), reason="this jaxlib has no gloo CPU collectives "
                    "(jax_cpu_collectives_implementation / make_gloo_tcp_collectives)")
def test_two_processes_match_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    pair = [_launch(script, 0, 2, port, 2), _launch(script, 1, 2, port, 2)]
    first, second = (_result(p, f"process {i} of 2", pair) for i, p in enumerate(pair))
    reference = _launch(script, 0, 1, 0, 4)  # one process, 4 devices (after the pair: 2 CPU cores)
    single = _result(reference, "single process", [reference])
    assert (first["process"], second["process"]) == (0, 1)

    for mesh in MESHES:
        a, b, ref = first["results"][mesh], second["results"][mesh], single["results"][mesh]
        # Each process loaded its own half of the 8 prompts; the single process loaded all of them.
        assert (a["rows"], b["rows"], ref["rows"]) == ([0, 4], [4, 8], [0, 8]), mesh
        assert a["dropped_rows"] == ref["dropped_rows"] == 1
        for result in (a, b):
            for key in ("loss", "grad_norm", "multipliers"):
                # rtol: grad_norm is ~100, where float32's spacing (7.6e-6) exceeds any absolute 1e-6; the two jobs
                # reduce in different orders.
                np.testing.assert_allclose(result[key], ref[key], rtol=1e-6, atol=1e-6, err_msg=f"{mesh} {key}")
        # The gradients and updated parameters, gathered on each process of the pair, equal the single process's.
        name = mesh.replace(",", "_")
        for kind in ("grads", "params"):
            want = np.load(tmp_path / f"{kind}_1procs_0_{name}.npz")
            for process in (0, 1):
                got = np.load(tmp_path / f"{kind}_2procs_{process}_{name}.npz")
                assert got.files == want.files and len(want.files) > 0
                for leaf in want.files:
                    np.testing.assert_allclose(got[leaf], want[leaf], rtol=1e-6, atol=1e-6,
                                               err_msg=f"{mesh} {kind} {leaf}")


def test_single_process_helpers():
    import jax

    from mopo_jax.parallel import sharding

    assert distributed.initialize() is False  # no job to join: a no-op
    assert distributed.initialize(num_processes=1) is False
    assert distributed.process_batch_slice(8) == slice(0, 8)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=jax.device_count(), tensor=1))
    assert distributed.process_batch_slice(2 * jax.device_count(), mesh) == slice(0, 2 * jax.device_count())
    # Joining a job after the backend is up cannot work: a clear error, before any connection attempt.
    with pytest.raises(RuntimeError, match="before JAX initialises a backend"):
        distributed.initialize("127.0.0.1:1", num_processes=2, process_id=0)


def _clear_slurm(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)


def test_slurm_one_task_per_node_gets_every_gpu(monkeypatch):
    _clear_slurm(monkeypatch)
    assert distributed.slurm_node_devices() is None and distributed.detect_cluster() in (None, "cloud-tpu")
    for key, value in {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NTASKS": "2",
                       "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "1",
                       "SLURM_GPUS_ON_NODE": "8"}.items():
        monkeypatch.setenv(key, value)
    assert distributed.detect_cluster() == "slurm"
    assert distributed.slurm_node_devices() == list(range(8))
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")  # one task per GPU: JAX's own choice (SLURM_LOCALID) stands
    assert distributed.slurm_node_devices() is None


def test_explicit_job_flags_go_together():
    with pytest.raises(ValueError, match="go together"):
        distributed.initialize_from_arguments("127.0.0.1:1234", None, 0)
    with pytest.raises(ValueError, match="--process-id 2 is not in"):
        distributed.initialize_from_arguments("127.0.0.1:1234", 2, 2)
