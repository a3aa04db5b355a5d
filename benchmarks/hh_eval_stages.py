"""One HH run's evaluation, stage by stage, with the current code: a copy of a trained run directory evaluated twice
(the first call builds the shared reference samples and compiles; the second is what every further run costs).

    cd <repository whose runs/hh/cpu-small holds trained runs>
    python benchmarks/hh_eval_stages.py runs/hh/cpu-small/mopo_b0.55 /tmp/eval_copy 4

Arguments: the trained run directory (its config.yaml and policy.npz are copied; its work_dir, relative to the current
directory, is read and extended with caches), where to put the copy, ``eval.samples_per_prompt``. Prints the total
and the seconds spent in generation, the KL, the judges (features and scoring) and the implicit accuracy, then the
evaluation's win rates and KL.
"""

import os
import shutil
import sys
import time

from mopo_jax.compilation_cache import enable
from mopo_jax.evaluation import policy_eval
from mopo_jax.experiment import hh_rlhf

STAGES = {"generate_responses": "generate", "sequence_kl_terms": "kl", "judge_win_rates": "judges",
          "implicit_preference_accuracy": "implicit"}


def timed_stages(times: dict) -> None:
    """Wraps the evaluation's stage functions so that each call adds its seconds to ``times``."""
    for name, label in STAGES.items():
        original = getattr(policy_eval, name)

        def wrapper(*args, _original=original, _label=label, **kwargs):
            start = time.perf_counter()
            out = _original(*args, **kwargs)
            times[_label] = times.get(_label, 0.0) + time.perf_counter() - start
            return out

        setattr(policy_eval, name, wrapper)


def main(source: str, target: str, samples: int) -> None:
    enable()
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(target)
    for name in ("config.yaml", "policy.npz"):
        shutil.copy(os.path.join(source, name), target)
    times: dict = {}
    timed_stages(times)
    for attempt in ("first", "second"):
        times.clear()
        start = time.perf_counter()
        result = hh_rlhf.evaluate_run(target, [f"eval.samples_per_prompt={samples}"])
        total = time.perf_counter() - start
        print(attempt, f"total {total:.1f} s", {k: round(v, 1) for k, v in times.items()}, flush=True)
    evaluation = result["evaluation"]
    print({k: evaluation[k] for k in ("expected_win_rate", "expected_win_rate_interval", "win_rate", "kl",
                                       "kl_interval")})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
