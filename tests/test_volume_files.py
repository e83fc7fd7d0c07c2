"""Volumes are what they were registered as (issue 13 item 3, volumefile.py):
``volume add`` takes a readable regular file or block device of a positive
multiple of 512 bytes, checked without blocking; captures open the recorded
path without following symlinks and refuse another file; ``volume repoint``."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import blake3
import pytest
import trio

from fixtures_mount import Mount, run
from fixtures_perms import NOBODY_UID, as_nobody
from fixtures_store import (MiB, ZONE, random_bytes, read_all, snapfs_cli, snapshot_of,
                            write_volume)
from snapfs.errors import InvalidArgument, VolumeChanged
from snapfs.local import LocalService
from snapfs.local.capture import FileSource
from snapfs.local.volumefile import VolumeFile, identity_of, inspect_new, open_volume


def volumes(store: Path) -> list[dict[str, object]]:
    res = snapfs_cli("volume", "list", "--json", store=store, check=True)
    return list(json.loads(res.stdout))


def identities(store: Path) -> dict[str, str | None]:
    with sqlite3.connect(store / "metadata.db") as conn:
        return dict(conn.execute("SELECT name, identity FROM volumes").fetchall())


@pytest.fixture
def store_with_one(tmp_path: Path, store_dir: Path) -> Path:
    img = write_volume(tmp_path / "good.raw", MiB, [(0, b"good")])
    assert snapfs_cli("volume", "add", "good", str(img), store=store_dir).returncode == 0
    return store_dir


def test_volume_add_refuses_what_is_not_a_volume(tmp_path: Path, store_with_one: Path) -> None:
    store = store_with_one
    before = volumes(store)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    odd = tmp_path / "odd.raw"
    odd.write_bytes(os.urandom(1000))
    empty = tmp_path / "empty.raw"
    empty.touch()
    locked = write_volume(tmp_path / "locked.raw", MiB, [(0, b"secret")])
    locked.chmod(0)
    # Root reads anything: the unreadable case runs without the capabilities that
    # bypass file modes (root still owns the store, so only the volume is refused).
    no_dac = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    cases: list[tuple[list[str], Path | str, str]] = [
        ([], fifo, "is a FIFO"),
        ([], "/dev/null", "is a character device"),
        ([], "/dev/zero", "is a character device"),
        ([], odd, "is 1000 bytes: a volume's size must be a positive multiple of 512"),
        ([], empty, "is 0 bytes"),
        ([], tmp_path, "is a directory"),
        ([], tmp_path / "missing.raw", "does not exist"),
        (no_dac, locked, "is not readable: Permission denied"),
    ]
    for prefix, path, reason in cases:
        started = time.monotonic()
        res = subprocess.run([*prefix, sys.executable, "-m", "snapfs", "volume", "add", "v",
                              str(path), "--store", str(store)],
                             capture_output=True, text=True, timeout=20)
        assert time.monotonic() - started < 10, f"{path}: not prompt"
        assert res.returncode == 1, (path, res.stdout, res.stderr)
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("snapfs: invalid path: "), res.stderr
        assert reason in lines[0], lines[0]
        assert "Traceback" not in res.stderr
    assert volumes(store) == before  # nothing changed


def test_volume_add_records_the_resolved_path_and_identity(tmp_path: Path,
                                                           store_dir: Path) -> None:
    img = write_volume(tmp_path / "disk.raw", MiB, [(0, b"x")])
    (tmp_path / "link.raw").symlink_to("disk.raw")
    res = snapfs_cli("volume", "add", "v", str(tmp_path / "link.raw"), store=store_dir)
    assert res.returncode == 0, res.stderr
    [vol] = volumes(store_dir)
    assert vol["path"] == str(img)
    st = img.stat()
    assert identities(store_dir) == {"v": f"file:{st.st_dev}:{st.st_ino}"}


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """A loop block device over a 2 MiB file of random bytes; always detached."""
    data = random_bytes(2 * MiB, seed=31)
    backing = tmp_path / "loop.img"
    backing.write_bytes(data)
    dev = run("losetup", "--find", "--show", backing).stdout.strip()
    try:
        yield dev, data
    finally:
        run("losetup", "-d", dev, check=False)


async def test_a_loop_block_device_is_a_volume(service: LocalService,
                                               loop_device: tuple[str, bytes]) -> None:
    dev, data = loop_device
    vol = await service.add_volume("loop", dev)
    rdev = os.stat(dev).st_rdev
    assert service.md.volume_identity(vol.id) == \
        f"block:{os.major(rdev)}:{os.minor(rdev)}"
    assert vol.size == len(data) and vol.path == dev
    snap = await snapshot_of(service, Path(dev))
    assert await read_all(service, snap.id) == data


async def test_volumes_registered_before_identities_record_one_at_their_next_snapshot(
        service: LocalService, volume_file: Callable[..., Path]) -> None:
    path = volume_file("old", MiB, [(0, b"old")])
    vol = await service.add_volume("old", path)
    service.md.conn.execute("UPDATE volumes SET identity = NULL")  # as schema v6 left it
    # Trust on first use: whatever file is there at the next snapshot is the volume.
    other = volume_file("other", MiB, [(0, b"other")])
    os.replace(other, path)
    first = await snapshot_of(service, path, "first")
    st = path.stat()
    assert service.md.volume_identity(vol.id) == f"file:{st.st_dev}:{st.st_ino}"
    assert (await read_all(service, first.id))[:5] == b"other"
    # From then on, it is checked.
    os.replace(volume_file("third", MiB, [(0, b"third")]), path)
    snap = await service.create_snapshot(ZONE, name="refused", volume_id=vol.id)
    assert snap.state == "error" and "is another file now" in str(snap.error_reason)


async def test_repoint_checks_as_add_does_and_refuses_store_managed_volumes(
        service: LocalService, volume_file: Callable[..., Path], tmp_path: Path) -> None:
    path = volume_file("v", MiB, [(0, b"v")])
    vol = await service.add_volume("v", path)
    odd = tmp_path / "odd.raw"
    odd.write_bytes(bytes(1000))
    with pytest.raises(InvalidArgument, match="positive multiple of 512"):
        await service.repoint_volume("v", odd)
    with pytest.raises(InvalidArgument, match="is a character device"):
        await service.repoint_volume("v", "/dev/zero")
    assert await service.get_volume(ZONE, vol.id) == vol  # nothing changed
    made = await service.create_volume("made", MiB)
    with pytest.raises(InvalidArgument, match="cannot be re-pointed"):
        await service.repoint_volume("made", path)
    assert (await service.get_volume(ZONE, made.id)).path == made.path
    bigger = volume_file("bigger", 2 * MiB, [(MiB, b"b")])
    moved = await service.repoint_volume("v", bigger)
    assert moved.path == str(bigger) and moved.size == 2 * MiB
    snap = await snapshot_of(service, bigger)
    assert await read_all(service, snap.id) == bigger.read_bytes()


def chunk_hashes(store: Path) -> set[bytes]:
    with sqlite3.connect(store / "metadata.db") as conn:
        return {bytes(r[0]) for r in conn.execute("SELECT hash FROM chunks")}


def test_a_volume_path_swapped_by_its_directory_owner_is_never_read(
        tmp_path: Path, nobody_dir: Path, mount_factory: Callable[..., Mount]) -> None:
    """The attack of issue 13: the owner of the directory holding a volume (nobody)
    points it at a file only root may read. Through the real mount, as root."""
    secret = write_volume(tmp_path / "secret.raw", MiB, [(0, random_bytes(MiB, seed=41))])
    secret.chmod(0o600)
    disk = write_volume(nobody_dir / "disk.raw", MiB, [(0, random_bytes(MiB, seed=42))])
    os.chown(disk, NOBODY_UID, NOBODY_UID)
    link = nobody_dir / "link.raw"
    assert as_nobody("ln", "-s", "disk.raw", link).returncode == 0
    store = tmp_path / "store"
    assert snapfs_cli("volume", "add", "v", str(link), store=store).returncode == 0
    m = mount_factory(store)
    vdir = m.volume("v")

    def snapshot(name: str) -> tuple[Path, str]:
        run("mkdir", vdir / name)
        return vdir / name, m.wait_state(vdir / name)

    s1, state = snapshot("s1")
    assert state == "available"
    # Retargeting the symlink given to `volume add` changes nothing: the volume is
    # the file it resolved to.
    assert as_nobody("ln", "-sfn", secret, link).returncode == 0
    s2, state = snapshot("s2")
    assert state == "available"
    assert run("cmp", s2 / "image.raw", disk).returncode == 0
    # The registered path itself made a symlink to the secret: refused, nothing read.
    assert as_nobody("ln", "-sfn", secret, disk).returncode == 0
    s3, state = snapshot("s3")
    assert state == "error"
    reason = m.xattr(s3, "error_reason")
    assert "is a symbolic link now" in reason and "snapfs volume repoint v PATH" in reason
    res = run("cat", s3 / "image.raw", check=False)
    assert res.returncode != 0 and "Input/output error" in res.stderr
    # Another file renamed over it (nobody's copy of something): refused too.
    assert as_nobody("rm", disk).returncode == 0
    assert as_nobody("dd", "if=/dev/zero", f"of={disk}", "bs=1M", "count=1",
                     "status=none").returncode == 0
    s4, state = snapshot("s4")
    assert state == "error" and "is another file now" in m.xattr(s4, "error_reason")
    assert blake3.blake3(secret.read_bytes()).digest() not in chunk_hashes(store)
    assert "snapfs volume repoint" in m.log()
    # Re-pointed on purpose (the CLI beside the running mount): snapshots work again.
    res = snapfs_cli("volume", "repoint", "v", str(disk), store=store)
    assert res.returncode == 0, res.stderr
    s5, state = snapshot("s5")
    assert state == "available"
    assert run("cmp", s5 / "image.raw", disk).returncode == 0
    assert blake3.blake3(secret.read_bytes()).digest() not in chunk_hashes(store)


async def test_a_fifo_swapped_in_fails_the_snapshot_without_blocking(
        service: LocalService, volume_file: Callable[..., Path]) -> None:
    path = volume_file("v", MiB, [(0, b"v")])
    vol = await service.add_volume("v", path)
    path.unlink()
    os.mkfifo(path)  # nobody writes it: an open that waited would wait forever
    with trio.fail_after(5):
        snap = await service.create_snapshot(ZONE, name="s", volume_id=vol.id)
    assert snap.state == "error" and "is a FIFO (named pipe) now" in str(snap.error_reason)
    assert (await service.get_snapshot(ZONE, snap.id)).state == "error"
    assert (await service.get_volume(ZONE, vol.id)).path == str(path)


def test_open_volume_opens_only_the_file_registered(tmp_path: Path) -> None:
    """The one helper every open of a volume goes through (probe, capture, lease,
    clone): never through a symlink, never another file, never blocking."""
    path = write_volume(tmp_path / "v.raw", MiB, [(0, b"v")])
    found = inspect_new(path)
    vf = VolumeFile("v", found.path, found.identity)
    fd, st = open_volume(vf)
    try:
        assert identity_of(st) == found.identity and os.get_blocking(fd)
    finally:
        os.close(fd)
    source = FileSource(vf, trio.CapacityLimiter(1))
    assert source.size == MiB
    trio.run(source.aclose)
    moved = tmp_path / "v.orig"
    os.replace(path, moved)
    path.symlink_to(moved)  # the very same file, through a symlink: still refused
    with pytest.raises(VolumeChanged, match="is a symbolic link now"):
        open_volume(vf)
    path.unlink()
    write_volume(path, MiB, [(0, b"other")])
    with pytest.raises(VolumeChanged, match="is another file now"):
        FileSource(vf, trio.CapacityLimiter(1))
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(VolumeChanged, match="is a FIFO"):
        open_volume(VolumeFile("v", str(path), None))  # even with no identity recorded
    path.unlink()
    with pytest.raises(InvalidArgument, match="does not exist"):
        open_volume(vf)
