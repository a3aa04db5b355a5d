"""`gs://` for real: a run whose directory is in a bucket trains, is resumed from its checkpoint there and is
evaluated, and a model directory in a bucket loads as its local copy does. The bucket is an in-process GCS
server (tests/gcs_emulator.py) reached by the clients a cloud run uses, gcsfs under every file the library writes
and TensorStore under Orbax's checkpoints, so the code path is the one of a TPU slice with a bucket root."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gcs_emulator import serving
from lm_assets import HH_DATA as DATA, hf_reference_model, needs_hh_data, needs_smollm2
from tiny_runs import CONFIG

pytest.importorskip("gcsfs")


def _train(work_dir, run_dir, *overrides):
    from mopo_jax.cli import main

    return main(["train", "--config", str(CONFIG), f"work_dir={work_dir}", f"data.source={DATA}",
                 f"run_dir={run_dir}", "method.name=mopo_pairwise", "training.batch_pairs=8", "training.save_every=2",
                 *overrides])


def _losses(records: str) -> tuple[list[int], np.ndarray]:
    rows = [json.loads(line) for line in records.splitlines()]
    return [r["step"] for r in rows], np.asarray([r["loss"] for r in rows])


@needs_hh_data
@needs_smollm2
def test_a_run_in_a_bucket_trains_resumes_and_evaluates(tiny_work_dir, tmp_path, monkeypatch, caplog):
    import logging

    from etils import epath

    from mopo_jax.cli import main

    assert _train(tiny_work_dir, tmp_path / "local", "training.steps=4") == 0
    local_steps, local_losses = _losses((tmp_path / "local" / "metrics.jsonl").read_text())

    with serving(monkeypatch, ["bucket"]) as emulator:
        # The run directory in the bucket; the work directory's caches go through the same storage functions, and
        # staying local (warm from the other tiny runs) keeps the test short.
        run = "gs://bucket/hh/run"
        assert _train(tiny_work_dir, run, "training.steps=2") == 0
        with caplog.at_level(logging.INFO, logger="mopo_jax.training.loop"):
            assert _train(tiny_work_dir, run, "training.steps=4") == 0
        assert "resuming at step 2" in caplog.text  # from the checkpoint in the bucket
        assert main(["eval", run]) == 0
        # What the launcher fetches from a bucket root (experiments/hh_rlhf.sh's last stage).
        assert main(["pareto", run, "--out", "gs://bucket/hh/results/pareto.png",
                     "--results", "gs://bucket/hh/results/results.json"]) == 0
        results = json.loads(epath.Path("gs://bucket/hh/results/results.json").read_text())
        names = emulator.names("bucket")
        steps, losses = _losses(epath.Path(run, "metrics.jsonl").read_text())
        evaluation = json.loads(epath.Path(run, "eval.json").read_text())

    # Everything lives in the bucket, the checkpoints included (written by TensorStore through the same server).
    for expected in ("hh/run/config.yaml", "hh/run/policy.npz", "hh/run/train.json", "hh/run/checkpoints/2/",
                     "hh/run/checkpoints/4/", "hh/run/eval.json"):
        assert any(name.startswith(expected) for name in names), (expected, names)
    assert not (tmp_path / "gs:").exists()
    # The resumed run is the run that never stopped, step by step.
    assert steps == local_steps == [1, 2, 3, 4]
    np.testing.assert_allclose(losses, local_losses, rtol=1e-5)
    assert evaluation["config"]["training"]["steps"] == 4 and evaluation["config"]["run_dir"] == run
    assert set(evaluation["evaluation"]["expected_win_rate"]) == {"helpfulness", "harmlessness"}
    assert "hh/results/pareto.png" in names and results["runs"][0]["run_dir"] == run


def test_a_model_directory_in_a_bucket_loads_as_its_local_copy(tmp_path, monkeypatch):
    """Weights read by byte range from safetensors shards in the bucket, the tokenizer from its files, and a cache
    key that changes when an object is rewritten."""
    import jax
    from etils import epath

    from mopo_jax import storage
    from mopo_jax.models import load_pretrained, load_tokenizer
    from mopo_jax.models.weights import ModelUnavailable, local_model_files

    local = tmp_path / "model"
    hf_reference_model("llama-gqa-untied").save_pretrained(local, max_shard_size="100KB")  # several shards
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    tokenizer.save_pretrained(local)
    assert len(list(local.glob("*.safetensors"))) > 1

    with serving(monkeypatch, ["bucket"]):
        url = "gs://bucket/models/tiny-llama"
        for file in local.iterdir():
            epath.Path(url, file.name).write_bytes(file.read_bytes())
        config, params = load_pretrained(url)
        remote_tokens = load_tokenizer(url)("hello world")["input_ids"]
        before = storage.input_files_signature(local_model_files(url))
        shard = sorted(local.glob("*.safetensors"))[0].name
        epath.Path(url, shard).write_bytes(epath.Path(url, shard).read_bytes())  # same bytes, a new object
        after = storage.input_files_signature(local_model_files(url))
        with pytest.raises(ModelUnavailable, match="gs://bucket/models/missing.*config.json"):
            load_pretrained("gs://bucket/models/missing")

    local_config, local_params = load_pretrained(str(local))
    assert config == local_config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, local_params)
    assert remote_tokens == load_tokenizer(str(local))("hello world")["input_ids"] == [1, 2]
    changed = [a[0] for a, b in zip(before, after) if a != b]
    assert changed == [shard] and len(before) == len(list(local.iterdir()))


@needs_hh_data
@needs_smollm2
def test_a_work_dir_in_a_bucket_caches_a_stage_there_and_reads_it_back(tiny_work_dir, monkeypatch):
    """The work directory's caches (a multi-host slice shares them through its bucket root) go through the same
    storage functions: the data stage is built into the bucket once, then read back from it, equal to a local build."""
    from mopo_jax.configs import load_config
    from mopo_jax.experiment import hh_rlhf
    from mopo_jax.experiment.config import ExperimentConfig

    def config(work_dir):
        return load_config(ExperimentConfig, str(CONFIG), [f"work_dir={work_dir}", f"data.source={DATA}",
                                                           "run_dir=unused"])

    local = hh_rlhf.prepare_data(config(tiny_work_dir))
    with serving(monkeypatch, ["bucket"]) as emulator:
        built = hh_rlhf.prepare_data(config("gs://bucket/work"))
        names = emulator.names("bucket")

        def no_rebuild(*args, **kwargs):
            raise AssertionError("the data stage was built again instead of read from the bucket")

        monkeypatch.setattr(hh_rlhf, "_tokenize_splits", no_rebuild)
        read_back = hh_rlhf.prepare_data(config("gs://bucket/work"))
    written = {name.rsplit("/", 1)[-1] for name in names if name.startswith("work/data-")}
    assert written >= {f"{split}.npz" for split in hh_rlhf.SPLIT_CAPS}, written
    for arrays in (built, read_back):
        assert arrays.keys() == local.keys()
        for split in local:
            assert arrays[split].keys() == local[split].keys()
            for name in local[split]:
                np.testing.assert_array_equal(arrays[split][name], local[split][name])
