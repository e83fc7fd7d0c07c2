"""README claims about the mount, each through the kernel with real tools: corruption
reads as EIO, inodes survive renames and new duplicates, a block device is a volume
(a full capture every time)."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import trio

from fixtures_mount import MiB, ZONE, Mount, run, snapfs
from fixtures_store import flip_bits
from snapfs.local import open_local_service

pytestmark = pytest.mark.mount


def snap(m: Mount, volume: str, name: str) -> Path:
    run("mkdir", m.volume(volume) / name)
    path = m.snapshots() / name
    assert m.wait_state(path) == "available"
    return path


def test_a_corrupt_chunk_reads_as_eio_through_the_mount(
        mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    """One flipped byte in a pack: reading that chunk through image.raw is EIO
    (dd and cat fail), never wrong bytes; the other chunks still read right.
    Checked by breaking it: with PackFiles._verify accepting anything, dd copies
    the corrupt chunk and the EIO assertion fails."""
    data = os.urandom(4 * MiB)
    vol = tmp_path / "vol.raw"
    vol.write_bytes(data)
    store = tmp_path / "store"
    snapfs("volume", "add", "v", vol, "--store", store)
    m = mount_factory(store, "--page-cache")  # the kernel's cache must not hide it
    s = snap(m, "v", "s")
    db = sqlite3.connect(store / "metadata.db")
    place = db.execute("SELECT c.pack, c.offset FROM chunks c JOIN snapshot_chunks m "
                       "ON m.chunk = c.id WHERE m.idx = 2").fetchone()
    db.close()
    flip_bits(store, (int(place[0]), int(place[1])), 12345, 0x40)
    image = s / "image.raw"
    bad = run("dd", f"if={image}", "of=/dev/null", "bs=1M", "skip=2", "count=1",
              check=False)
    assert bad.returncode != 0 and "Input/output error" in bad.stderr
    with open(image, "rb", buffering=0) as f:
        with pytest.raises(OSError) as info:
            os.pread(f.fileno(), 4096, 2 * MiB + 8192)
        assert info.value.errno == errno.EIO
        assert os.pread(f.fileno(), MiB, 3 * MiB) == data[3 * MiB:]
        assert os.pread(f.fileno(), MiB, 0) == data[:MiB]
    cat = subprocess.run(["cat", str(image)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, timeout=60)
    assert cat.returncode != 0 and "Input/output error" in cat.stderr
    assert "EIO" in m.log()


def test_renames_and_new_duplicates_never_change_an_inode(
        mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    """Inodes are keyed by IDs, never by display names: `stat` before and after a
    rename, and after a second snapshot takes the same name (which relabels both
    as name~<8 hex>), shows the same inode for the same snapshot and its files.
    Checked by breaking it: InodeTable.inode giving snapshot keys a fresh inode
    at each lookup (as keying by display name would after a rename) fails the
    first comparison."""
    vol = tmp_path / "vol.raw"
    vol.write_bytes(os.urandom(2 * MiB))
    store = tmp_path / "store"
    snapfs("volume", "add", "v", vol, "--store", store)
    m = mount_factory(store)
    a = snap(m, "v", "a")
    sid = m.xattr(a, "id")

    def inodes(d: Path) -> tuple[int, int, int]:
        return (os.stat(d).st_ino, os.stat(d / "image.raw").st_ino,
                os.stat(d / "snapshot.json").st_ino)

    before = inodes(a)
    by_id = inodes(m.snapshots() / sid)
    in_volume = inodes(m.volume("v") / "a")
    run("mv", a, m.snapshots() / "b")
    assert inodes(m.snapshots() / "b") == before
    assert inodes(m.volume("v") / "b") == in_volume
    # A new snapshot named "b" as well, made beside the mount (the mount itself
    # refuses a taken name): both are listed under labels now.
    async def duplicate() -> None:
        async with open_local_service(store) as svc:
            vol = (await svc.list_volumes(ZONE)).items[0]
            await svc.create_snapshot(ZONE, name="b", volume_id=vol.id)
    trio.run(duplicate)
    deadline = time.monotonic() + 10
    while len(labels := sorted(os.listdir(m.snapshots()))) < 2:
        assert time.monotonic() < deadline, "the duplicate never appeared"
        time.sleep(0.2)
    assert len(labels) == 2 and all(n.startswith("b~") for n in labels)
    ours = m.snapshots() / f"b~{sid.replace('-', '')[:8]}"
    assert ours.name in labels
    assert inodes(ours) == before and inodes(m.snapshots() / sid) == by_id
    other = next(m.snapshots() / n for n in labels if n != ours.name)
    assert os.stat(other).st_ino not in before


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loop device over an 8 MiB file of random bytes; always detached."""
    backing = tmp_path / "disk.img"
    backing.write_bytes(os.urandom(8 * MiB))
    dev = run("losetup", "--find", "--show", backing).stdout.strip()
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_a_block_device_is_a_volume_captured_in_full_every_time(
        mount_factory: Callable[..., Mount], tmp_path: Path,
        loop_device: tuple[str, Path]) -> None:
    """`volume add` takes a loop device; each mkdir is a full capture of it (no
    lease can be had on a block device, so no map is reused): every snapshot
    reads the whole device again and holds what the device held then.
    Checked by breaking it: with the "bytes read" figure or the device's
    registration wrong the log assertions fail; a reused map would log "its map
    reused" and the third snapshot would hold the first one's bytes."""
    dev, backing = loop_device
    store = tmp_path / "store"
    snapfs("volume", "add", "disk", dev, "--store", store)
    listed = snapfs("volume", "list", "--store", store).stdout
    assert dev in listed
    m = mount_factory(store)
    first = snap(m, "disk", "one")
    second = snap(m, "disk", "two")  # the device untouched: read in full all the same
    run("cmp", first / "image.raw", dev)
    run("cmp", second / "image.raw", dev)
    assert os.stat(first / "image.raw").st_size == 8 * MiB
    for s in (first, second):
        assert f"snapshot {m.xattr(s, 'id')}: {8 * MiB} bytes read from the volume" in m.log()
    assert "its map reused" not in m.log()
    # Written through the device (as a VM would): three blocks in chunk 5.
    run("dd", f"of={dev}", "bs=4096", "seek=1300", "count=3", "if=/dev/urandom",
        "oflag=direct", "conv=notrunc", "status=none")
    third = snap(m, "disk", "three")
    run("cmp", third / "image.raw", dev)
    assert run("cmp", first / "image.raw", third / "image.raw", check=False).returncode == 1


def test_two_mounts_one_store_never_share_an_inode_after_a_map_error(
        mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    """Mount A cannot write the shared inode map for a moment (a lock held past
    its wait): it numbers new nodes in memory. Mount B goes on numbering from the
    map -- the same numbers, for its own nodes. Found by a hunt: A then took B's
    rows too, two of A's files had one inode, and `cat` of one gave the other's
    bytes (the kernel's page cache keyed by inode). Each file keeps its number
    and its own bytes."""
    store = tmp_path / "store"
    vols = {}
    for name in ("v1", "v2"):
        vols[name] = os.urandom(2 * MiB)
        (tmp_path / f"{name}.raw").write_bytes(vols[name])
        snapfs("volume", "add", name, tmp_path / f"{name}.raw", "--store", store)
    a = mount_factory(store, "--page-cache")
    b = mount_factory(store, "--page-cache")
    s1 = snap(b, "v1", "s1")
    run("mkdir", b.volume("v2") / "s2")
    assert b.wait_state(b.snapshots() / "s2") == "available"
    holder = sqlite3.connect(store / "inodes.sqlite", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:  # A numbers s1's nodes in memory, above the map's highest number
        first = {n: os.stat(a.snapshots() / "s1" / n).st_ino
                 for n in ("image.raw", "snapshot.json")}
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "last only for this mount" in a.log()
    # B numbers s2's nodes from the map: the numbers A gave in memory.
    assert os.stat(s1.parent / "s2" / "image.raw").st_ino in first.values()
    second = {n: os.stat(a.snapshots() / "s2" / n).st_ino
              for n in ("image.raw", "snapshot.json")}
    assert not set(first.values()) & set(second.values())
    assert (a.snapshots() / "s1" / "image.raw").read_bytes() == vols["v1"]
    assert (a.snapshots() / "s2" / "image.raw").read_bytes() == vols["v2"]
    assert {n: os.stat(a.snapshots() / "s1" / n).st_ino for n in first} == first
