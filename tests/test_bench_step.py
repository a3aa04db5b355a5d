"""The FLOP accounting of `mopo bench step` against an independent count, and a tiny end-to-end report."""

import jax
import numpy as np

from mopo_jax.bench.step import comparison_model, matmul_params, step_flops, step_report
from mopo_jax.models import param_shapes


def test_matmul_params_counts_projection_and_unembedding_weights():
    config = comparison_model()
    shapes = param_shapes(config)
    # Independently: every 3-D stacked weight matrix plus the untied lm_head; no embedding table, norms or biases.
    expected = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["layers"]) if len(s.shape) == 3)
    expected += int(np.prod(shapes["lm_head"].shape))
    assert matmul_params(config) == expected
    flops = step_flops(config, sequences=16, length=128, live_reference=True)
    per_token_forward = 2 * expected + 4 * 4 * 128 * 256
    assert flops["total"] == 4 * per_token_forward * 16 * 128
    assert flops["reference_forward"] == per_token_forward * 16 * 128
    # Unembedding only the 64 response positions removes 2 * d * V FLOPs on each of the other 64.
    sliced = step_flops(config, sequences=16, length=128, live_reference=True, unembedded_positions=64)
    assert flops["total"] - sliced["total"] == 4 * 16 * 64 * 2 * 256 * 8192


def test_step_report_runs_on_tiny_preset():
    report = step_report(preset="tiny", mesh="fsdp=1", loss="mopo_pairwise", pairs=2, prompt_len=8,
                         response_len=8, steps=2, compare_torch=False)
    step = report["steps"]["mopo_pairwise"]
    assert step["tokens_per_step"] == 2 * 2 * 16 and step["tokens_per_second"] > 0
    assert 0 < step["mfu"] < 1 and report["peak"]["source"] == "matmul measured in this run"


def test_generation_flops_equal_the_closed_form():
    from mopo_jax.bench.generate import generation_flops
    from mopo_jax.models import get_preset

    config = get_preset("smollm2-135m")
    shapes = param_shapes(config)
    # Independently: the stacked 3-D block weights; the tied unembedding is the [V, D] embedding.
    blocks = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["layers"]) if len(s.shape) == 3)
    unembed = int(np.prod(shapes["embed"].shape))
    per_position = 4 * 30 * 9 * 64
    P, N, B = 96, 32, 64
    prefill = P * 2 * blocks + per_position * P * (P + 1) // 2 + 2 * unembed
    # Decode tokens 1..N-1 (the first new token comes from the prefill's logits) attend P+1 .. P+N-1 positions.
    decode = (N - 1) * 2 * (blocks + unembed) + per_position * sum(range(P + 1, P + N))
    assert generation_flops(config, B, P, N) == B * (prefill + decode)


def test_generate_report_compares_with_transformers_on_a_tiny_model():
    from mopo_jax.bench.generate import generate_report

    report = generate_report(preset="tiny", prompts=4, prompt_len=8, new_tokens=4, repeats=2, top_p=0.9)
    for side in ("jax", "torch"):
        assert len(report[side]["seconds"]) == 2 and report[side]["median_seconds"] > 0
        assert report[side]["new_tokens_per_second"] == 16 / report[side]["median_seconds"]
    ratio = report["jax_over_torch"]
    assert ratio["min_round_ratio"] <= ratio["median_of_round_ratios"] <= ratio["max_round_ratio"]
    assert abs(ratio["ratio_of_medians"] - report["jax"]["median_seconds"] / report["torch"]["median_seconds"]) < 1e-12
