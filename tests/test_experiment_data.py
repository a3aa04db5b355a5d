"""The experiment's data stage on a dataset other than HH-RLHF: PKU-SafeRLHF-style pairs with two labels on the
same pair (better / safer response id), plugged in by configuration alone; and the orientation of the labelers'
pairs when the second response is the preferred one. Expectations are written out by hand."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from lm_assets import needs_smollm2

pytest.importorskip("datasets", reason="preference data loading needs `pip install datasets`")




def test_oriented_puts_the_preferred_response_first():
    from mopo_jax.experiment.hh_rlhf import _oriented

    first = np.array([[1.0], [2.0], [3.0], [4.0]])
    second = np.array([[10.0], [20.0], [30.0], [40.0]])
    arrays = {
        # objective 0: first wins, second wins (p = 0), a tie (left out), unlabelled (left out)
        "preference_probs": np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.0], [1.0, 0.0]], np.float32),
        "label_mask": np.array([[True, True], [True, True], [True, False], [False, True]]),
    }
    preferred, other = _oriented(arrays, (first, second), 0)
    np.testing.assert_array_equal(preferred[:, 0], [1.0, 20.0])
    np.testing.assert_array_equal(other[:, 0], [10.0, 2.0])
    preferred, other = _oriented(arrays, (first, second), 1)
    np.testing.assert_array_equal(preferred[:, 0], [10.0, 2.0, 40.0])
    np.testing.assert_array_equal(other[:, 0], [1.0, 20.0, 4.0])


@needs_smollm2
def test_pku_style_pairs_plug_in_by_config(tmp_path):
    from mopo_jax.configs import load_config
    from mopo_jax.experiment.config import ExperimentConfig
    from mopo_jax.experiment.evaluate import eval_prompt_rows
    from mopo_jax.experiment.hh_rlhf import prepare_data

    rows = []
    for i in range(240):
        better, safer = i % 2, (i // 2) % 2  # every combination, both labels on every pair
        rows.append({"prompt": f"Question number {i}: how do I do task {i}?", "response_0": f"Answer A to {i}.",
                     "response_1": f"Answer B to {i}, longer.", "better_response_id": better,
                     "safer_response_id": safer})
    source = tmp_path / "pku" / "test.jsonl"
    source.parent.mkdir()
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = load_config(ExperimentConfig, None, [
        f"work_dir={tmp_path / 'work'}", "data.format=pairs", f"data.pairs.source={source}",
        "data.max_prompt_tokens=32", "data.max_response_tokens=16", "data.policy_pairs=40", "data.labeler_pairs=20",
        "data.judge_pairs=20", "data.eval_pairs=20", "data.eval_prompts=6"])
    data = prepare_data(config)
    by_prompt = {r["prompt"]: r for r in rows}
    for split, cap in (("policy_train", 40), ("labeler_train", 20), ("eval", 20)):
        arrays = data[split]
        assert 0 < len(arrays["tokens"]) <= cap
        assert arrays["label_mask"].all()  # both objectives labelled on every pair
        # P(first beats second) per objective = 1 - the label's index, for the pair the row came from.
        from mopo_jax.models import load_tokenizer

        tokenizer = load_tokenizer("smollm2-135m")
        for b in range(len(arrays["tokens"])):
            prompt_text = tokenizer.decode(arrays["prompt_tokens"][b][arrays["prompt_mask"][b] > 0])
            (row,) = [r for p, r in by_prompt.items() if p in prompt_text]
            np.testing.assert_array_equal(arrays["preference_probs"][b],
                                          [1 - row["better_response_id"], 1 - row["safer_response_id"]])
    # Every pair sits under objective 0 (its lowest label); the eval prompts are then the first distinct ones, not
    # half of them from an empty objective-1 list.
    eval_rows = eval_prompt_rows(data["eval"]["objective"], 6, data["eval"]["prompt_tokens"])
    assert len(eval_rows) == min(6, len(data["eval"]["tokens"]))
    assert len({data["eval"]["prompt_tokens"][r].tobytes() for r in eval_rows}) == len(eval_rows)


@needs_smollm2
def test_caches_are_keyed_by_their_inputs_and_rebuilt_when_unreadable(tmp_path):
    from mopo_jax.configs import load_config
    from mopo_jax.experiment.config import ExperimentConfig
    from mopo_jax.experiment.hh_rlhf import prepare_data

    source = tmp_path / "pku" / "test.jsonl"
    source.parent.mkdir()
    source.write_text("\n".join(json.dumps({
        "prompt": f"Question {i}: what about topic {i}?", "response_0": f"Short answer {i}.",
        "response_1": f"A much longer answer about topic {i}.", "better_response_id": i % 2,
        "safer_response_id": 1 - i % 2}) for i in range(120)) + "\n")
    common = [f"work_dir={tmp_path / 'work'}", "data.format=pairs", f"data.pairs.source={source}",
              "data.max_response_tokens=16", "data.policy_pairs=20", "data.labeler_pairs=10", "data.judge_pairs=10",
              "data.eval_pairs=10", "data.eval_prompts=4"]
    short = load_config(ExperimentConfig, None, [*common, "data.max_prompt_tokens=8"])
    long = load_config(ExperimentConfig, None, [*common, "data.max_prompt_tokens=24"])
    first = prepare_data(short)
    assert first["policy_train"]["prompt_tokens"].shape[1] == 8
    # Another data setting does not read the first one's cache (a stale cache would return 8 prompt columns).
    assert prepare_data(long)["policy_train"]["prompt_tokens"].shape[1] == 24
    assert len(list((tmp_path / "work").glob("data-*"))) == 2
    # The same bytes with another modification time (a re-copied dataset) are the same input: no new cache ...
    os.utime(source, (source.stat().st_atime + 3600, source.stat().st_mtime + 3600))
    prepare_data(short)
    assert len(list((tmp_path / "work").glob("data-*"))) == 2
    # ... and an edit that keeps the size and the mtime is another input.
    stat, text = source.stat(), source.read_text()
    source.write_text(text.replace("Question 7:", "Question 8:", 1))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert source.stat().st_size == stat.st_size
    prepare_data(short)
    assert len(list((tmp_path / "work").glob("data-*"))) == 3
    # An edited input file is another input: its own cache.
    source.write_text(source.read_text() + json.dumps({"prompt": "One more?", "response_0": "Yes.",
                                                       "response_1": "No, never.", "better_response_id": 0,
                                                       "safer_response_id": 0}) + "\n")
    prepare_data(short)
    assert len(list((tmp_path / "work").glob("data-*"))) == 4
    # A cache cut by a crash is rebuilt with a warning, not read as a BadZipFile traceback.
    (cache,) = [d for d in (tmp_path / "work").glob("data-*") if d.stat().st_mtime == max(
        x.stat().st_mtime for x in (tmp_path / "work").glob("data-*"))]
    split_file = cache / "policy_train.npz"
    split_file.write_bytes(split_file.read_bytes()[:100])
    with pytest.warns(UserWarning, match="cannot be read.*rebuilding"):
        rebuilt = prepare_data(short)
    assert rebuilt["policy_train"]["tokens"].shape[0] > 0
    np.testing.assert_array_equal(np.load(split_file)["tokens"], rebuilt["policy_train"]["tokens"])


def test_caches_are_keyed_by_the_model_files_content(tmp_path):
    """Weights overwritten in place under the same name (a local file or directory) are another model: every cache
    computed from it gets another name; the same bytes copied again keep the name."""
    from mopo_jax.configs import load_config
    from mopo_jax.experiment.config import ExperimentConfig
    from mopo_jax.experiment.hh_rlhf import cache_path

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    weights = model / "model.safetensors"
    weights.write_bytes(b"\x00" * 64)
    config = load_config(ExperimentConfig, None, [f"work_dir={tmp_path / 'work'}", f"model.name={model}",
                                                 f"data.source={tmp_path / 'no-data'}"])
    first = cache_path(config, "activations")
    assert cache_path(config, "activations") == first
    weights.write_bytes(b"\x01" + b"\x00" * 63)  # same size, new bytes
    changed = cache_path(config, "activations")
    assert changed != first
    weights.write_bytes(b"\x00" * 64)  # the original bytes again
    assert cache_path(config, "activations") == first
    hub = load_config(ExperimentConfig, None, [f"work_dir={tmp_path / 'work'}", "model.name=smollm2-1.7b",
                                              f"data.source={tmp_path / 'no-data'}"])
    assert cache_path(hub, "activations") not in (first, changed)  # a hub name: its name is its content


@needs_smollm2
def test_trl_layout_trains_and_evaluates_one_objective_runs(tmp_path, capsys):
    """TRL's `prompt/chosen/rejected` JSONL (conversational, no label column) through the whole pipeline on the tiny
    profile: DPO and MOPO (one objective: no secondary, so no constraint) train and are judged on the one
    preference, the methods of two objectives are refused by name, and the two-objective front refuses the runs."""
    import gzip

    from lm_assets import HH_DATA
    from tiny_runs import CONFIG

    from mopo_jax.cli import main
    from mopo_jax.data.hh_rlhf import parse_pair

    rows = []
    for subset in ("helpful-base", "harmless-base"):
        with gzip.open(os.path.join(HH_DATA, f"{subset}-test.jsonl.gz"), "rt") as handle:
            for line in handle:
                pair = parse_pair(**{k: v for k, v in json.loads(line).items() if k in ("chosen", "rejected")})
                if pair is not None:
                    rows.append({"prompt": pair.messages(),
                                 "chosen": [{"role": "assistant", "content": pair.chosen}],
                                 "rejected": [{"role": "assistant", "content": pair.rejected}]})
                if len(rows) % 150 == 0 and rows:
                    break
    source = tmp_path / "preferences.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--config", str(CONFIG), f"work_dir={tmp_path / 'work'}", "data.format=pairs",
              f"data.pairs.source={source}", "data.pairs.columns=trl", "data.pairs.split=null", "training.steps=2",
              "eval.samples_per_prompt=1"]
    for method in ("dpo_helpful", "mopo_pairwise"):
        assert main(["train", *common, f"run_dir={tmp_path / method}", f"method.name={method}"]) == 0
    assert main(["train", *common, f"run_dir={tmp_path / 'weighted'}", "method.name=weighted_dpo"]) == 2
    error = capsys.readouterr().err
    assert "method.name=weighted_dpo: the data have one objective ('preference'" in error
    assert "dpo_helpful, mopo_pairwise, reference" in error

    assert main(["eval", str(tmp_path / "dpo_helpful"), str(tmp_path / "mopo_pairwise")]) == 0
    for method in ("dpo_helpful", "mopo_pairwise"):
        record = json.loads((tmp_path / method / "eval.json").read_text())
        evaluation = record["evaluation"]
        assert set(evaluation["expected_win_rate"]) == {"preference"}
        assert 0.0 <= evaluation["expected_win_rate"]["preference"] <= 1.0
        assert set(evaluation["implicit"]["per_objective"]) == {"preference"}
        assert record["threshold"] is None and record["constraint_verdict"] is None
        assert set(record["preference_models"]) >= {"labeler_preference", "judge_preference"}
    mopo_metrics = [json.loads(line) for line in (tmp_path / "mopo_pairwise" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in mopo_metrics] == [1, 2] and mopo_metrics[-1]["multipliers"] == []
    assert main(["pareto", str(tmp_path / "dpo_helpful"), "--out", str(tmp_path / "front.png")]) == 2
    assert "not on helpfulness and harmlessness" in capsys.readouterr().err
