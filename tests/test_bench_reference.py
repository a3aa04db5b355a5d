"""Tests for mopo_jax.bench: the torch reference DPO loss, the matmul peak measurement and the published-peak table."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from mopo_jax.bench import peak


def test_import_bench_does_not_import_torch():
    code = ("import sys, mopo_jax.bench, mopo_jax.bench.peak, mopo_jax.bench.torch_reference; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------------------------------
# Published peaks
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, expected", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12),
    ("cpu", None),
    ("Tesla T4", None),
])
def test_device_peak_flops_kinds(kind, expected):
    assert peak.device_peak_flops(kind) == expected


def test_device_peak_flops_device_object_and_sources():
    import jax

    dev = jax.devices()[0]
    got = peak.device_peak_flops(dev)
    assert got == peak.device_peak_flops(dev.device_kind)
    if dev.platform == "cpu":
        assert got is None
    assert set(peak.DEVICE_PEAK_SOURCES) == set(peak.DEVICE_PEAK_FLOPS)


def test_measure_matmul_peak_cpu_range():
    r = peak.measure_matmul_peak(size=256, repeats=3, seconds_budget=0.5)
    for key in ("flops_per_second", "size", "dtype", "seconds_per_matmul", "backend", "device_kind"):
        assert key in r
    assert r["size"] == 256 and r["dtype"] == "float32"
    assert r["seconds_per_matmul"] > 0
    assert np.isclose(r["flops_per_second"], 2 * 256 ** 3 / r["seconds_per_matmul"])
    if r["backend"] == "cpu":
        assert 1e8 <= r["flops_per_second"] <= 1e13, r
    else:
        assert r["flops_per_second"] > 1e8, r


# ---------------------------------------------------------------------------------------------------------------------
# Torch reference DPO step
# ---------------------------------------------------------------------------------------------------------------------

def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _np_sequence_logps(logits: np.ndarray, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    logp = _np_log_softmax(logits[:, :-1].astype(np.float64))
    tok = np.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return (tok * mask[:, 1:]).sum(axis=-1)


def test_torch_dpo_loss_matches_numpy():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from mopo_jax.bench import torch_reference as tr

    # Different seeds: policy and reference must differ, otherwise h == 0 and the loss is log(2) whatever the logps.
    policy = tr.build_reference_model(seed=0)
    reference = tr.build_reference_model(seed=1).eval()
    tokens, mask = tr.make_preference_batch(seed=0)
    assert tokens.shape == (16, 128) and mask.shape == (16, 128)
    assert not mask[:, :64].any() and mask[:, 64:].all()
    assert torch.equal(tokens[:8, :64], tokens[8:, :64])          # each pair shares its prompt

    loss, pi, ref = tr.torch_dpo_loss_and_logps(policy, reference, tokens, mask, beta=0.1)
    assert loss.requires_grad and not ref.requires_grad

    with torch.no_grad():
        pol_logits = policy(input_ids=tokens).logits.numpy()
        ref_logits = reference(input_ids=tokens).logits.numpy()
    t, m = tokens.numpy(), mask.numpy().astype(np.float64)
    pi_np = _np_sequence_logps(pol_logits, t, m)
    ref_np = _np_sequence_logps(ref_logits, t, m)
    h = (pi_np[:8] - ref_np[:8]) - (pi_np[8:] - ref_np[8:])
    assert np.abs(h).max() > 1e-3                                  # a non-trivial check
    loss_np = np.mean(np.logaddexp(0.0, -0.1 * h))                 # -log(sigmoid(beta h))

    np.testing.assert_allclose(pi.detach().numpy(), pi_np, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(ref.numpy(), ref_np, rtol=1e-5, atol=1e-3)
    loss_value = float(loss.detach())
    assert abs(loss_value - loss_np) < 1e-5, (loss_value, loss_np)


def test_torch_dpo_step_smoke():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from mopo_jax.bench import torch_reference as tr

    r = tr.torch_dpo_step_seconds(steps=1, warmup=0, num_threads=1)
    assert r["seconds_per_step"] > 0 and len(r["all_step_seconds"]) == 1
    assert r["tokens_per_step"] == 16 * 128
    assert r["num_threads"] == 1
    assert r["attn_implementation"] in ("sdpa", "eager")
    assert np.isfinite(r["final_loss"])
