"""Checkpoints of the train state: exact round trips on an 8-device mesh, resuming a SIGKILLed run bit-for-bit
(lagged reference and MOPO state included), and falling back past corrupt or uncommitted checkpoints."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mopo_jax.models import get_preset, init_params
from mopo_jax.state import MOPOConfig
from mopo_jax.parallel import sharding
from mopo_jax.training.checkpoint import (
    MANIFEST_NAME,
    CheckpointConfig,
    Checkpointer,
    CheckpointWarning,
    abstract_train_state,
)
from mopo_jax.training.loop import LoopConfig, train
from mopo_jax.policy_objectives import DPO, MOPOPairwise
from mopo_jax.training.train_step import (
    OptimizerConfig,
    TrainConfig,
    init_train_state,
    make_optimizer,
    train_state_shardings,
)
from mopo_jax.training.trainable import TrainableConfig

REPO = Path(__file__).resolve().parents[1]
PROMPTS, LENGTH, OBJECTIVES = 4, 16, 2
NUM_STEPS, SAVE_EVERY, KILL_AFTER = 6, 2, 3
MESH = sharding.MeshConfig(fsdp=4, tensor=2)
MOPO_CONFIG = TrainConfig(
    objective=MOPOPairwise(MOPOConfig(tau=0.1, eps=0.0, refresh_every=2), thresholds=(0.5,)),
    optimizer=OptimizerConfig(learning_rate=1e-3),
)


def make_batch(index: int, vocab_size: int) -> dict:
    """The deterministic batch number ``index``: 4 prompt pairs of 16 tokens, two objectives."""
    rng = np.random.default_rng(1000 + index)
    completion = np.zeros((PROMPTS, 2, LENGTH), np.int32)
    completion[..., LENGTH // 2:] = 1
    return {
        "tokens": rng.integers(0, vocab_size, (PROMPTS, 2, LENGTH)).astype(np.int32),
        "completion_mask": completion,
        "attention_mask": np.ones((PROMPTS, 2, LENGTH), np.int32),
        "preference_probs": rng.uniform(0.05, 0.95, (PROMPTS, OBJECTIVES)).astype(np.float32),
        "label_mask": rng.uniform(size=(PROMPTS, OBJECTIVES)) < 0.7,
    }


def batch_at(position: dict, vocab_size: int, kill_at: int | None = None, commit_dir: str | None = None):
    """The batch at ``position``; when asked for batch ``kill_at`` the process waits for the commit manifest in
    ``commit_dir`` (the async save of the previous checkpoint) and SIGKILLs itself."""
    epoch, index = position.get("epoch", 0), position.get("batch_index", 0)
    if index == kill_at:
        manifest = Path(commit_dir) / MANIFEST_NAME
        deadline = time.monotonic() + 60
        while not manifest.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
    return make_batch(index, vocab_size), {"epoch": epoch, "batch_index": index + 1}


KILLED_RUN = textwrap.dedent(
    """
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("checkpoint_test_helpers", sys.argv[1])
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    from mopo_jax.models import get_preset, init_params
    from mopo_jax.parallel import sharding
    from mopo_jax.training.checkpoint import CheckpointConfig
    from mopo_jax.training.loop import LoopConfig, train
    import jax

    ckpt, metrics, kill_at, commit_dir = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    model = get_preset("tiny")
    train(model, helpers.MOPO_CONFIG, init_params(model, jax.random.PRNGKey(0)),
          lambda pos, state: helpers.batch_at(pos, model.vocab_size, kill_at, commit_dir),
          sharding.make_mesh(helpers.MESH),
          LoopConfig(helpers.NUM_STEPS, CheckpointConfig(ckpt, save_every=helpers.SAVE_EVERY), metrics_path=metrics,
                     rng=1))
    raise SystemExit("not killed")
    """
)


def _assert_trees_equal(actual, expected, atol=0.0):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == e.dtype and a.shape == e.shape
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, e = jax.random.key_data(a), jax.random.key_data(e)
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=0, atol=atol)


def _sharded_state(model, config, seed=1, key_fn=jax.random.PRNGKey):
    optimizer = make_optimizer(config.optimizer)
    params = init_params(model, jax.random.PRNGKey(0))
    mesh = sharding.make_mesh(MESH)
    state = init_train_state(model, config, params, optimizer, key_fn(seed))
    shapes = jax.eval_shape(lambda: state)
    shardings = train_state_shardings(model, config, optimizer, mesh, shapes)
    state = jax.device_put(state, shardings)
    # Distinct values everywhere the init has equal or constant ones.
    state = state._replace(
        step=state.step + 7,
        opt_state=jax.tree.map(lambda x: x + 0.25 if x.dtype == jnp.float32 else x, state.opt_state),
        objective_state=jax.tree.map(lambda x: x + jnp.asarray(0.5, x.dtype), state.objective_state),
    )
    return jax.device_put(state, shardings), abstract_train_state(shapes, shardings)


@pytest.mark.parametrize(
    "config,key_fn",
    [
        (MOPO_CONFIG, jax.random.PRNGKey),  # reference + snapshot + MOPO state, uint32 key
        (TrainConfig(objective=DPO(), trainable=TrainableConfig(lora_rank=2)), jax.random.key),  # LoRA base,
        # no snapshot, no objective state, typed key
    ],
    ids=["mopo_pairwise", "dpo_lora_typed_key"],
)
def test_round_trip_restores_identical_state_in_its_shardings(tmp_path, config, key_fn):
    model = get_preset("tiny")
    state, abstract = _sharded_state(model, config, key_fn=key_fn)
    with Checkpointer(CheckpointConfig(str(tmp_path / "ckpt"), save_every=5)) as checkpointer:
        assert not checkpointer.save(3, state, {"epoch": 0})  # not a multiple of save_every
        assert checkpointer.save(5, state, {"epoch": 1, "batch_index": 9})
        checkpointer.wait()
        assert (tmp_path / "ckpt" / "5" / MANIFEST_NAME).exists()
        restored = checkpointer.restore_latest(abstract)
    assert restored is not None
    assert restored.step == 5 and restored.data_position == {"epoch": 1, "batch_index": 9}
    _assert_trees_equal(restored.state, state)
    for field in ("reference", "snapshot", "base", "objective_state"):
        assert (getattr(restored.state, field) is None) == (getattr(state, field) is None), field
    for leaf, target in zip(jax.tree.leaves(restored.state), jax.tree.leaves(abstract)):
        assert leaf.sharding == target.sharding


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    model = get_preset("tiny")
    params = init_params(model, jax.random.PRNGKey(0))
    mesh = sharding.make_mesh(MESH)

    def data(pos, state):
        return batch_at(pos, model.vocab_size)

    reference_state, reference = train(model, MOPO_CONFIG, params, data, mesh, LoopConfig(NUM_STEPS, rng=1))
    reference_losses = [r["loss"] for r in reference]
    assert [r["step"] for r in reference] == list(range(1, NUM_STEPS + 1))
    assert all(np.isfinite(reference_losses)) and len(set(reference_losses)) == NUM_STEPS

    ckpt, metrics_path = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    env = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"], "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(script), __file__, str(ckpt), str(metrics_path), str(KILL_AFTER), str(ckpt / "2")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    killed = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    assert [r["step"] for r in killed] == [1, 2, 3]
    assert {"step", "time", "step_time_s", "tokens", "tokens_per_s", "loss", "multipliers"} <= set(killed[0])
    assert killed[0]["tokens"] == PROMPTS * 2 * LENGTH

    checkpoints = CheckpointConfig(str(ckpt), save_every=SAVE_EVERY)
    resumed_state, resumed = train(model, MOPO_CONFIG, params, data, mesh,
                                   LoopConfig(NUM_STEPS, checkpoints, metrics_path=str(metrics_path), rng=1))
    assert [r["step"] for r in resumed] == list(range(SAVE_EVERY + 1, NUM_STEPS + 1))
    losses = [r["loss"] for r in killed[:SAVE_EVERY]] + [r["loss"] for r in resumed]
    np.testing.assert_allclose(losses, reference_losses, rtol=0, atol=1e-6)
    np.testing.assert_allclose(killed[SAVE_EVERY]["loss"], reference_losses[SAVE_EVERY], rtol=0, atol=1e-6)
    _assert_trees_equal(resumed_state, reference_state, atol=1e-6)  # params, lagged reference, MOPO state, rng
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [2, 4, 6]

    # Nothing left to do: a finished run restores and returns at once.
    _, again = train(model, MOPO_CONFIG, params, data, mesh, LoopConfig(NUM_STEPS, checkpoints, rng=1))
    assert again == []


def test_attempt_killed_before_its_first_checkpoint_leaves_no_steps_behind(tmp_path):
    """An attempt killed before any checkpoint committed logged steps that the rerun, starting over, logs again:
    the log keeps each step once, the rerun's (the metric records of the killed attempt differ in their times)."""
    model = get_preset("tiny")
    metrics_path = tmp_path / "metrics.jsonl"
    killed = [{"step": 1, "loss": -1.0}, {"step": 2, "loss": -2.0}]
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in killed) + '{"step": 3, "lo')  # torn last line
    _, history = train(model, MOPO_CONFIG, init_params(model, jax.random.PRNGKey(0)),
                       lambda pos, state: batch_at(pos, model.vocab_size), sharding.make_mesh(MESH),
                       LoopConfig(2, CheckpointConfig(str(tmp_path / "ckpt"), save_every=SAVE_EVERY),
                                  metrics_path=str(metrics_path), rng=1))
    logged = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2]
    assert [r["loss"] for r in logged] == [r["loss"] for r in history] and -1.0 not in [r["loss"] for r in logged]


def _largest_file(step_dir: Path) -> Path:
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST_NAME]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate_largest(step_dir: Path):
    path = _largest_file(step_dir)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _delete_data_file(step_dir: Path):
    next(p for p in sorted((step_dir / "state" / "d").iterdir())).unlink()


def _flip_a_byte(step_dir: Path):
    path = _largest_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated_file": (_truncate_largest, "truncated"),
    "deleted_file": (_delete_data_file, "is missing"),
    "flipped_byte": (_flip_a_byte, "checksum"),
    "no_orbax_commit_marker": (lambda d: (d / "commit_success.txt").unlink(), "commit_success.txt is missing"),
    "no_manifest": (lambda d: (d / MANIFEST_NAME).unlink(), "save never completed"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_latest_checkpoint_warns_and_falls_back(tmp_path, corruption):
    model = get_preset("tiny")
    state, abstract = _sharded_state(model, MOPO_CONFIG)
    later = state._replace(step=state.step + 2, params=jax.tree.map(lambda x: x * 2, state.params))
    config = CheckpointConfig(str(tmp_path / "ckpt"), save_every=2)
    with Checkpointer(config) as checkpointer:
        checkpointer.save(2, state, {"batch_index": 2})
        checkpointer.save(4, later, {"batch_index": 4})
    step_dir = tmp_path / "ckpt" / "4"
    corrupt, reason = CORRUPTIONS[corruption]
    corrupt(step_dir)

    with Checkpointer(config) as checkpointer:
        with pytest.warns(CheckpointWarning, match=re.escape(str(step_dir)) + ".*" + re.escape(reason)):
            restored = checkpointer.restore_latest(abstract)
        assert restored.step == 2 and restored.data_position == {"batch_index": 2}
        _assert_trees_equal(restored.state, state)
        # The bad directory is moved aside (not deleted), so the resumed run can write step 4 again.
        assert not step_dir.exists() and len(list((tmp_path / "ckpt" / "quarantine").iterdir())) == 1
        assert checkpointer.save(4, later, {"batch_index": 4})
    with Checkpointer(config) as checkpointer:
        restored = checkpointer.restore_latest(abstract)
    assert restored.step == 4
    _assert_trees_equal(restored.state, later)


def test_no_usable_checkpoint_returns_none_and_layout_mismatch_raises(tmp_path):
    model = get_preset("tiny")
    state, abstract = _sharded_state(model, MOPO_CONFIG)
    config = CheckpointConfig(str(tmp_path / "ckpt"), save_every=1)
    with Checkpointer(config) as checkpointer:
        assert checkpointer.restore_latest(abstract) is None
        checkpointer.save(1, state, {})
    (tmp_path / "ckpt" / "1" / MANIFEST_NAME).unlink()
    with Checkpointer(config) as checkpointer, pytest.warns(CheckpointWarning, match="step 1"):
        assert checkpointer.restore_latest(abstract) is None

    _, dpo_abstract = _sharded_state(model, TrainConfig(objective=DPO()))
    with Checkpointer(config) as checkpointer:
        checkpointer.save(2, state, {})
        with pytest.raises(ValueError, match="does not match the train state"):
            checkpointer.restore_latest(dpo_abstract)
