"""Run from this directory: python candidate_calibration.py 8 per_run/mopo_onpolicy_eps0.15_b0.51 ... (file prefixes)
or run directories. Calibration of Algorithm 1's candidate estimate (no policy-sample dual): the mean of the last W steps' per-batch
estimates (plain and the robust bound the multiplier acted on), with the standard error of that mean over steps,
against the evaluated gold harmlessness. python cand_cal.py W RUN_DIR_OR_PREFIX..."""
import json, sys, math, statistics, pathlib
W = int(sys.argv[1])
print("| run | b | robust bound, last %d steps | plain estimate, last %d steps (+- se) | gold harmlessness [95%% CI] | plain - gold | combined 95%% half-width | within |" % (W, W))
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: |")
for arg in sys.argv[2:]:
    p = pathlib.Path(arg)
    if p.is_dir():
        m = [json.loads(l) for l in (p / "metrics.jsonl").read_text().splitlines() if l]
        e = json.loads((p / "eval.json").read_text()); name = p.name
    else:
        m = [json.loads(l) for l in open(arg + ".metrics.jsonl") if l.strip()]
        e = json.load(open(arg + ".eval.json")); name = p.name
    last = m[-W:]
    plain = [r.get("secondary_estimates_plain", r["secondary_estimates"])[0] for r in last]
    robust = [r["secondary_estimates"][0] for r in last]
    mean = statistics.fmean(plain); se = statistics.stdev(plain) / math.sqrt(len(plain))
    ev = e["evaluation"]; g = ev["expected_win_rate"]["harmlessness"]; lo, hi = ev["expected_win_rate_interval"]["harmlessness"]
    hw = 1.96 * math.sqrt(se ** 2 + ((hi - lo) / (2 * 1.96)) ** 2)
    d = mean - g
    print(f"| {name} | {e['threshold']} | {statistics.fmean(robust):.3f} | {mean:.3f} +- {se:.3f} | {g:.3f} [{lo:.3f}, {hi:.3f}] | {d:+.3f} | {hw:.3f} | {'yes' if abs(d) <= hw else 'no'} |")
