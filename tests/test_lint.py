"""The package is mypy strict and ruff clean (the README), checked by the suite.

``.ci/run`` runs the test command of the README and nothing else, so the
checks the team runs before a commit (``ruff check``, ``ruff format --check``
and ``mypy`` in strict mode on the package) run here, each on a fresh
process from the virtual environment the suite runs in (``scripts/bootstrap``
installs the ``dev`` extra with both tools). The tests' own types are not
checked: they are not annotated to mypy's strict standard.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LINTED = ("samvad", "tests", "bench")


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    tool = BIN / command[0]
    assert tool.exists(), f"{command[0]} is not installed next to {sys.executable}"
    return subprocess.run(
        [str(tool), *command[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )


def test_ruff_finds_nothing() -> None:
    result = _run("ruff", "check", "--no-cache", *LINTED)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_code_is_formatted() -> None:
    result = _run("ruff", "format", "--check", "--no-cache", *LINTED)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(600)
def test_mypy_strict_finds_nothing_in_the_package() -> None:
    result = _run("mypy", "samvad")
    assert result.returncode == 0, result.stdout + result.stderr
