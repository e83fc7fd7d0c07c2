"""The daemon: snapfs mount/umount/wait, restart, signals, options, failures."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from fixtures_mount import (MiB, Mount, alive, is_mounted, mount_line, run, snapfs,
                            stop_process)

pytestmark = pytest.mark.mount


def ls(path: Path) -> list[str]:
    return sorted(run("ls", "-1", path).stdout.split())


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def big_store(tmp_path: Path, mib: int = 128) -> tuple[Path, Path]:
    vol = tmp_path / "big.raw"
    vol.write_bytes(os.urandom(mib * MiB))
    store = tmp_path / "store"
    snapfs("volume", "add", "big", vol, "--store", store)
    return store, vol


def test_mount_returns_once_live_and_logs_in_the_store(mounted: Mount) -> None:
    assert is_mounted(mounted.path)
    assert mounted.pid is not None and alive(mounted.pid)
    line = mount_line(mounted.path)
    assert line is not None
    assert "fuse.snapfs" in line and "allow_other" not in line  # private by default
    assert "mounted " + str(mounted.path) in mounted.log()


def test_restart_keeps_everything(mount_factory: Callable[..., Mount],
                                  store_with_volume: Path) -> None:
    m = mount_factory(store_with_volume)
    run("mkdir", m.volume("vol1") / "a")
    run("mkdir", m.volume("vol1") / "b")
    for name in ("a", "b"):
        assert m.wait_state(m.snapshots() / name) == "available"
    run("setfattr", "-n", "user.tags", "-v", "keep,me", m.snapshots() / "a")
    run("mv", m.snapshots() / "b", m.snapshots() / "c")
    before = {n: (run("getfattr", "-d", m.snapshots() / n).stdout,
                  sha(m.snapshots() / n / "image.raw")) for n in ls(m.snapshots())}
    pid = m.pid
    snapfs("umount", m.path)
    assert not is_mounted(m.path)
    assert pid is not None and not alive(pid)  # umount waits for the daemon to finish
    m.start()
    assert ls(m.snapshots()) == ["a", "c"]
    assert ls(m.project / "tags") == ["keep", "me"]
    after = {n: (run("getfattr", "-d", m.snapshots() / n).stdout,
                 sha(m.snapshots() / n / "image.raw")) for n in ls(m.snapshots())}
    assert after == before


def test_sigterm_unmounts_and_leaves_the_store_consistent(
        mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    store, vol = big_store(tmp_path)
    m = mount_factory(store)
    run("mkdir", m.volume("big") / "done")
    assert m.wait_state(m.snapshots() / "done") == "available"
    digest = sha(m.snapshots() / "done" / "image.raw")
    run("mkdir", m.volume("big") / "inflight")
    assert m.pid is not None
    os.kill(m.pid, signal.SIGTERM)
    stop_process(m.pid, timeout=20)
    assert not alive(m.pid) and not is_mounted(m.path)
    assert "SIGTERM: unmounting" in m.log()
    fsck = snapfs("fsck", "--store", store, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    m.start()
    assert sha(m.snapshots() / "done" / "image.raw") == digest
    # The capture cut short is either finished or recorded as failed, never half-there.
    state = m.wait_state(m.snapshots() / "inflight")
    assert state in ("available", "error")
    if state == "available":
        run("cmp", m.snapshots() / "inflight" / "image.raw", vol)


def test_umount_is_lazy_when_the_daemon_died(mounted: Mount) -> None:
    assert mounted.pid is not None
    # A process sitting in the mount keeps it busy: a plain unmount fails.
    holder = subprocess.Popen(["sleep", "60"], cwd=mounted.project)
    try:
        os.kill(mounted.pid, signal.SIGKILL)
        stop_process(mounted.pid)
        res = run("ls", mounted.path, check=False)
        assert res.returncode != 0 and "Transport endpoint is not connected" in res.stderr
        res = snapfs("umount", mounted.path)
        assert "lazily" in res.stderr and res.stderr.count("\n") == 1
        assert not is_mounted(mounted.path)
        mounted.pid = None
    finally:
        holder.kill()
        holder.wait()


def test_umount_of_a_busy_live_mount_is_refused(mounted: Mount) -> None:
    holder = subprocess.Popen(["sleep", "60"], cwd=mounted.project)
    try:
        res = snapfs("umount", mounted.path, check=False)
        assert res.returncode == 1 and res.stderr.startswith("snapfs: ")
        assert is_mounted(mounted.path) and ls(mounted.project)
    finally:
        holder.kill()
        holder.wait()


def test_refusals_of_the_commands(mounted: Mount, tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("x")
    for args in (("mount", afile), ("mount", mounted.path), ("mount", tmp_path / "missing"),
                 ("umount", tmp_path), ("mount", tmp_path, "-o", "suid"),
                 ("wait", tmp_path)):
        res = snapfs(*args, "--store", mounted.store, check=False) if args[0] == "mount" \
            else snapfs(*args, check=False)
        assert res.returncode != 0, args
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.startswith("snapfs: "), res.stderr
    assert is_mounted(mounted.path) and ls(mounted.path)


def test_mount_failure_is_reported_by_the_parent(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    store = tmp_path / "store"
    # Each a URL botocore refuses: accepted, every export failed later as an
    # "internal error" with a traceback in the log.
    for endpoint in ("ftp://nowhere", "http://exa mple", "https://a_b.example:80/x",
                     "http://[::1", "http://\udcff", "http://host:abc", "http://h:99999"):
        res = snapfs("mount", mnt, "--store", store, "--backend", "local", "--s3-endpoint",
                     endpoint, check=False)
        assert res.returncode == 1 and "s3-endpoint" in res.stderr, (endpoint, res.stderr)
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
        assert not is_mounted(mnt)
    # boto3's own setting is held to the same rule.
    res = snapfs("mount", mnt, "--store", store, check=False,
                 env={"AWS_ENDPOINT_URL": "http://minio_1:9000"})
    assert res.returncode == 1 and "AWS_ENDPOINT_URL" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and not is_mounted(mnt)
    # The Scaleway backend's options on the local one were accepted and ignored.
    for option in ("zones=nl-ams-1", "profile=p", "staging_bucket=b"):
        res = snapfs("mount", mnt, "--store", store, "-o", option, check=False)
        assert res.returncode == 1 and "scaleway only" in res.stderr, (option, res.stderr)
        assert res.stderr.count("\n") == 1
        assert not is_mounted(mnt)


def test_allow_other_brings_default_permissions(mount_factory: Callable[..., Mount],
                                                store_with_volume: Path) -> None:
    m = mount_factory(store_with_volume, "-o", "allow_other")
    line = mount_line(m.path)
    assert line is not None
    assert "allow_other" in line and "default_permissions" in line
    assert ls(m.project) == ["imports", "snapshots", "tags", "volumes"]


def test_foreground_logs_to_stderr_and_stops_on_sigint(tmp_path: Path,
                                                       store_with_volume: Path) -> None:
    mnt = tmp_path / "fg"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "snapfs", "mount", str(mnt), "--store",
                             str(store_with_volume), "--foreground"],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mnt):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert ls(mnt / "fr-par-1" / "default" / "volumes") == ["vol1"]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "mounted " in err and "SIGINT: unmounting" in err and "unmounted" in err
        assert not is_mounted(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if is_mounted(mnt):
            run("fusermount3", "-u", "-z", mnt, check=False)


def test_wait_with_a_progress_bar(mount_factory: Callable[..., Mount],
                                  tmp_path: Path) -> None:
    store, _ = big_store(tmp_path, 96)
    m = mount_factory(store)
    run("mkdir", m.volume("big") / "s")
    s = m.snapshots() / "s"
    # On a terminal (script gives it one): a progress bar, then the final state.
    cmd = f"{sys.executable} -m snapfs wait {s / 'image.raw'}"
    res = run("script", "-qec", cmd, "/dev/null")
    assert "available" in res.stdout and "%" in res.stdout
    assert "100%" in res.stdout
    # Not on a terminal: just the state.
    res = snapfs("wait", s)
    assert res.stdout == "available\n" and res.stderr == ""
