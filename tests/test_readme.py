"""The README is a front door that does not drift from the files: short, its links resolve, every number it links
is found in the file it links to, and its test command is the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
LINK = re.compile(r"\[([^\]]+)\]\(([^)#\s]+)(#[^)]*)?\)")
NUMBER = re.compile(r"^[-+]?\d[\d.,]*(e-?\d+)?( ?(%|GiB|x|s|min))?$|^\d+ of \d+$|^\d+/\d+$")


def _local_links():
    return [(text, target) for text, target, _ in LINK.findall(README) if "://" not in target]


def test_the_readme_is_a_front_door():
    assert len(README.splitlines()) <= 150
    assert "RESULTS_BLOCK" not in README


def test_every_local_link_resolves():
    missing = [target for _, target in _local_links() if not (REPO / target).exists()]
    assert not missing, missing


def test_every_linked_number_is_in_its_file():
    numbers = [(text, target) for text, target in _local_links() if NUMBER.match(text.strip("*"))]
    assert len(numbers) >= 10  # the results summary links its numbers
    absent = [(text, target) for text, target in numbers
              if text.strip("*") not in (REPO / target).read_text(errors="replace")]
    assert not absent, absent


def test_the_test_command_is_the_one_ci_runs():
    command = README.split("```bash\n", 1)[1].splitlines()[1]
    ci = (REPO / ".ci" / "run").read_text()
    for part in command.split(" && "):
        assert part.replace("python3 -m pip install", "python3 -m pip install -q") in ci, part
