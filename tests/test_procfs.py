"""/proc holds bytes users choose: another mount's path (not UTF-8, or with a
space) and a process's name. Read as text, one mount named b"\\xff" anywhere on
the machine made every `snapfs mount` fail with a traceback; a mount point with
a space was never found in mountinfo, so its kernel tuning was silently skipped;
a reader process named with such bytes made the interrupt check raise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

from fixtures_mount import Mount
from snapfs.fs.daemon import READAHEAD_KB
from snapfs.fs.nodes.files import signalled
from snapfs.local.owner import _start_time
from snapfs.procfs import is_mounted, mount_device, mounts, unescape
from test_mount_ops import kernel_tuning


def test_unescape_undoes_the_kernels_octal_escapes() -> None:
    assert unescape(rb"/a\040b\011c\012d\134e") == b"/a b\tc\nd\\e"
    assert unescape(rb"/plain") == b"/plain"


@pytest.fixture
def odd_tmpfs(tmp_path: Path) -> Iterator[str]:
    """A tmpfs mounted on a directory whose name is not UTF-8 and has a space."""
    where = os.fsdecode(os.fsencode(tmp_path) + b"/odd \xff\xfe")
    os.mkdir(where)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", where], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", where], check=False)


def test_a_mount_of_any_name_is_found(odd_tmpfs: str) -> None:
    assert is_mounted(odd_tmpfs)
    st = os.stat(odd_tmpfs)
    assert mount_device(odd_tmpfs) == f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    assert any(m.mountpoint == odd_tmpfs and m.fstype == "tmpfs" for m in mounts())


@pytest.mark.mount
def test_snapfs_mounts_beside_a_mount_of_a_non_utf8_name_and_on_a_spaced_one(
        odd_tmpfs: str, mount_factory: Callable[..., Mount], store_with_volume: Path,
        tmp_path: Path) -> None:
    m = mount_factory(store_with_volume)  # failed with UnicodeDecodeError before
    assert sorted(os.listdir(m.project)) == ["imports", "snapshots", "tags", "volumes"]
    m.stop()
    spaced = Mount(tmp_path / "mnt with space", store_with_volume, extra=[], env={})
    spaced.path.mkdir()
    spaced.start()
    try:
        assert kernel_tuning(spaced)[0] == READAHEAD_KB  # tuned: it was found
    finally:
        spaced.stop()


@pytest.fixture
def oddly_named() -> Iterator[int]:
    """A process whose name (comm, in /proc/PID/stat and status) is not UTF-8."""
    code = ("import ctypes, sys, time; ctypes.CDLL(None).prctl(15, b'x\\xff) y', 0, 0, 0);"
            "print('ok', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ok\n"
        yield proc.pid
    finally:
        proc.kill()
        proc.communicate()


def test_a_process_of_any_name_is_read(oddly_named: int) -> None:
    assert b"\xff" in Path(f"/proc/{oddly_named}/stat").read_bytes()
    assert signalled(oddly_named) is False
    start = _start_time(oddly_named, running=True)
    assert start is not None and start.isdigit()
