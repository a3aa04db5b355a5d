"""The ahead-of-time memory report (mopo_jax.bench.memory) on the tiny model: it compiles, reports positive per-device
numbers, and sharding over more devices divides the per-device state."""

import json

import jax
import pytest

from mopo_jax.bench import memory

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices; see tests/conftest.py")

SMALL = dict(preset="tiny", global_batch_pairs=8, seq_len=64, compute_dtype="float32", remat="full")


@pytest.fixture(scope="module")
def reports():
    return {mesh: memory.memory_report(mesh=mesh, **SMALL) for mesh in ("fsdp=2", "fsdp=8")}


def test_report_has_positive_per_device_numbers(reports):
    report = reports["fsdp=8"]
    per_device = report["per_device"]
    for key in ("argument", "output", "temp", "total"):
        assert per_device[key]["bytes"] > 0, key
    assert per_device["total"]["bytes"] == (per_device["argument"]["bytes"] + per_device["output"]["bytes"]
                                            + per_device["temp"]["bytes"] - per_device["alias"]["bytes"])
    # The donated state is aliased to the new state.
    assert per_device["alias"]["bytes"] >= 0.9 * report["state_per_device"]["total"]["bytes"]
    assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert report["params"] == report["trained_params"] > 0
    assert report["fits"] is True and report["compile_seconds"] > 0
    json.dumps(report)


def test_more_fsdp_devices_hold_less_per_device(reports):
    small, large = reports["fsdp=2"], reports["fsdp=8"]
    assert small["per_device"]["argument"]["bytes"] > 2 * large["per_device"]["argument"]["bytes"]
    assert small["state_per_device"]["params"]["bytes"] > 3 * large["state_per_device"]["params"]["bytes"]


def test_more_fsdp_devices_divide_the_activations(reports):
    # Pure data parallelism over fsdp: 4x the devices, about 1/4 of the activations per device.
    small, large = reports["fsdp=2"], reports["fsdp=8"]
    assert large["per_device"]["temp"]["bytes"] < 0.5 * small["per_device"]["temp"]["bytes"]


def test_too_few_devices_is_a_clear_error():
    with pytest.raises(RuntimeError, match="XLA_FLAGS=--xla_force_host_platform_device_count=16"):
        memory.memory_report(mesh="fsdp=16", **SMALL)


def test_main_prints_json_and_reexecs_for_more_devices(capfd):
    # In-process: the backend is up with 8 devices, enough for this mesh.
    assert memory.main(["--preset", "tiny", "--mesh", "fsdp=2,tensor=2", "--seq-len", "32", "--pairs", "4"]) == 0
    report = json.loads(capfd.readouterr().out)
    assert report["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2} and report["devices"] == 4
    # 16 devices: more than this process has, so main re-runs itself with XLA_FLAGS set.
    assert memory.main(["--preset", "tiny", "--mesh", "fsdp=16", "--seq-len", "32", "--pairs", "16"]) == 0
    report = json.loads(capfd.readouterr().out)
    assert report["devices"] == 16 and report["per_device"]["total"]["bytes"] > 0


def test_prompt_and_response_lengths_lora_base_dtype_and_loss_flags(capfd):
    # 16 prompt + 16 response columns: 32-token sequences, only the response columns unembedded; a bfloat16 frozen
    # base under float32 LoRA adapters; the DPO step; the command that made the report.
    argv = ["--preset", "tiny", "--mesh", "fsdp=2", "--pairs", "4", "--prompt-len", "16", "--response-len", "16",
            "--loss", "dpo", "--lora-rank", "4", "--param-dtype", "bfloat16", "--dtype", "float32",
            "--attention", "reference"]
    assert memory.main(argv) == 0
    report = json.loads(capfd.readouterr().out)
    config = report["config"]
    assert (config["seq_len"], config["completion_start"], config["prompt_len"], config["response_len"]) == (
        32, 16, 16, 16)
    assert (config["loss"], config["lora_rank"], config["param_dtype"], config["attention"]) == (
        "dpo", 4, "bfloat16", "reference")
    assert config["lora_targets"] == ["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"]
    assert report["command"] == "python -m mopo_jax.bench.memory " + " ".join(argv)
    # Frozen base in bfloat16 (2 bytes a parameter, about halved by fsdp=2); adapters in float32 (more than 2 bytes a
    # parameter on a device even if none were sharded).
    state = report["state_per_device"]
    assert report["params"] // 2 <= state["base"]["bytes"] <= report["params"] * 2 // 2 + 1024
    assert state["params"]["bytes"] > report["trained_params"] * 2
    with pytest.raises(SystemExit):
        memory.main(["--preset", "tiny", "--prompt-len", "16"])
