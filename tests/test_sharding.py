"""The sharded train step: same numbers on every mesh, the intended parameter layouts, true-mean accumulation.

Every run is one step of the compiled train step on the ``tiny`` model in float32 from the same initial state and
batch. Gradients are read from AdamW's first moment after that step: with no clipping, ``mu = (1 - b1) * grads``
exactly, so sharded and unsharded gradients are compared leaf by leaf (and against the ``grad_norm`` metric).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from mopo_jax.models import get_preset, init_params
from mopo_jax.state import MOPOConfig
from mopo_jax.parallel import sharding
from mopo_jax.policy_objectives import DPO, MOPOPairwise
from mopo_jax.training.train_step import (
    OptimizerConfig,
    TrainConfig,
    compile_train_step,
    init_train_state,
    make_optimizer,
)
from mopo_jax.training.trainable import TrainableConfig

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices; see tests/conftest.py")

# mlp_dim=129: the "mlp" axis is not divisible by tensor=2, so it must stay replicated.
MODEL = get_preset("tiny", mlp_dim=129, dtype="float32", param_dtype="float32")
PROMPTS, LENGTH, OBJECTIVES = 8, 16, 2
B1 = 0.9  # optax.adamw's default first-moment decay
TOL = dict(rtol=1e-5, atol=1e-5)

MESHES = {
    "single": (sharding.MeshConfig(data=1, fsdp=1, tensor=1), 1),
    "data2_fsdp2_tensor2": (sharding.MeshConfig(data=2, fsdp=2, tensor=2), 8),
    "fsdp4_tensor2": (sharding.MeshConfig(data=1, fsdp=4, tensor=2), 8),
}
# refresh_every=500: the state carries a policy snapshot and the initial reference too. eps=0.15 (the paper's): the
# robust pairwise bound.
MOPO = MOPOPairwise(MOPOConfig(tau=0.1, eps=0.15, refresh_every=500), thresholds=(0.5,))
CASES = {
    "mopo_pairwise": dict(objective=MOPO),
    "dpo": dict(objective=DPO()),
    "lora": dict(objective=MOPO, trainable=TrainableConfig(lora_rank=4)),
}


def _batch(rows=slice(None)):
    """8 prompts x 2 responses; row (1, 1) has an empty completion (it falls in the first of 2 micro-batches)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, MODEL.vocab_size, (PROMPTS, 2, LENGTH)).astype(np.int32)
    completion = np.zeros((PROMPTS, 2, LENGTH), np.int32)
    completion[..., 9:] = 1
    completion[5, :, 7:] = 1
    attention = np.ones((PROMPTS, 2, LENGTH), np.int32)
    attention[0, :, :3] = 0  # left padding
    attention[6, 1, 14:] = 0  # right padding
    completion[1, 1] = 0  # dropped row
    labels = np.ones((PROMPTS, OBJECTIVES), bool)
    labels[3] = [False, True]  # secondary label only (dropped by DPO)
    batch = {
        "tokens": tokens,
        "completion_mask": completion,
        "attention_mask": attention,
        "preference_probs": rng.uniform(0.05, 0.95, (PROMPTS, OBJECTIVES)).astype(np.float32),
        "label_mask": labels,
    }
    return {k: v[rows] for k, v in batch.items()}


@functools.lru_cache(maxsize=None)
def _params():
    return init_params(MODEL, jax.random.PRNGKey(0))


def _config(case: str, micro_batches: int = 1) -> TrainConfig:
    return TrainConfig(
        optimizer=OptimizerConfig(learning_rate=1e-4, max_grad_norm=None),  # mu = (1 - b1) * grads exactly
        micro_batches=micro_batches,
        **CASES[case],
    )


def _spec(array) -> tuple:
    """The array's PartitionSpec as a tuple padded with None to its rank."""
    spec = tuple(array.sharding.spec)
    return spec + (None,) * (array.ndim - len(spec))


@functools.lru_cache(maxsize=None)
def _run(case: str, mesh_name: str, micro_batches: int = 1, rows: tuple | None = None):
    """One step; returns numpy results and the shardings of the state's arrays."""
    mesh_config, num_devices = MESHES[mesh_name]
    mesh = sharding.make_mesh(mesh_config, jax.devices()[:num_devices])
    config = _config(case, micro_batches)
    optimizer = make_optimizer(config.optimizer)
    batch = _batch(slice(*rows) if rows else slice(None))
    state = init_train_state(MODEL, config, _params(), optimizer, jax.random.PRNGKey(1))
    step, shardings = compile_train_step(MODEL, config, optimizer, mesh, jax.eval_shape(lambda: state), batch)
    state = jax.device_put(state, shardings)
    state, metrics = step(state, sharding.global_batch(batch, mesh))
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")
    nu = optax.tree_utils.tree_get(state.opt_state, "nu")
    get = lambda tree: jax.tree.map(np.asarray, jax.device_get(tree))  # noqa: E731
    return {
        "metrics": get(metrics),
        "params": get(state.params),
        "grads": jax.tree.map(lambda m: np.asarray(m) / (1.0 - B1), get(mu)),
        "specs": {
            name: jax.tree.map(_spec, tree)
            for name, tree in dict(params=state.params, mu=mu, nu=nu, reference=state.reference,
                                   snapshot=state.snapshot, initial_reference=state.initial_reference,
                                   base=state.base).items()
            if tree is not None
        },
    }


def _assert_trees_close(actual, expected, what):
    paths = jax.tree_util.tree_leaves_with_path(expected)
    for (path, want), got in zip(paths, jax.tree.leaves(actual)):
        np.testing.assert_allclose(got, want, **TOL, err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("mesh_name", ["data2_fsdp2_tensor2", "fsdp4_tensor2"])
@pytest.mark.parametrize("case", list(CASES))
def test_sharded_step_matches_single_device(case, mesh_name):
    single, sharded = _run(case, "single"), _run(case, mesh_name)
    assert sharded["metrics"].keys() == single["metrics"].keys()
    for key in single["metrics"]:  # loss, grad_norm, denominators, margins and (MOPO) the dual state
        np.testing.assert_allclose(sharded["metrics"][key], single["metrics"][key], **TOL, err_msg=key)
    assert single["metrics"]["dropped_rows"] == 1
    _assert_trees_close(sharded["grads"], single["grads"], "grad")
    _assert_trees_close(sharded["params"], single["params"], "updated param")
    # The gradients read from the optimizer are the ones the step normed.
    norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(single["grads"])))
    np.testing.assert_allclose(norm, single["metrics"]["grad_norm"], rtol=1e-5)
    assert single["metrics"]["grad_norm"] > 0
    # The step moved the parameters (so the comparison is not vacuous).
    changed = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), single["params"],
                           jax.tree.map(np.asarray, _trained_initial(case)))
    assert max(jax.tree.leaves(changed)) > 1e-5


def _trained_initial(case):
    config = _config(case)
    state = init_train_state(MODEL, config, _params(), make_optimizer(config.optimizer), jax.random.PRNGKey(1))
    return jax.device_get(state.params)


def test_parameter_and_optimizer_shardings_on_fsdp_tensor_mesh():
    specs = _run("mopo_pairwise", "fsdp4_tensor2")["specs"]
    params, layers = specs["params"], specs["params"]["layers"]
    assert params["embed"] == ("tensor", "fsdp")  # [V, D]
    assert layers["wq"] == (None, "fsdp", "tensor")  # [L, D, H]
    assert layers["wk"] == layers["wv"] == (None, "fsdp", "tensor")  # [L, D, Hkv], Hkv = 2 * 16
    assert layers["wo"] == (None, "tensor", "fsdp")  # [L, H, D]
    # mlp_dim=129 is not divisible by tensor=2: that dimension stays replicated, the embed one is still sharded.
    assert layers["w_up"] == layers["w_gate"] == (None, "fsdp", None)  # [L, D, 129]
    assert layers["w_down"] == (None, None, "fsdp")  # [L, 129, D]
    assert layers["attn_norm"]["scale"] == layers["mlp_norm"]["scale"] == (None, None)
    assert params["final_norm"]["scale"] == (None,)
    # Optimizer moments, the live reference, the policy snapshot and the initial reference are laid out like the
    # parameters.
    for name in ("mu", "nu", "reference", "snapshot", "initial_reference"):
        assert specs[name] == params, name


def test_parameter_shardings_on_data_fsdp_tensor_mesh():
    specs = _run("dpo", "data2_fsdp2_tensor2")["specs"]
    params, layers = specs["params"], specs["params"]["layers"]
    assert params["embed"] == ("tensor", "fsdp")  # replicated over data
    assert layers["wq"] == (None, "fsdp", "tensor")
    assert layers["wo"] == (None, "tensor", "fsdp")
    assert layers["w_down"] == (None, None, "fsdp")
    assert all("data" not in spec for spec in jax.tree.leaves(specs["params"], is_leaf=lambda x: isinstance(x, tuple)))
    assert specs["mu"] == specs["nu"] == params


def test_lora_shardings():
    specs = _run("lora", "fsdp4_tensor2")["specs"]
    adapters = specs["params"]
    assert adapters["wq"] == {"a": (None, "fsdp", None), "b": (None, None, "tensor")}  # a [L, D, r], b [L, r, H]
    assert adapters["wo"] == {"a": (None, "tensor", None), "b": (None, None, "fsdp")}
    assert specs["base"]["embed"] == ("tensor", "fsdp")
    assert specs["base"]["layers"]["wq"] == (None, "fsdp", "tensor")
    assert specs["mu"] == specs["nu"] == specs["reference"] == adapters


def test_logical_to_spec_leaves_indivisible_dimensions_replicated():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
    assert sharding.logical_to_spec(("vocab", "embed"), (256, 64), mesh) == P("tensor", "fsdp")
    assert tuple(sharding.logical_to_spec(("vocab", "embed"), (255, 66), mesh)) in ((None, None), ())
    assert tuple(sharding.logical_to_spec(("layers", "embed", "mlp"), (2, 64, 129), mesh)) == (None, "fsdp", None)


def test_micro_batches_accumulate_the_true_mean():
    """micro_batches=2 (on the sharded mesh) == one batch on one device, with the dropped row in micro-batch 0 only,
    so the micro-batches have 3 and 4 valid pairs and a mean of per-micro-batch means would differ."""
    whole = _run("mopo_pairwise", "single")
    accumulated = _run("mopo_pairwise", "fsdp4_tensor2", micro_batches=2)
    for key in whole["metrics"]:
        np.testing.assert_allclose(accumulated["metrics"][key], whole["metrics"][key], **TOL, err_msg=key)
    _assert_trees_close(accumulated["grads"], whole["grads"], "grad")
    _assert_trees_close(accumulated["params"], whole["params"], "updated param")

    # The halves on their own (DPO: fixed per-row terms; MOPO's label rates are the whole batch's, computed before
    # the split): the whole-batch loss and gradient are their valid-pair-weighted mean, not the mean.
    whole = _run("dpo", "single")
    halves = [_run("dpo", "single", rows=(0, 4)), _run("dpo", "single", rows=(4, 8))]
    counts = [h["metrics"]["loss_denominator"] for h in halves]
    assert counts == [2.0, 4.0] and whole["metrics"]["loss_denominator"] == 6.0
    losses = [h["metrics"]["loss"] for h in halves]
    np.testing.assert_allclose((counts[0] * losses[0] + counts[1] * losses[1]) / 6.0, whole["metrics"]["loss"],
                               rtol=1e-5)
    weighted = jax.tree.map(lambda a, b: (counts[0] * a + counts[1] * b) / 6.0, halves[0]["grads"], halves[1]["grads"])
    _assert_trees_close(weighted, whole["grads"], "grad (weighted halves)")
    plain = jax.tree.map(lambda a, b: (a + b) / 2, halves[0]["grads"], halves[1]["grads"])
    gap = max(jax.tree.leaves(jax.tree.map(lambda a, b: np.max(np.abs(a - b)), plain, whole["grads"])))
    assert gap > 1e-4  # a mean of per-half means would be wrong
