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
