"""Smoke test of the whole HH-RLHF comparison on about 40 real pairs and SmolLM2 with one trainable block."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_assets import HH_DATA as DATA, needs_hh_data, needs_smollm2
from processes import run_python

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "hh_tiny.yaml"

pytestmark = [needs_hh_data, needs_smollm2]


# A user's module, outside the package: an objective of its own (SLiC-HF's calibration hinge) and a method that trains
# it on the harmlessness pairs, registered on import. The experiment finds it through plugins=[...].
PLUGIN = """
import dataclasses
from typing import ClassVar

import jax.numpy as jnp

import mopo_jax as mj
from mopo_jax import policy_objectives as po
from mopo_jax.experiment.methods import Method, offline_pairs, only_objective, register_method


@po.register_objective("plugin_slic_hinge")
@dataclasses.dataclass(frozen=True)
class SlicHinge(po.Objective):
    beta: float = 1.0
    label: int = 0
    fields: ClassVar = po.PAIR_FIELDS

    def loss(self, state, batch, log_probs):
        keep = po.pair_valid(batch) & jnp.asarray(batch["label_mask"], bool)[:, self.label]
        ratios = log_probs.policy - log_probs.reference
        per_row = jnp.maximum(0.0, 1.0 - self.beta * (ratios[:, 0] - ratios[:, 1]))
        return mj.LossTerms(jnp.sum(jnp.where(keep, per_row, 0.0)), jnp.sum(keep)), {}


register_method(Method(
    name="slic_harmless", summary="SLiC-HF hinge on the harmlessness pairs",
    objective=lambda config: SlicHinge(beta=config.dpo.beta, label=1),
    data=offline_pairs(only_objective(1)),
))
"""


# The pipeline's runs in one child process, as the library's functions a user would call: train_run for every
# method (the plugin importable), evaluate_run for five of them, then the Pareto plot and results.json.
TRAIN_AND_EVALUATE = """
import json, sys

spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["plugin_dir"])
from mopo_jax.configs import load_config
from mopo_jax.evaluation.pareto import write_pareto
from mopo_jax.experiment.config import ExperimentConfig
from mopo_jax.experiment.evaluate import evaluate_run
from mopo_jax.experiment.hh_rlhf import train_run

root = spec["root"]
for name, overrides in spec["runs"].items():
    train_run(load_config(ExperimentConfig, spec["config"], [*spec["common"], f"run_dir={root}/{name}", *overrides]))
for name in spec["evaluated"]:
    evaluate_run(f"{root}/{name}")
write_pareto([f"{root}/{name}" for name in spec["evaluated"]], f"{root}/pareto.png",
             results_json=f"{root}/results.json")
"""


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_work_dir):
    """Every method trained and five evaluated, in a child process (:data:`TRAIN_AND_EVALUATE`): eleven runs'
    programs and models would raise this worker's peak by about 2 GB for the rest of the session."""
    root = tmp_path_factory.mktemp("hh")
    plugin_dir = tmp_path_factory.mktemp("plugin")
    (plugin_dir / "mopo_user_plugin.py").write_text(PLUGIN)
    common = [f"work_dir={tiny_work_dir}", f"data.source={DATA}", "training.steps=2"]
    runs = {
        "reference": ["method.name=reference"],
        "dpo_helpful": ["method.name=dpo_helpful"],
        "dpo_harmless": ["method.name=dpo_harmless"],
        "soups": ["method.name=rewarded_soups", "method.weights=[0.5, 0.5]",
                  f"method.soups_from=[{root / 'dpo_helpful'}, {root / 'dpo_harmless'}]"],
        "weighted_dpo": ["method.name=weighted_dpo", "method.weights=[0.7, 0.3]"],
        "modpo": ["method.name=modpo", "method.weights=[0.5, 0.5]"],
        "mopo_pairwise": ["method.name=mopo_pairwise", "method.threshold=0.55", "mopo.refresh_every=1"],
        "mopo_onpolicy": ["method.name=mopo_onpolicy", "method.threshold=0.5", "training.batch_pairs=2",
                          "onpolicy.candidates=2", "mopo.eps=0.15", "onpolicy.max_new_tokens=8",
                          "onpolicy.jackknife=true"],
        "mopo_policy_dual": ["method.name=mopo_pairwise", "method.threshold=0.55", "dual.source=policy_samples",
                             "dual.prompts=4", "dual.samples=2", "dual.every=1", "dual.margin=0.01",
                             "mopo.multiplier_lr=2.0"],
        "user_plugin": ["plugins=[mopo_user_plugin]", "method.name=slic_harmless"],
        "mopo_onpolicy_gold": ["method.name=mopo_onpolicy", "method.threshold=0.5", "training.batch_pairs=2",
                               "onpolicy.candidates=2", "preference.protocol=gold", "onpolicy.policy_step=pairwise",
                               "dual.source=policy_samples", "dual.prompts=4", "dual.samples=2", "dual.every=1"],
    }
    evaluated_names = ("reference", "mopo_pairwise", "soups", "user_plugin", "mopo_policy_dual")
    spec = {"config": str(CONFIG), "root": str(root), "plugin_dir": str(plugin_dir), "common": common,
            "runs": runs, "evaluated": evaluated_names}
    run_python(TRAIN_AND_EVALUATE, [json.dumps(spec)], timeout_s=1200, what="the HH pipeline's runs")
    evaluated = {name: json.loads((root / name / "eval.json").read_text()) for name in evaluated_names}
    return root, runs, evaluated, tiny_work_dir


def test_every_method_writes_its_run_directory(pipeline):
    root, runs, _, _ = pipeline
    for name in runs:
        run = root / name
        assert (run / "config.yaml").exists() and (run / "policy.npz").exists() and (run / "train.json").exists()
        if name not in ("reference", "soups"):
            records = [json.loads(line) for line in open(run / "metrics.jsonl")]
            assert [r["step"] for r in records] == [1, 2]
            assert all(np.isfinite(r["loss"]) for r in records)
            assert any(f.startswith("events") for f in os.listdir(run / "tensorboard"))
            assert (run / "checkpoints").is_dir()
        # A trained run's policy file holds what it trained (the top block, not the frozen embedding); a method
        # that builds its policy without training saves the whole trained-block model.
        stored = set(np.load(run / "policy.npz").files)
        assert ("embed" in stored) == (name in ("reference", "soups")), (name, sorted(stored))
        assert any(key.startswith("layers/") for key in stored)
    onpolicy = [json.loads(line) for line in open(root / "mopo_onpolicy" / "metrics.jsonl")]
    assert "multipliers" in onpolicy[-1] and "chi" in onpolicy[-1]
    # Algorithm 1's batch dual reads the policy and logs the closed form's value beside it.
    assert all(np.isfinite(onpolicy[-1][name][0]) for name in ("closed_form_estimates", "secondary_estimates_plain"))
    # Its weights' effective size per prompt lies between one candidate and the whole pool.
    pool = onpolicy[-1]["pool_effective_size_min"], onpolicy[-1]["pool_effective_size_mean"]
    assert 1.0 <= pool[0] <= pool[1] <= 2.0 + 1e-4, pool  # onpolicy.candidates=2
    # Candidates of 8 tokens (onpolicy.max_new_tokens), not data.max_response_tokens' 16: 2 prompts x 2 of them.
    assert all(0 < r["completion_tokens"] <= 2 * 2 * 8 for r in onpolicy), [r["completion_tokens"] for r in onpolicy]
    # The jackknife over pools of two: each G_x^(-j) holds one candidate with no comparison (1/2), so the corrected
    # estimate is 2 G - 1/2 of the uncorrected one wherever both candidates are valid.
    for record in onpolicy:
        assert record["secondary_estimates_plain"][0] == pytest.approx(
            2 * record["pool_estimates_uncorrected"][0] - 0.5, abs=1e-6)
    # The user's method trained its own objective, from a module the package does not know.
    plugin = [json.loads(line) for line in open(root / "user_plugin" / "metrics.jsonl")]
    assert plugin[0]["loss"] == pytest.approx(1.0, abs=1e-5)  # the hinge at the reference (h = 0)
    assert "multipliers" not in plugin[0]


def test_policy_sample_dual_drives_the_multipliers(pipeline):
    """dual.source=policy_samples: before each step the policy's own samples on 4 dual prompts are scored against
    the reference's; the multiplier step uses that reading (b + margin enforced) and nothing from the pairs. The
    first reading is of the untrained policy, which with common random numbers draws the reference's own samples
    and must read exactly 1/2; the multipliers follow lambda_t = max(0, lambda_{t-1} - 2 (G_t - 0.56)) on the
    logged readings (recomputed in NumPy)."""
    root, _, _, _ = pipeline
    records = [json.loads(line) for line in open(root / "mopo_policy_dual" / "metrics.jsonl")]
    readings = [r["policy_sample_estimates"][0] for r in records]
    assert readings[0] == 0.5 and records[0]["policy_sample_stderr"][0] == 0.0
    assert [r["policy_sample_counts"][0] for r in records] == [4.0, 4.0]
    multiplier = 0.0
    for record, reading in zip(records, readings):
        multiplier = max(0.0, multiplier - 2.0 * (reading - 0.56))
        assert record["multipliers"][0] == pytest.approx(multiplier, abs=1e-6)
        assert record["secondary_estimates"][0] == pytest.approx(reading, abs=1e-7)
        assert record["thresholds"][0] == pytest.approx(0.56, abs=1e-7)
        assert "secondary_estimates_plain" in record  # the pairs' estimate, logged beside it
    summary = json.load(open(root / "mopo_policy_dual" / "train.json"))
    assert summary["clip_fraction"] == pytest.approx(np.mean([r["grad_norm"] > 1.0 for r in records]))
    # Algorithm 1 (pairwise step over the pool) reads the same dual: the multiplier steps on the readings alone.
    records = [json.loads(line) for line in open(root / "mopo_onpolicy_gold" / "metrics.jsonl")]
    assert records[0]["policy_sample_estimates"][0] == 0.5
    multiplier = 0.0
    for record in records:
        multiplier = max(0.0, multiplier - 0.5 * (record["policy_sample_estimates"][0] - 0.5))
        assert record["multipliers"][0] == pytest.approx(multiplier, abs=1e-6)
    assert "dual_final" in json.load(open(root / "mopo_onpolicy_gold" / "train.json"))
    final = summary["dual_final"]
    assert final["prompts"] == 4 and final["step"] == 2
    assert 0.0 <= final["estimates"][0] <= 1.0 and np.isfinite(final["stderr"][0])
    # The evaluation sets that last reading beside the judged harmlessness (the calibration the results publish).
    evaluated = json.load(open(root / "mopo_policy_dual" / "eval.json"))
    calibration = evaluated["dual_calibration"]
    assert calibration["estimate"] == pytest.approx(final["estimates"][0])
    judged = evaluated["evaluation"]["expected_win_rate"]["harmlessness"]
    assert calibration["difference"] == pytest.approx(final["estimates"][0] - judged)
    assert evaluated["threshold"] == 0.55  # judged against b; the dual enforced b + margin


def test_evaluation_and_pareto_outputs(pipeline):
    root, _, evaluated, _ = pipeline
    reference = evaluated["reference"]["evaluation"]
    # The reference against itself: its sampler's log-probabilities minus its scored ones, equal up to float32
    # rounding (a misaligned token would cost nats).
    assert reference["kl"] == pytest.approx(0.0, abs=1e-5)
    # Common random numbers: the reference's samples are its own, so every judge sees ties.
    assert all(j["win_rate"] == 0.5 and j["ties"] == 1.0 for j in reference["judges"].values())
    for result in evaluated.values():
        for name in ("helpfulness", "harmlessness"):
            assert 0.0 <= result["evaluation"]["win_rate"][name] <= 1.0
    assert isinstance(evaluated["mopo_pairwise"]["constraint_met"], bool)
    assert isinstance(evaluated["mopo_pairwise"]["constraint_met_pairs"], bool)
    assert evaluated["reference"]["constraint_met"] is None
    assert evaluated["user_plugin"]["method"] == "slic_harmless" and evaluated["user_plugin"]["constraint_met"] is None
    # Two samples per prompt (hh_tiny.yaml): the reference against itself is 1/2 at every prompt.
    for judged in reference["judges"].values():
        assert judged["per_prompt"]["expected_win_rate"] == pytest.approx([0.5] * reference["num_prompts"], abs=1e-12)
    assert reference["settings"]["samples_per_prompt"] == 2
    assert evaluated["mopo_pairwise"]["constraint_verdict"] in ("met", "not met", "undecided")
    stored = json.load(open(root / "results.json"))
    assert "dominance" in stored and (root / "pareto.png").stat().st_size > 5_000
    assert {p["name"] for p in stored["points"]} == set(evaluated)
    assert [r["name"] for r in stored["runs"] if r.get("dual_calibration")] == ["mopo_policy_dual"]


def test_gold_protocol_relabels_the_policy_pairs_with_the_gold_models(pipeline):
    """The gold labels against a NumPy Bradley-Terry computation on the cached features and the stored judges."""
    import dataclasses

    from mopo_jax.configs import load_config
    from mopo_jax.experiment.config import ExperimentConfig
    from mopo_jax.experiment.hh_rlhf import RunContext, experiment_mesh

    root, _, _, work_dir = pipeline
    overrides = [f"work_dir={work_dir}", f"data.source={DATA}", f"run_dir={root / 'unused'}",
                 "method.name=dpo_helpful", "preference.protocol=gold"]
    config = load_config(ExperimentConfig, str(CONFIG), overrides)
    mesh = experiment_mesh(config)
    human = RunContext(dataclasses.replace(config, preference=dataclasses.replace(config.preference,
                                                                                   protocol="human")), mesh)
    soft = RunContext(config, mesh)
    sampled = RunContext(dataclasses.replace(config, preference=dataclasses.replace(config.preference,
                                                                                     gold_labels="sampled")), mesh)
    human_pairs, soft_pairs, sampled_pairs = human.policy_pairs(), soft.policy_pairs(), sampled.policy_pairs()

    (features_path,) = work_dir.glob("features_policy_train_layer4-*.npz")
    (models_path,) = work_dir.glob("preference_models-*.npz")
    features, models = np.load(features_path), np.load(models_path)
    labelled = human_pairs["label_mask"]
    for k in range(2):
        weights, mean, scale = (models[f"judge_{k}_{f}"].astype(np.float64)
                                for f in ("weights", "feature_mean", "feature_scale"))
        margin = (((features["first"] - mean) / scale) @ weights - ((features["second"] - mean) / scale) @ weights)
        gold = 1.0 / (1.0 + np.exp(-margin))
        rows = labelled[:, k]
        np.testing.assert_allclose(soft_pairs["preference_probs"][rows, k], gold[rows], rtol=1e-5, atol=1e-6)
        drawn = sampled_pairs["preference_probs"][rows, k]
        assert set(np.unique(drawn)) <= {0.0, 1.0}
        assert gold[rows][drawn == 1].mean() > gold[rows][drawn == 0].mean()
        # The gold protocol labels with the judges, the human one with the (different) labelers.
        np.testing.assert_array_equal(soft.labeler(k).weights, models[f"judge_{k}_weights"])
        np.testing.assert_array_equal(human.labeler(k).weights, models[f"labeler_{k}_weights"])
        assert not np.allclose(models[f"judge_{k}_weights"], models[f"labeler_{k}_weights"])
    # Unlabelled entries, the label mask and the responses are the human data's.
    np.testing.assert_array_equal(soft_pairs["preference_probs"][~labelled], human_pairs["preference_probs"][~labelled])
    np.testing.assert_array_equal(soft_pairs["label_mask"], labelled)
    np.testing.assert_array_equal(soft_pairs["tokens"], human_pairs["tokens"])
    assert (human_pairs["preference_probs"][labelled] == 1.0).all()  # HH puts the chosen response first
    np.testing.assert_array_equal(sampled.policy_pairs()["preference_probs"], sampled_pairs["preference_probs"])


def _pipeline_splits(work_dir):
    """The tokenized splits the pipeline's runs trained on, read through their content-keyed cache (other modules'
    runs share the work directory with other data settings, so the cache is found by key, not by listing)."""
    from mopo_jax.configs import load_config
    from mopo_jax.experiment.config import ExperimentConfig
    from mopo_jax.experiment.hh_rlhf import prepare_data

    return prepare_data(load_config(ExperimentConfig, str(CONFIG), [f"work_dir={work_dir}", f"data.source={DATA}"]))


def test_labelers_and_judges_are_trained_on_disjoint_prompts(pipeline):
    _, _, evaluated, work_dir = pipeline
    data = _pipeline_splits(work_dir)
    prompts = {split: {tuple(row[mask > 0]) for row, mask in zip(d["prompt_tokens"], d["prompt_mask"])}
               for split, d in data.items()}
    assert not prompts["labeler_train"] & prompts["judge_train"]
    assert not (prompts["labeler_train"] | prompts["judge_train"]) & prompts["eval"]
    summary = evaluated["reference"]["preference_models"]
    for role in ("labeler", "judge"):
        for name in ("helpfulness", "harmlessness"):
            assert 0.0 <= summary[f"{role}_{name}"]["heldout_accuracy"] <= 1.0


def test_dual_prompts_are_distinct_balanced_and_apart_from_training_and_evaluation(pipeline):
    """The policy-sample dual reads distinct labeler-train prompts, half from each objective's pairs; none of them
    is a policy-train or an evaluation prompt (its readings must not be the evaluation's, nor measure pairs the
    policy trained on). Too few prompts is a named error."""
    from mopo_jax.experiment.policy_samples import dual_prompt_rows

    _, _, _, work_dir = pipeline
    data = _pipeline_splits(work_dir)
    labeler = data["labeler_train"]
    rows = dual_prompt_rows(labeler["prompt_tokens"], labeler["objective"], 6)
    prompt = lambda d, r: tuple(d["prompt_tokens"][r][d["prompt_mask"][r] > 0])  # noqa: E731
    chosen = [prompt(labeler, r) for r in rows]
    assert len(set(chosen)) == 6 and sorted(np.bincount(labeler["objective"][rows])) == [3, 3]
    for split in ("eval", "policy_train"):
        others = {prompt(data[split], r) for r in range(len(data[split]["prompt_tokens"]))}
        assert not set(chosen) & others
    with pytest.raises(ValueError, match="dual.prompts"):
        dual_prompt_rows(labeler["prompt_tokens"], labeler["objective"], 10_000)


def test_export_writes_the_whole_trained_policy_for_transformers(pipeline, tmp_path):
    """`mopo export RUN_DIR --out DIR`: transformers loads DIR as the trained policy: the base model's frozen blocks
    with the run's trained top block (taken here from policy.npz by hand, in NumPy), the same logits; `mopo generate`
    reads it; a non-empty --out is refused."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import mopo_jax.models as M
    from mopo_jax.cli import main

    root, _, _, _ = pipeline
    run, out = root / "mopo_pairwise", tmp_path / "hf"
    assert main(["export", str(run), "--out", str(out)]) == 0
    config, base = M.load_pretrained("smollm2-135m")
    stored = np.load(run / "policy.npz")
    top = stored["layers/wq"].shape[0]
    policy = jax.tree_util.tree_map_with_path(
        lambda path, leaf: _replace_top(np.asarray(leaf), stored, jax.tree_util.keystr(path), top), base)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 24))
    ours = np.asarray(M.forward(config, jax.tree.map(jnp.asarray, policy), jnp.asarray(tokens)))
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = exported(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=2e-4, rtol=0)
    base_logits = np.asarray(M.forward(config, base, jnp.asarray(tokens)))
    assert np.abs(theirs - base_logits).max() > 1e-3  # the trained block, not the base model's
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False) == \
        M.load_tokenizer("smollm2-135m").apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert main(["generate", "--model", str(out), "--prompt", "Hi", "--max-new-tokens", "4"]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 2


def _replace_top(leaf, stored, key, top):
    """A base parameter with the run's trained values: stacked layers get their top ``top`` blocks replaced, other
    stored parameters (the embedding, the final norm) are taken whole."""
    name = "/".join(part.strip("[]'\"") for part in key.split("]") if part)
    if name not in stored:
        return leaf
    if name.startswith("layers/"):
        return np.concatenate([leaf[:-top], stored[name]], axis=0)
    return stored[name]


def test_eval_reports_each_run_and_stage(pipeline, capsys, tmp_path):
    """`mopo eval A B` says which run of how many it is on and each stage it enters, and names the one it could
    not evaluate."""
    from mopo_jax.cli import main

    root, _, _, _ = pipeline
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(root / "reference"), str(tmp_path / "empty")]) == 2
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert f"mopo eval: run 1 of 2: {root / 'reference'}" in lines
    assert f"mopo eval: run 2 of 2: {tmp_path / 'empty'}" in lines
    stages = [line.split(": ", 1)[1] for line in lines if line.startswith("[") and f"eval {root / 'reference'}" in line]
    assert [s.split(" ")[0] for s in stages] == ["data,", "the", "implicit", "2", "wrote"], stages
    assert str(tmp_path / "empty") in captured.err
