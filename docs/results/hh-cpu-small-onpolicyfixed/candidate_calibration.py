"""Calibration of Algorithm 1's candidate estimate for runs without a policy-sample dual (their eval.json has no
``dual_calibration``): the mean of the last W steps' per-batch plain estimates (``secondary_estimates_plain``), with
the standard error of that mean over the W steps (the policy moves during them: an approximation), against the
evaluated gold harmlessness, through the same comparison ``mopo eval`` applies to the policy-sample dual
(``mopo_jax.evaluation.paired.calibration``). What the multiplier read (``secondary_estimates``: the robust bound when eps > 0, the pooled plain estimate at
eps 0) is shown beside it, and, for runs from d4d183b on (where the plain estimate is the trained policy's value
over the pool), the closed form's value over the same pool (``closed_form_estimates``; before d4d183b the plain
estimate was that value).

    python candidate_calibration.py 8 per_run/mopo_onpolicy_eps0.15_b0.51 ...   (file prefixes or run directories)

Runs from f44038f on also log the policy weights' per-prompt effective sample size over the pool (Kish's
``1 / sum rho~^2``; ``pool_effective_size_mean`` / ``_min``); a table of it over the same window follows, beside the
plain estimate's gap to gold, to test whether a thin pool goes with the under-read. Runs with
``onpolicy.jackknife`` (from b0f63ef on) log the uncorrected pool value too (``pool_estimates_uncorrected``); a
table sets it beside the corrected plain estimate.

With ``--trend`` first, it also fits a line to the last W steps' plain estimates and reads it one step past the
last (with the fit's standard error): the window's mean trails a policy whose value is still moving, and the fit
says how much of a gap that lag accounts for.
"""
import json
import math
import pathlib
import statistics
import sys

import numpy as np

from mopo_jax.evaluation.paired import calibration


def records(arg: str):
    path = pathlib.Path(arg)
    if path.is_dir():
        return path / "metrics.jsonl", path / "eval.json"
    return pathlib.Path(arg + ".metrics.jsonl"), pathlib.Path(arg + ".eval.json")


args = sys.argv[1:]
trend = args[0] == "--trend"
args = args[1:] if trend else args
window = int(args[0])
print(f"| run | b | what the multiplier read, last {window} steps | closed form, last {window} steps | "
      f"plain estimate, last {window} steps (+- se) | gold harmlessness [95% CI] | plain - gold | "
      "combined 95% half-width | within |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |")
for arg in args[1:]:
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

sized = [(arg, [json.loads(line) for line in records(arg)[0].read_text().splitlines() if line.strip()][-window:])
         for arg in args[1:]]
sized = [(arg, rows) for arg, rows in sized if "pool_effective_size_mean" in rows[-1]]
if sized:
    print(f"\n| run | effective size, mean over prompts (last {window}) | "
          f"smallest prompt's effective size (mean over the last {window}) | plain - gold |")
    print("| --- | ---: | ---: | ---: |")
    for arg, rows in sized:
        evaluated = json.loads(records(arg)[1].read_text())
        gold = evaluated["evaluation"]["expected_win_rate"]["harmlessness"]
        plain = statistics.fmean(r["secondary_estimates_plain"][0] for r in rows)
        print(f"| {pathlib.Path(arg).name} | {statistics.fmean(r['pool_effective_size_mean'] for r in rows):.2f} | "
              f"{statistics.fmean(r['pool_effective_size_min'] for r in rows):.2f} | {plain - gold:+.3f} |")

jackknifed = [(arg, rows) for arg, rows in sized if "pool_estimates_uncorrected" in rows[-1]]
if jackknifed:  # runs with onpolicy.jackknife (from b0f63ef on): the plain estimate is the corrected one
    print(f"\n| run | uncorrected pool estimate (last {window}) | jackknifed (last {window}) | gold harmlessness | "
          "uncorrected - gold | jackknifed - gold |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for arg, rows in jackknifed:
        gold = json.loads(records(arg)[1].read_text())["evaluation"]["expected_win_rate"]["harmlessness"]
        uncorrected = statistics.fmean(r["pool_estimates_uncorrected"][0] for r in rows)
        corrected = statistics.fmean(r["secondary_estimates_plain"][0] for r in rows)
        print(f"| {pathlib.Path(arg).name} | {uncorrected:.3f} | {corrected:.3f} | {gold:.3f} | "
              f"{uncorrected - gold:+.3f} | {corrected - gold:+.3f} |")

if trend:
    print(f"\n| run | slope over the last {window} steps (per step) | fit read one step past the last (+- se) | "
          "gold harmlessness | fit - gold |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for arg in args[1:]:
        metrics_path, eval_path = records(arg)
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        steps = np.array([r["step"] for r in rows[-window:]], float)
        plain = np.array([r["secondary_estimates_plain"][0] for r in rows[-window:]])
        design = np.stack([np.ones_like(steps), steps], 1)
        coef = np.linalg.lstsq(design, plain, rcond=None)[0]
        residual = plain - design @ coef
        covariance = residual @ residual / (len(steps) - 2) * np.linalg.inv(design.T @ design)
        at = np.array([1.0, steps[-1] + 1])
        gold = json.loads(eval_path.read_text())["evaluation"]["expected_win_rate"]["harmlessness"]
        print(f"| {pathlib.Path(arg).name} | {coef[1]:+.4f} | {at @ coef:.3f} +- {math.sqrt(at @ covariance @ at):.3f} | "
              f"{gold:.3f} | {at @ coef - gold:+.3f} |")
