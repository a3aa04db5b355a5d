"""Hostile-input faults: each must end in a ValueError (or a clear ImportError) naming the culprit."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from mopo_jax import models as M


# --- 1. generation --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    cfg = M.get_preset("tiny", max_seq_len=32)
    return cfg, M.init_params(cfg, jax.random.PRNGKey(0))


@pytest.mark.parametrize("n", [0, -3])
def test_generate_rejects_nonpositive_max_new_tokens(tiny_model, n):
    cfg, params = tiny_model
    toks, mask = M.left_pad([[5, 6, 7]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        M.generate(cfg, params, toks, n, prompt_mask=mask)


def test_generate_rejects_prompt_beyond_context(tiny_model):
    cfg, params = tiny_model
    toks, mask = M.left_pad([list(range(1, 31))])
    with pytest.raises(ValueError, match=r"30.*max_new_tokens 5.*max_seq_len 32"):
        M.generate(cfg, params, toks, 5, prompt_mask=mask)
    # padding does not count: a short prompt padded wide still fits
    toks, mask = M.left_pad([[1, 2, 3]], length=30)
    out = M.generate(cfg, params, toks, 2, prompt_mask=mask)
    assert out.tokens.shape == (1, 2)


def test_generate_cli_rejects_max_new_tokens_before_loading(monkeypatch):
    from mopo_jax.models import generation

    def boom(*a, **k):
        raise AssertionError("weights loaded before the argument check")
    monkeypatch.setattr(generation, "_load_for_cli", boom)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generation.generate_cli("smollm2-135m", "hi", max_new_tokens=0)


# --- 2. synthetic user problem --------------------------------------------------------------------

def test_user_problem_writes_results_when_mopo_meets_no_threshold(tmp_path, monkeypatch, capsys):
    """Results are written when MOPO meets no threshold; and (the same run, to compile once) a problem above
    LARGE_PROBLEM_ENTRIES says so and time-stamps every stage line, so a run of minutes shows progress."""
    import json

    from mopo_jax import cli
    from mopo_jax.synthetic import benchmark, problems

    problem = problems.make_thurstone_ties(seed=3, num_prompts=4, num_candidates=5)
    path = tmp_path / "p.npz"
    problems.save_problem(problem, path)
    out = tmp_path / "out"
    monkeypatch.setattr(benchmark, "LARGE_PROBLEM_ENTRIES", 10)
    # 0.75 is feasible for the exact solver, but 2 steps of MOPO reach none of the thresholds
    code = cli.main(["synthetic", "--problem", str(path), "--tau", "0.1", "--thresholds", "0.75,0.8,0.85",
                     "--out", str(out), "plots=false", "steps=2"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("large problem (2 objectives x 4 prompts x 5^2 pairs, 3 thresholds)" in line for line in lines)
    stage_lines = [line for line in lines if line.startswith("  exact solver") or line.startswith("  mopo_")]
    assert len(stage_lines) >= 3 and all(re.search(r"\[\d\d:\d\d:\d\d, \+\d+ s\]$", line) for line in stage_lines)
    (result,) = json.load(open(out / "results.json"))["structures"].values()
    assert [p["status"] for p in result["methods"]["mopo_weighted_bc"]["points"]] == ["infeasible"] * 3
    assert result["exact"]["points"][0]["feasible"] is True
    (entry,) = result["methods"]["mopo_weighted_bc"]["threshold_error"]["per_threshold"]
    assert entry["met"] is False and entry["min_violation"] is None
    assert (out / "policies.npz").exists()


@pytest.mark.parametrize("case", ["infeasible_everywhere", "one_candidate"])
def test_user_problem_without_a_feasible_threshold_writes_statuses(tmp_path, case):
    """A threshold the exact solver cannot meet either (0.99), or a problem with one candidate per prompt (nothing to
    trade): results.json is written with the statuses, no crash in the summary lines."""
    import json

    from mopo_jax import cli
    from mopo_jax.synthetic import problems

    path = tmp_path / "p.npz"
    if case == "one_candidate":
        np.savez(path, pref=np.full((2, 3, 1, 1), 0.5), ref=np.ones((3, 1)))
        thresholds = []
    else:
        problems.save_problem(problems.make_thurstone_ties(seed=3, num_prompts=4, num_candidates=5), path)
        thresholds = ["--thresholds", "0.99"]
    out = tmp_path / "out"
    assert cli.main(["synthetic", "--problem", str(path), "--tau", "0.1", *thresholds, "--out", str(out),
                     "plots=false", "steps=2"]) == 0
    (result,) = json.load(open(out / "results.json"))["structures"].values()
    if case == "infeasible_everywhere":
        assert result["exact"]["points"][0]["feasible"] is False
        assert [p["status"] for p in result["methods"]["mopo_weighted_bc"]["points"]] == ["infeasible"]
    points = result["methods"]["mopo_weighted_bc"]["points"]
    assert points and all(p["status"] in ("feasible", "infeasible") for p in points), points


def test_a_user_problem_writes_under_its_own_name(tmp_path, monkeypatch):
    from mopo_jax import cli
    from mopo_jax.synthetic import problems

    path = tmp_path / "my_problem.npz"
    problems.save_problem(problems.make_bt_conflicting(num_prompts=3, num_candidates=4), path)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["synthetic", "--problem", str(path), "plots=false", "steps=2"]) == 0
    assert (tmp_path / "runs" / "synthetic" / "my_problem" / "results.json").exists()
    assert not (tmp_path / "runs" / "synthetic" / "results.json").exists()


@pytest.mark.parametrize("override, field", [("tolerance=-1", "tolerance"), ("tolerance=nan", "tolerance"),
                                             ("steps=0", "steps"), ("steps=-5", "steps")])
def test_synthetic_config_validates_fields(override, field):
    from mopo_jax.synthetic.benchmark import SyntheticConfig

    key, value = override.split("=")
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**{key: float(value) if key == "tolerance" else int(value)})


def test_synthetic_cli_rejects_negative_tolerance(tmp_path, capsys):
    from mopo_jax import cli
    from mopo_jax.synthetic import problems

    path = tmp_path / "p.npz"
    problems.save_problem(problems.make_bt_conflicting(num_prompts=3, num_candidates=4), path)
    assert cli.main(["synthetic", "--problem", str(path), "--out", str(tmp_path / "o"), "plots=false",
                     "tolerance=-1"]) == 2
    assert "tolerance" in capsys.readouterr().err


# --- 3. user problem files ------------------------------------------------------------------------

def _saved_problem(tmp_path, name="p.npz", **overrides):
    from mopo_jax.synthetic import problems

    problem = problems.make_bt_conflicting(num_prompts=3, num_candidates=4)
    arrays = {"pref": problem.pref, "ref": problem.ref}
    arrays.update(overrides)
    path = tmp_path / name
    np.savez(path, **arrays)
    return path, problem


def test_truncated_npz_is_a_value_error_naming_the_file(tmp_path):
    from mopo_jax.synthetic import problems

    path, _ = _saved_problem(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=str(path)):
        problems.load_problem(path)
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 40)  # zip magic, garbage body
    with pytest.raises(ValueError, match=str(path)):
        problems.load_problem(path)


def test_all_nan_preferences_are_rejected(tmp_path):
    from mopo_jax.synthetic import problems

    _, problem = _saved_problem(tmp_path)
    pref = np.full_like(problem.pref, np.nan)
    path, _ = _saved_problem(tmp_path, pref=pref)
    with pytest.raises(ValueError, match=r"p\.npz.*no pair is labelled"):
        problems.load_problem(path)


def test_one_unlabelled_objective_is_named(tmp_path):
    from mopo_jax.synthetic import problems

    _, problem = _saved_problem(tmp_path)
    pref = problem.pref.copy()
    pref[1] = np.nan
    path, _ = _saved_problem(tmp_path, name="half.npz", pref=pref)
    with pytest.raises(ValueError, match=r"half\.npz.*objective\(s\) \[1\]"):
        problems.load_problem(path)


def test_all_nan_problem_fails_the_cli(tmp_path, capsys):
    from mopo_jax import cli

    _, problem = _saved_problem(tmp_path)
    path, _ = _saved_problem(tmp_path, name="nolabels.npz", pref=np.full_like(problem.pref, np.nan))
    assert cli.main(["synthetic", "--problem", str(path), "--out", str(tmp_path / "o"), "plots=false",
                     "steps=2"]) == 2
    err = capsys.readouterr().err
    assert "nolabels.npz" in err and "no pair is labelled" in err


# --- 4. HH-RLHF loader ----------------------------------------------------------------------------

_H, _A = "\n\nHuman:", "\n\nAssistant:"


def _hh_line(i: int, answer: str | None = None) -> str:
    import json

    prompt = f"{_H} question {i}{_A}"
    return json.dumps({"chosen": prompt + (answer or f" good answer {i}"), "rejected": prompt + f" bad answer {i}"})


def test_lone_surrogate_line_is_skipped_with_its_line_number(tmp_path):
    import warnings

    from mopo_jax.data.hh_rlhf import HHRLHFWarning, load_hh_rlhf

    lines = [_hh_line(0), _hh_line(1, answer=' bad \ud800 text'), _hh_line(2)]  # line 2: valid JSON, lone surrogate
    (tmp_path / "harmless-base-test.jsonl").write_text("\n".join(lines) + "\n", encoding="ascii")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HHRLHFWarning)
        subsets, report = load_hh_rlhf(tmp_path, subsets=("harmless-base",))
    assert len(subsets["harmless-base"]) == 2
    f = report.file("harmless-base")
    assert dict(f.skipped) == {"invalid_text": 1} and f.first_lines == {"invalid_text": [2]}
    assert any("invalid_text" in str(w.message) for w in caught)


def test_missing_subset_file_is_an_error_naming_it(tmp_path):
    from mopo_jax.data.hh_rlhf import HHRLHFWarning, load_hh_rlhf

    (tmp_path / "harmless-base-test.jsonl").write_text(_hh_line(0) + "\n")
    with pytest.raises(ValueError, match=r"helpful-base-test\.jsonl\.gz: file not found"):
        load_hh_rlhf(tmp_path, subsets=("helpful-base", "harmless-base"))
    with pytest.warns(HHRLHFWarning, match="file not found"):  # explicit opt-in keeps the warning
        subsets, _ = load_hh_rlhf(tmp_path, subsets=("helpful-base", "harmless-base"), allow_missing=True)
    assert len(subsets["helpful-base"]) == 0 and len(subsets["harmless-base"]) == 1


# --- 5. chat templates without jinja2 -------------------------------------------------------------

class _NoJinjaTokenizer:
    """Stands in for a transformers tokenizer in an environment without jinja2."""
    pad_token_id = 0
    eos_token_id = 1
    eos_token = "</s>"

    def apply_chat_template(self, *args, **kwargs):
        raise ImportError("apply_chat_template requires jinja2 to be installed.")

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[2 + (ord(c) % 50) for c in t] for t in texts]}


def _pairs():
    return [{"turns": [("user", "hi")], "chosen": "a", "rejected": "b", "preference_probs": [1.0, 0.5],
             "label_mask": [True, False]}]


def test_missing_jinja2_is_an_import_error_naming_it():
    from mopo_jax.data.tokenize import end_of_turn_text, format_and_tokenize

    with pytest.raises(ImportError, match=r"jinja2.*mopo-jax\[lm\]"):
        format_and_tokenize(_pairs(), _NoJinjaTokenizer(), 8, 4)
    with pytest.raises(ImportError, match="jinja2"):  # the per-row path too (end marker given)
        format_and_tokenize(_pairs(), _NoJinjaTokenizer(), 8, 4, end_of_turn="</s>")
    with pytest.raises(ImportError, match="jinja2"):
        end_of_turn_text(_NoJinjaTokenizer())


def test_jinja2_is_declared_with_transformers():
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    (lm,) = [name for name, deps in extras.items() if any(d.startswith("transformers") for d in deps)]
    assert any(d.split(">")[0].split("=")[0].strip() == "jinja2" for d in extras[lm])

