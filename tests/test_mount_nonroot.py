"""Use without root (issue 18): a regular user (``nobody``, with a home of their own)
makes a store under that home, mounts through fusermount3, snapshots a volume file
they own, reads it back, and unmounts; the refusals name what needs root.

The daemon runs as that user with the system python3 of the same minor version as
the test's interpreter (the venv's own python lives under root's 0700 home) and the
venv's site-packages on PYTHONPATH."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

import pytest

from fixtures_mount import alive, is_mounted, mount_line, run, stop_process
from fixtures_perms import NOBODY, NOBODY_UID

pytestmark = pytest.mark.mount

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"


def _site_packages() -> str:
    return sysconfig.get_paths()["purelib"]  # the venv's, where pyfuse3 and trio are


def _usable() -> str | None:
    if os.getuid() != 0:
        return "needs root to become another user"
    if not os.path.exists(SYSTEM_PYTHON):
        return f"no {SYSTEM_PYTHON}"
    version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    if version != str(tuple(sys.version_info[:2])):
        return f"{SYSTEM_PYTHON} is {version}, the venv's compiled modules need " \
               f"{sys.version_info[:2]}"
    return None


@pytest.fixture
def user_home(nobody_dir: Path) -> Iterator[Path]:
    """nobody's home (0700, theirs), with a volume file they own, and /dev/fuse
    usable by every user as distributions ship it (0666) while the test runs."""
    reason = _usable()
    if reason:
        pytest.skip(reason)
    home = nobody_dir / "home"
    home.mkdir(mode=0o700)
    (home / "mnt").mkdir()
    vol = home / "disk.raw"
    with open(vol, "wb") as f:
        f.write(os.urandom(2 << 20))
        f.truncate(8 << 20)
    for p in (home, home / "mnt", vol):
        os.chown(p, NOBODY_UID, NOBODY_UID)
    vol.chmod(0o600)
    fuse_mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    os.chmod("/dev/fuse", 0o666)
    try:
        yield home
    finally:
        os.chmod("/dev/fuse", fuse_mode)
        mnt = home / "mnt"
        if is_mounted(mnt):
            try:
                pid: int | None = int(os.getxattr(mnt, "user.pid"))
            except OSError:
                pid = None
            run("fusermount3", "-u", "-z", mnt, check=False)
            if pid is not None and alive(pid):
                stop_process(pid)


def as_user(home: Path, *args: str | Path, tool: bool = False
            ) -> subprocess.CompletedProcess[str]:
    """``snapfs ARGS`` (or the tool ARGS) as nobody, with HOME their home."""
    env = ["env", "-i", f"HOME={home}", "PATH=/usr/local/bin:/usr/bin:/bin",
           f"PYTHONPATH={REPO}:{_site_packages()}"]
    cmd = [str(a) for a in args] if tool else [SYSTEM_PYTHON, "-m", "snapfs",
                                               *[str(a) for a in args]]
    return subprocess.run(["runuser", "-u", NOBODY, "--", *env, *cmd], capture_output=True,
                          text=True, timeout=120, cwd="/")


def ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_a_regular_user_mounts_snapshots_reads_and_unmounts(user_home: Path) -> None:
    home, mnt = user_home, user_home / "mnt"
    ok(as_user(home, "volume", "add", "disk", home / "disk.raw"))
    store = home / ".local" / "share" / "snapfs"
    st = os.stat(store)
    assert st.st_uid == NOBODY_UID and stat.S_IMODE(st.st_mode) == 0o700
    # allow_other needs user_allow_other in /etc/fuse.conf (root's say): one line.
    if "user_allow_other" not in Path("/etc/fuse.conf").read_text():
        res = as_user(home, "mount", mnt, "-o", "allow_other")
        assert res.returncode != 0 and res.stderr.count("\n") == 1, res.stderr
        assert "user_allow_other" in res.stderr and "only root" in res.stderr
        assert "Traceback" not in res.stderr and not is_mounted(mnt)
    ok(as_user(home, "mount", mnt))
    line = mount_line(mnt)
    assert line is not None
    assert f"user_id={NOBODY_UID}" in line  # mounted through fusermount3, as nobody
    project = mnt / "fr-par-1" / "default"
    ok(as_user(home, "mkdir", project / "volumes" / "disk" / "mine", tool=True))
    assert ok(as_user(home, "wait", project / "snapshots" / "mine")) == "available\n"
    ok(as_user(home, "cmp", home / "disk.raw", project / "snapshots" / "mine" / "image.raw",
               tool=True))
    pid = int(ok(as_user(home, "getfattr", "--absolute-names", "--only-values", "-n",
                         "user.pid", mnt, tool=True)))
    assert os.stat(f"/proc/{pid}").st_uid == NOBODY_UID  # the daemon is theirs
    ok(as_user(home, "umount", mnt))
    assert not is_mounted(mnt) and not alive(pid)
    log = (store / "mount.log").read_text()
    assert "unmounted" in log and "Traceback" not in log


def test_without_dev_fuse_access_mount_says_what_needs_root(user_home: Path) -> None:
    os.chmod("/dev/fuse", 0o600)  # as some containers ship it
    home = user_home
    res = as_user(home, "mount", home / "mnt")
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "/dev/fuse is not readable and writable by you" in res.stderr
    assert "chmod 0666 /dev/fuse" in res.stderr
    assert not is_mounted(home / "mnt")
