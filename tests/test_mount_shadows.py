"""Through the mount, with the store and the volume on one XFS (or btrfs) filesystem: each
snapshot is captured from a reflink clone of the volume (a shadow), the next one
reads only the chunks whose extents changed since that clone -- whoever wrote
them (a userspace tool, a loop device) -- and a deleted snapshot's shadow goes."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

from fixtures_mount import MiB, Mount, make_ext4, run, snapfs
from fixtures_store import shadow_files


def snap(m: Mount, name: str) -> Path:
    """A snapshot through the mount, once available (at once here: from its clone)
    and stored (user.progress 100: its chunks are in the store, earlier clones gone)."""
    run("mkdir", m.volume("vol1") / name)
    path = m.snapshots() / name
    assert m.xattr(path, "state") == "available"  # when mkdir returns, as zfs snapshot
    deadline = time.monotonic() + 60
    while m.xattr(path, "progress") != "100":
        assert time.monotonic() < deadline, f"{path} not stored"
        time.sleep(0.05)
    return path / "image.raw"


def changed_counts(m: Mount, snapshot_id: str) -> tuple[int, int]:
    """(N, M) of the log's "N of M chunks changed" line for the snapshot."""
    found = re.findall(rf"snapshot {re.escape(snapshot_id)}: (\d+) of (\d+) chunks changed",
                       m.log())
    assert len(found) == 1, f"no single 'chunks changed' line for {snapshot_id}:\n{m.log()}"
    return int(found[0][0]), int(found[0][1])


def test_shadows_read_only_changed_chunks_and_go_with_their_snapshot(
        mount_factory: Callable[..., Mount], reflink_dir: Path, tmp_path: Path) -> None:
    files = {
        "hello.txt": b"hello from an ext4 volume on XFS\n",
        "dir/big.bin": os.urandom(5 * MiB + 123),
        "dir/small.bin": os.urandom(4000),
    }
    vol = make_ext4(reflink_dir / "vol.img", 64, files)
    store = reflink_dir / "store"
    snapfs("volume", "add", "vol1", vol, "--store", store)
    m = mount_factory(store)
    volume_id = m.xattr(m.volume("vol1"), "id")
    shadows = store / "shadows" / volume_id

    # 1. The first snapshot: a full read of a clone, which is kept.
    s1 = snap(m, "s1")
    copy1 = tmp_path / "s1.copy"
    shutil.copyfile(vol, copy1)
    s1_id = m.xattr(s1.parent, "id")
    assert [p.parent for p in shadow_files(store)] == [shadows]
    assert [p.name.split(".")[1] for p in shadow_files(store)] == [s1_id]
    run("cmp", s1, vol)
    assert "chunks changed" not in m.log()

    # 2. A userspace writer: debugfs adds a file; only its chunks are read.
    new = tmp_path / "new.txt"
    new.write_bytes(b"written after s1\n")
    run("debugfs", "-w", "-R", f"write {new} new.txt", vol)
    s2 = snap(m, "s2")
    copy2 = tmp_path / "s2.copy"
    shutil.copyfile(vol, copy2)
    s2_id = m.xattr(s2.parent, "id")
    run("cmp", s2, vol)
    run("e2fsck", "-fn", s2)
    assert run("debugfs", "-R", "cat new.txt", s2).stdout == "written after s1\n"
    n, total = changed_counts(m, s2_id)
    assert total == 64 and 1 <= n <= total // 4, (n, total)
    assert [p.name.split(".")[1] for p in shadow_files(store)] == [s2_id]
    assert "map reused" not in m.log()

    # 3. A kernel writer: a loop device over the volume, written with O_DIRECT.
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(MiB))
    loop = run("losetup", "--find", "--show", vol).stdout.strip()
    try:
        run("dd", f"if={payload}", f"of={loop}", "bs=1M", "seek=15", "oflag=direct",
            "conv=notrunc", "status=none")
    finally:
        run("losetup", "-d", loop)
    s3 = snap(m, "s3")
    s3_id = m.xattr(s3.parent, "id")
    run("cmp", s3, vol)
    with open(s3, "rb") as f:
        f.seek(15 * MiB)
        assert f.read(MiB) == payload.read_bytes()
    n, total = changed_counts(m, s3_id)
    assert total == 64 and 1 <= n <= total // 4, (n, total)
    assert [p.name.split(".")[1] for p in shadow_files(store)] == [s3_id]
    assert "map reused" not in m.log()

    # 4. The older snapshots kept their own bytes.
    run("cmp", s1, copy1)
    run("e2fsck", "-fn", s1)
    assert run("debugfs", "-R", "cat new.txt", s1, check=False).stdout == ""
    run("cmp", s2, copy2)

    # 5. Deleting the newest snapshot drops its shadow (it pins rewritten blocks)
    # before rmdir returns.
    run("rmdir", s3.parent)
    assert shadow_files(store) == []
    run("cmp", s2, copy2)

    # With no shadow left, the next snapshot after a write reads the whole volume.
    with open(vol, "r+b") as f:
        f.seek(40 * MiB)
        f.write(os.urandom(4096))
    s4 = snap(m, "s4")
    run("cmp", s4, vol)
    assert "chunks changed" not in m.log().split("(s4): capturing")[1]
    assert [p.name.split(".")[1] for p in shadow_files(store)] == [m.xattr(s4.parent, "id")]


def test_shadows_outlive_a_restart_but_not_a_reboot_or_their_volume(
        mount_factory: Callable[..., Mount], reflink_dir: Path, tmp_path: Path) -> None:
    vol = make_ext4(reflink_dir / "vol.img", 64, {"a.bin": os.urandom(3 * MiB)})
    store = reflink_dir / "store"
    snapfs("volume", "add", "vol1", vol, "--store", store)
    m = mount_factory(store)
    volume_id = m.xattr(m.volume("vol1"), "id")
    snap(m, "s1")
    kept = shadow_files(store)
    assert len(kept) == 1

    # A new daemon keeps the shadow; holding no lease yet, it compares clones:
    # nothing changed, nothing read.
    m.stop()
    m = mount_factory(store)
    assert shadow_files(store) == kept
    s2 = snap(m, "s2")
    run("cmp", s2, vol)
    assert changed_counts(m, m.xattr(s2.parent, "id")) == (0, 64)

    with open(vol, "r+b") as f:
        f.seek(40 * MiB)
        f.write(os.urandom(4096))
    s3 = snap(m, "s3")
    run("cmp", s3, vol)
    copy3 = tmp_path / "s3.copy"
    shutil.copyfile(vol, copy3)
    assert changed_counts(m, m.xattr(s3.parent, "id")) == (1, 64)
    (shadow,) = shadow_files(store)
    assert shadow.name.split(".")[1] == m.xattr(s3.parent, "id")

    # A shadow from another boot is dropped at the next exclusive open of the
    # store, and the next snapshot reads the whole volume.
    m.stop()
    key, snapshot_id, _ = shadow.name.split(".")
    shadow.rename(shadow.with_name(f"{key}.{snapshot_id}.{'0' * 32}"))
    m = mount_factory(store)
    assert shadow_files(store) == []
    with open(vol, "r+b") as f:
        f.seek(50 * MiB)
        f.write(os.urandom(4096))
    s4 = snap(m, "s4")
    run("cmp", s4, vol)
    run("cmp", m.snapshots() / "s3" / "image.raw", copy3)
    assert "chunks changed" not in m.log().split("(s4): capturing")[1]
    assert len(shadow_files(store)) == 1

    # Forgetting the volume drops its shadows.
    m.stop()
    snapfs("volume", "rm", "vol1", "--store", store)
    assert not (store / "shadows" / volume_id).exists()
