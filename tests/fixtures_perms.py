"""Fixtures for the tests run partly as user ``nobody`` (runuser): a directory
tree that user can reach (pytest's tmp_path is root's alone), always removed."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

NOBODY = "nobody"
NOBODY_UID = 65534


def as_nobody(*cmd: str | Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """A real tool run as user nobody (never checked: callers assert the outcome)."""
    return subprocess.run(["runuser", "-u", NOBODY, "--", *[str(c) for c in cmd]],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A fresh directory under /tmp that every user may traverse (0755, root's)."""
    d = Path(tempfile.mkdtemp(prefix="snapfs-shared-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def nobody_dir(shared_dir: Path) -> Path:
    """A directory inside shared_dir owned by nobody (who may replace what is in it)."""
    d = shared_dir / "nobody"
    d.mkdir()
    os.chown(d, NOBODY_UID, NOBODY_UID)
    return d
