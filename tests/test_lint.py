"""The code stays clean: ruff (pyproject's rules) over everything, mypy over the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def check(*cmd: str) -> None:
    res = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}:\n{res.stdout}{res.stderr}"


def test_ruff() -> None:
    check("ruff", "check", "snapfs", "tests", "scripts")


def test_mypy() -> None:
    check("mypy", "snapfs")
