"""What the multi-process tests share: a free local port for a job's coordinator, and a process's output collected
with a deadline, after which the whole job is killed and the test fails with what the process printed."""

from __future__ import annotations

import socket
import subprocess

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def communicate(proc: subprocess.Popen, job: list[subprocess.Popen], timeout_s: float, what: str) -> tuple[str, str]:
    """``proc``'s ``(stdout, stderr)``; past ``timeout_s`` every process of ``job`` is killed and the test fails."""
    try:
        return proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for other in job:
            other.kill()
        out, err = proc.communicate()
        pytest.fail(f"{what} still ran after {timeout_s} s\nstdout (tail):\n{(out or '')[-3000:]}\n"
                    f"stderr (tail):\n{(err or '')[-3000:]}")


def run_python(code: str, args: list[str], timeout_s: float, what: str) -> str:
    """Runs ``code`` (with ``args`` as ``sys.argv[1:]``) in a fresh Python process of the test session's environment
    (its simulated devices and compilation cache; this folder importable) and returns its stdout; a non-zero exit
    or a run past ``timeout_s`` fails the test with what the process printed.

    The heaviest experiments of the suite run this way: a process that trains several models on the 8-device mesh
    holds gigabytes of placed parameters and compiled programs, which it hands back when it exits, while a pytest
    worker keeps its peak for the rest of the session."""
    import os
    import sys
    from pathlib import Path

    here = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    out, err = communicate(proc, [proc], timeout_s, what)
    if proc.returncode != 0:
        pytest.fail(f"{what} exited with {proc.returncode}\nstdout (tail):\n{out[-3000:]}\nstderr (tail):\n"
                    f"{err[-5000:]}")
    return out
