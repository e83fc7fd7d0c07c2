"""Mounting at boot (issue 18): ``mount -t fuse.snapfs``, an /etc/fstab line
(``mount --fstab``), each of ``umount``, ``fusermount3 -u`` and ``snapfs umount``
ending the daemon, and systemd's readiness protocol for the shipped unit.

mount(8) clears PATH before it runs mount.fuse3, whose shell then finds ``snapfs``
on the default PATH only (/usr/local/bin, /usr/bin, /bin: why scripts/setup links
it into /usr/local/bin). The test does the same inside a private mount namespace:
a ``snapfs`` of this tree bind-mounted over /usr/local/bin, seen by nothing else."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from fixtures_mount import alive, run, snapfs, stop_process

pytestmark = pytest.mark.mount

REPO = Path(__file__).resolve().parent.parent
UNMOUNTS = {"umount": "umount {mnt}", "fusermount3": "fusermount3 -u {mnt}",
            "snapfs-umount": "snapfs umount {mnt}"}

pytest.importorskip("pyfuse3")
if shutil.which("unshare") is None or shutil.which("mount.fuse3") is None:
    pytest.skip("needs unshare and mount.fuse3", allow_module_level=True)


@pytest.fixture
def boot(tmp_path: Path) -> Iterator[Path]:
    """tmp_path with bin/snapfs (this tree's CLI), a store with volume v, mnt/.
    Any daemon a test leaves is stopped afterwards (its pid is in ``pid``)."""
    (tmp_path / "bin").mkdir()
    wrapper = tmp_path / "bin" / "snapfs"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m snapfs "
                       '"$@"\n')
    wrapper.chmod(0o755)
    (tmp_path / "mnt").mkdir()
    with open(tmp_path / "vol.raw", "wb") as f:
        f.write(os.urandom(1 << 20))
        f.truncate(8 << 20)
    snapfs("volume", "add", "v", tmp_path / "vol.raw", "--store", tmp_path / "store")
    yield tmp_path
    pid_file = tmp_path / "pid"
    if pid_file.exists() and pid_file.read_text().strip():
        pid = int(pid_file.read_text())
        if alive(pid):
            os.kill(pid, 15)  # its mount lives in the test's namespace only
            stop_process(pid)


def in_namespace(root: Path, script: str) -> subprocess.CompletedProcess[str]:
    """``script`` (sh, set -e) in a private mount namespace where /usr/local/bin
    holds this tree's ``snapfs``; a mount left behind is lifted on the way out."""
    full = (f"set -e\ntrap 'umount -l {root}/mnt 2>/dev/null || true' EXIT\n"
            f"mount --bind {root}/bin /usr/local/bin\n{script}")
    # An empty environment, as mount(8) gives its helpers: nothing leaks in.
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", full],
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"})


def round_trip(root: Path, mount_cmd: str, unmount: str) -> list[str]:
    mnt = root / "mnt"
    res = in_namespace(root, f"""
{mount_cmd}
getfattr --absolute-names --only-values -n user.pid {mnt} > {root}/pid
pid=$(cat {root}/pid)
ls {mnt}/fr-par-1/default/volumes
mkdir {mnt}/fr-par-1/default/volumes/v/boot
snapfs wait {mnt}/fr-par-1/default/snapshots/boot
cmp {root}/vol.raw {mnt}/fr-par-1/default/snapshots/boot/image.raw
grep " {mnt} " /proc/self/mounts
{UNMOUNTS[unmount].format(mnt=mnt)}
for i in $(seq 150); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
kill -0 $pid 2>/dev/null && echo daemon-alive || echo daemon-gone
grep -c " {mnt} " /proc/self/mounts || true
""")
    assert res.returncode == 0, res.stderr + res.stdout
    return res.stdout.splitlines()


@pytest.mark.parametrize("unmount", sorted(UNMOUNTS))
def test_fstab_line_mounts_and_every_unmount_ends_the_daemon(boot: Path, unmount: str
                                                             ) -> None:
    fstab = boot / "fstab"
    # What a user writes in /etc/fstab: fstab/systemd options are ignored, snapfs
    # options (page_cache) and FUSE ones (allow_other) honoured.
    fstab.write_text(f"# snapfs at boot\n{boot}/store {boot}/mnt fuse.snapfs "
                     "noauto,_netdev,nofail,x-systemd.automount,page_cache,"
                     "allow_other 0 0\n")
    out = round_trip(boot, f"mount --fstab {fstab} {boot}/mnt", unmount)
    assert out[0] == "v"
    line = next(x for x in out if " fuse.snapfs " in x)
    assert "allow_other" in line.split()[3]
    assert out[-2:] == ["daemon-gone", "0"]
    log = (boot / "store" / "mount.log").read_text()
    assert "unmounted" in log and "Traceback" not in log


def test_mount_t_fuse_snapfs_with_options(boot: Path) -> None:
    out = round_trip(boot, f"mount -t fuse.snapfs {boot}/store {boot}/mnt "
                     "-o backend=local,direct_io,default_permissions", "umount")
    line = next(x for x in out if " fuse.snapfs " in x)
    assert "default_permissions" in line.split()[3]
    assert out[-2:] == ["daemon-gone", "0"]


def test_an_unknown_option_in_fstab_fails_the_mount_with_one_line(boot: Path) -> None:
    fstab = boot / "fstab"
    fstab.write_text(f"{boot}/store {boot}/mnt fuse.snapfs bogus_option 0 0\n")
    res = in_namespace(boot, f"mount --fstab {fstab} {boot}/mnt")
    assert res.returncode != 0
    assert "unsupported mount option 'bogus_option'" in res.stderr
    assert "Traceback" not in res.stderr


def test_foreground_mount_tells_systemd_when_it_is_live(boot: Path) -> None:
    """The shipped unit is Type=notify: READY=1 arrives once the mount answers."""
    unit = (REPO / "contrib" / "systemd" / "snapfs.service").read_text()
    assert "Type=notify" in unit and "mount --foreground" in unit
    sock_path = boot / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(60)
        proc = subprocess.Popen(
            [sys.executable, "-m", "snapfs", "mount", "--foreground", boot / "mnt",
             "--store", boot / "store"], stderr=subprocess.DEVNULL,
            env={**os.environ, "NOTIFY_SOCKET": str(sock_path), "PYTHONPATH": str(REPO)})
        try:
            message = sock.recv(4096).decode()
            assert "READY=1" in message.splitlines()
            assert os.listdir(boot / "mnt" / "fr-par-1" / "default" / "volumes") == ["v"]
        finally:
            proc.terminate()  # systemctl stop: SIGTERM, the daemon unmounts
            assert proc.wait(timeout=30) == 0
    run("findmnt", boot / "mnt", check=False).returncode != 0 or pytest.fail("still mounted")
