"""Through the mount: a snapshot of a volume nobody opened for writing since the
last one reuses its map; writers of every kind (a userspace tool, a loop device)
make the next snapshot read the volume again, and what they wrote is in it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from fixtures_mount import MiB, Mount, run, snapfs


def snap(m: Mount, name: str) -> Path:
    run("mkdir", m.volume("vol1") / name)
    path = m.snapshots() / name
    assert m.wait_state(path) == "available"
    return path / "image.raw"


def test_idle_volumes_reuse_the_map_and_every_writer_is_seen(
        mounted: Mount, ext4_volume: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    vol, _ = ext4_volume
    snap(mounted, "s1")
    s2 = snap(mounted, "s2")
    assert mounted.log().count("map reused") == 1
    run("cmp", s2, vol)

    # A userspace writer: debugfs adds a file to the image.
    new = tmp_path / "new.txt"
    new.write_bytes(b"written after s2\n")
    run("debugfs", "-w", "-R", f"write {new} new.txt", vol)
    s3 = snap(mounted, "s3")
    assert mounted.log().count("map reused") == 1
    run("cmp", s3, vol)
    run("e2fsck", "-fn", s3)
    assert run("debugfs", "-R", "cat new.txt", s3).stdout == "written after s2\n"

    # A kernel writer: a loop device over the volume, written with O_DIRECT.
    loop = run("losetup", "--find", "--show", vol).stdout.strip()
    try:
        payload = tmp_path / "payload"
        payload.write_bytes(os.urandom(MiB))
        run("dd", f"if={payload}", f"of={loop}", "bs=1M", "seek=15", "oflag=direct",
            "conv=notrunc", "status=none")
    finally:
        run("losetup", "-d", loop)
    s4 = snap(mounted, "s4")
    run("cmp", s4, vol)
    with open(s4, "rb") as f:
        f.seek(15 * MiB)
        assert f.read(MiB) == payload.read_bytes()
    s5 = snap(mounted, "s5")  # idle again: reused again
    assert mounted.log().count("map reused") == 2
    run("cmp", s5, vol)


def test_a_volume_on_overlayfs_is_read_again_every_snapshot(
        mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    """overlayfs granted a lease on its own inode, which a write to the layer's
    file underneath (as container hosts do) never broke: the merged file showed
    the write, the next snapshot reused the old map and was `available` with the
    old bytes. No lease is taken there: each snapshot reads the volume."""
    lower, upper, work, merged = (tmp_path / d for d in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    (lower / "vol.raw").write_bytes(os.urandom(4 * MiB))
    run("mount", "-t", "overlay", "overlay", "-o",
        f"lowerdir={lower},upperdir={upper},workdir={work}", merged)
    m = None
    try:
        vol = merged / "vol.raw"
        with open(vol, "r+b") as f:  # copied up: the upper layer holds it now
            f.write(os.urandom(MiB))
        store = tmp_path / "store"
        snapfs("volume", "add", "ov", vol, "--store", store)
        m = mount_factory(store)
        for i in range(3):
            run("mkdir", m.volume("ov") / f"s{i}")
            s = m.snapshots() / f"s{i}"
            assert m.wait_state(s) == "available"
            run("cmp", s / "image.raw", vol)
            with open(upper / "vol.raw", "r+b") as f:  # under the overlay's inode
                f.seek(100 * 4096)
                f.write(os.urandom(4096))
            assert (upper / "vol.raw").read_bytes() == vol.read_bytes()
        assert "map reused" not in m.log()
    finally:
        if m is not None:
            m.stop()
        run("umount", merged)


def test_a_broken_lease_released_twice_closes_no_other_volumes_lease(
        mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    """A lease broken by a write was released by its signal, then again by the
    next capture of its volume -- by descriptor number, which a lease on another
    volume had taken meanwhile: that one was closed (its kernel lease gone), and
    once a third lease took the number back, the other volume's next snapshot
    copied its old map. `available`, the volume's old bytes, fsck clean."""
    store = tmp_path / "store"
    vols = {}
    for name in ("v1", "v2"):
        vols[name] = tmp_path / f"{name}.raw"
        vols[name].write_bytes(os.urandom(4 * MiB))
        snapfs("volume", "add", name, vols[name], "--store", store)
    m = mount_factory(store)

    def take(volume: str, name: str) -> Path:
        run("mkdir", m.volume(volume) / name)
        assert m.wait_state(m.snapshots() / name) == "available"
        return m.snapshots() / name / "image.raw"

    def write(volume: str, block: int) -> None:
        with open(vols[volume], "r+b") as f:
            f.seek(block * 65536)
            f.write(os.urandom(65536))

    take("v1", "a1")        # lease L1 on v1
    write("v1", 1)          # breaks L1: released, its descriptor closed
    take("v2", "b1")        # L2 on v2 takes L1's descriptor number
    take("v1", "a2")        # L1 forgotten: released again
    write("v2", 3)          # must break L2
    b2 = take("v2", "b2")
    run("cmp", b2, vols["v2"])
    run("cmp", take("v1", "a3"), vols["v1"])
    m.stop()
    assert snapfs("fsck", "--store", store).returncode == 0
