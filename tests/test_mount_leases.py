"""Through the mount: a snapshot of a volume nobody opened for writing since the
last one reuses its map; writers of every kind (a userspace tool, a loop device)
make the next snapshot read the volume again, and what they wrote is in it."""

from __future__ import annotations

import os
from pathlib import Path

from fixtures_mount import MiB, Mount, run


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
