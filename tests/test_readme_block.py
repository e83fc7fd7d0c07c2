"""The README's "Using it" block, extracted from README.md and run as a bash script on
a fresh store, so that the two cannot drift (issue 18). Only its first line (where
the images and the mount go) is changed, to paths under the test's directory."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from fixtures_mount import is_mounted, run

pytestmark = [pytest.mark.mount, pytest.mark.s3]

REPO = Path(__file__).resolve().parent.parent
FIRST_LINE = re.compile(r"^IMAGES=\S+ MNT=\S+")


def using_it_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Using it\n", 1)[1]
    m = re.search(r"```sh\n(.*?)```", section, re.S)
    assert m is not None, "no sh block under 'Using it'"
    return m.group(1)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A PATH whose ``snapfs`` is this tree's, a fresh store and S3 directory; the
    mount and the S3 server are stopped whatever happens."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "snapfs"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m snapfs "
                       '"$@"\n')
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SCW_"))}
    env.update(PATH=f"{bin_dir}:{Path(sys.executable).parent}:{env['PATH']}",
               SNAPFS_STORE=str(tmp_path / "store"), SNAPFS_S3_DIR=str(tmp_path / "s3"),
               AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/nonexistent")
    env.pop("PYTHONPATH", None)
    try:
        yield tmp_path, env
    finally:
        mnt = tmp_path / "mnt"
        if mnt.exists() and is_mounted(mnt):
            pid = int(os.getxattr(mnt, "user.pid"))
            run("fusermount3", "-u", "-z", mnt, check=False)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        subprocess.run([str(REPO / "scripts" / "s3-local"), "stop"], env=env, timeout=60)


def test_the_using_it_block_runs_as_written(sandbox: tuple[Path, dict[str, str]]) -> None:
    root, env = sandbox
    block = using_it_block()
    assert FIRST_LINE.match(block), "the block must start with IMAGES=... MNT=..."
    script = FIRST_LINE.sub(f"IMAGES={root}/images MNT={root}/mnt", block, count=1)
    res = subprocess.run(["bash", "-euo", "pipefail", "-x", "-c", script], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "Traceback" not in res.stderr
    out = res.stdout
    # The waits: the snapshot's, then the export's and the import's.
    assert out.count("available\n") >= 1 and out.count("success\n") >= 2
    assert '"state": "success"' in out  # the export's status
    assert not is_mounted(root / "mnt")  # umounted
    log = (root / "store" / "mount.log").read_text()
    assert "unmounted" in log and "bug #" not in log
