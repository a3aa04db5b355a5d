"""Calibration of Algorithm 1's candidate estimate for runs without a policy-sample dual (their eval.json has no
``dual_calibration``): the mean of the last W steps' per-batch plain estimates (``secondary_estimates_plain``), with
the standard error of that mean over the W steps (the policy moves during them: an approximation), against the
evaluated gold harmlessness, through the same comparison ``mopo eval`` applies to the policy-sample dual
(``mopo_jax.evaluation.paired.calibration``). What the multiplier read (``secondary_estimates``: the robust bound when eps > 0, the pooled plain estimate at
eps 0) is shown beside it, and, for runs from d4d183b on (where the plain estimate is the trained policy's value
over the pool), the closed form's value over the same pool (``closed_form_estimates``; before d4d183b the plain
estimate was that value).

    python candidate_calibration.py 8 per_run/mopo_onpolicy_eps0.15_b0.51 ...   (file prefixes or run directories)
"""
import json
import math
import pathlib
import statistics
import sys

from mopo_jax.evaluation.paired import calibration


def records(arg: str):
    path = pathlib.Path(arg)
    if path.is_dir():
        return path / "metrics.jsonl", path / "eval.json"
    return pathlib.Path(arg + ".metrics.jsonl"), pathlib.Path(arg + ".eval.json")


window = int(sys.argv[1])
print(f"| run | b | what the multiplier read, last {window} steps | closed form, last {window} steps | "
      f"plain estimate, last {window} steps (+- se) | gold harmlessness [95% CI] | plain - gold | "
      "combined 95% half-width | within |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |")
for arg in sys.argv[2:]:
    metrics_path, eval_path = records(arg)
    last = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()][-window:]
    plain = [r["secondary_estimates_plain"][0] for r in last]
    robust = [r["secondary_estimates"][0] for r in last]
    target = [r["closed_form_estimates"][0] for r in last if "closed_form_estimates" in r]
    target = f"{statistics.fmean(target):.3f}" if target else "(the plain estimate)"
    evaluated = json.loads(eval_path.read_text())
    gold = evaluated["evaluation"]["expected_win_rate"]["harmlessness"]
    interval = evaluated["evaluation"]["expected_win_rate_interval"]["harmlessness"]
    c = calibration(statistics.fmean(plain), statistics.stdev(plain) / math.sqrt(len(plain)), gold, interval)
    print(f"| {pathlib.Path(arg).name} | {evaluated['threshold']} | {statistics.fmean(robust):.3f} | {target} | "
          f"{c['estimate']:.3f} +- {c['estimate_stderr']:.3f} | {gold:.3f} [{interval[0]:.3f}, {interval[1]:.3f}] | "
          f"{c['difference']:+.3f} | {c['combined_half_width']:.3f} | {'yes' if c['within'] else 'no'} |")
