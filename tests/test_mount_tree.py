"""The tree through the kernel: layout, attributes, ID lookups, duplicate names,
and image.raw read by real tools (cmp, sha256sum, dd, e2fsck, debugfs, qemu-img)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from fixtures_mount import MiB, ZONE, Mount, gone_soon, run

pytestmark = pytest.mark.mount


def ls(path: Path) -> list[str]:
    return run("ls", "-1", path).stdout.split()


def snap(m: Mount, name: str = "s1", volume: str = "vol1") -> Path:
    """mkdir volumes/<volume>/<name> and wait until it is available."""
    run("mkdir", m.volume(volume) / name)
    path = m.snapshots() / name
    assert m.wait_state(path) == "available"
    return path


def test_layout(mounted: Mount) -> None:
    zones = ls(mounted.path)
    assert zones[0] == ZONE and len(zones) == 9 and "pl-waw-3" in zones
    assert ls(mounted.path / ZONE) == ["default"]
    assert ls(mounted.project) == ["imports", "snapshots", "tags", "volumes"]
    assert ls(mounted.project / "volumes") == ["vol1"]
    assert ls(mounted.snapshots()) == []
    root = os.stat(mounted.path)
    assert stat.S_ISDIR(root.st_mode) and root.st_uid == os.getuid()


def test_zone_project_volume_xattrs(mounted: Mount) -> None:
    project_id = mounted.xattr(mounted.project, "id")
    out = run("getfattr", "-d", mounted.project).stdout
    assert f'user.id="{project_id}"' in out and 'user.name="default"' in out
    assert mounted.xattr(mounted.path / ZONE, "name") == ZONE
    vol = mounted.volume("vol1")
    out = run("getfattr", "-d", vol).stdout
    for field in ("id", "name", "size", "volume_type", "zone", "project", "organization",
                  "state", "creation_date"):
        assert f"user.{field}=" in out, field
    assert mounted.xattr(vol, "size") == str(16 * MiB)
    # The project and the volume resolve by ID too (unlisted).
    by_id = mounted.path / ZONE / project_id / "volumes" / mounted.xattr(vol, "id")
    assert mounted.xattr(by_id, "name") == "vol1"
    assert project_id not in ls(mounted.path / ZONE)


def test_snapshot_dir_files_and_xattrs(mounted: Mount) -> None:
    s = snap(mounted)
    assert ls(s) == ["changes", "export", "image.raw", "map.json", "snapshot.json"]
    out = run("getfattr", "-d", s).stdout
    for field in ("id", "name", "state", "size", "volume_type", "base_volume_id",
                  "base_volume_name", "organization", "project", "zone", "creation_date",
                  "modification_date", "progress"):
        assert f"user.{field}=" in out, field
    assert mounted.xattr(s, "base_volume_name") == "vol1"
    assert mounted.xattr(s, "progress") == "100"
    st = os.stat(s / "image.raw")
    assert st.st_size == 16 * MiB and st.st_blksize == MiB
    assert stat.S_IMODE(st.st_mode) == 0o444
    sid = mounted.xattr(s, "id")
    assert mounted.xattr(mounted.snapshots() / sid, "name") == "s1"  # ID lookup
    assert sid not in ls(mounted.snapshots())
    # The same snapshot in its volume's view, with the same contents.
    assert ls(mounted.volume("vol1")) == ["s1"]
    assert mounted.xattr(mounted.volume("vol1") / "s1", "id") == sid
    assert os.stat(mounted.volume("vol1") / "s1" / "..").st_ino == \
        os.stat(mounted.volume("vol1")).st_ino


def test_image_raw_is_the_volume(mounted: Mount, ext4_volume: tuple[Path, dict],
                                 tmp_path: Path) -> None:
    image, _ = ext4_volume
    raw = snap(mounted) / "image.raw"
    run("cmp", raw, image)
    assert run("sha256sum", raw).stdout.split()[0] == \
        hashlib.sha256(image.read_bytes()).hexdigest()
    # Random access: dd a few blocks from the middle, across a chunk boundary.
    part = tmp_path / "part.bin"
    run("dd", f"if={raw}", "bs=4096", "skip=255", "count=3", "status=none", f"of={part}")
    with open(image, "rb") as f:
        f.seek(255 * 4096)
        assert part.read_bytes() == f.read(3 * 4096)


def test_ext4_tools_on_image_raw(mounted: Mount, ext4_volume: tuple[Path, dict]) -> None:
    _, files = ext4_volume
    raw = snap(mounted) / "image.raw"
    fsck = run("e2fsck", "-fn", raw, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    for name, data in files.items():
        got = subprocess.run(["debugfs", "-R", f"cat /{name}", str(raw)],
                             capture_output=True, check=True).stdout
        assert got == data, name
    info = json.loads(run("qemu-img", "info", "--output=json", "-f", "raw", raw).stdout)
    assert info["virtual-size"] == 16 * MiB and info["format"] == "raw"


def test_duplicate_names_are_disambiguated(mounted: Mount) -> None:
    a = snap(mounted, "dup")
    aid = mounted.xattr(a, "id")
    run("mkdir", mounted.snapshots().parent / "volumes" / "vol1" / "other")
    other = mounted.snapshots() / "other"
    mounted.wait_state(other)
    bid = mounted.xattr(other, "id")
    views = [mounted.snapshots(), mounted.volume("vol1")]
    for view in views:  # the kernel now caches "dup" (the first one) in each view
        assert mounted.xattr(view / "dup", "id") == aid
    run("setfattr", "-n", "user.name", "-v", "dup", other)
    for view in views:  # ambiguous now: the cached name stops answering at once
        assert gone_soon(view / "dup"), view
    listed = ls(mounted.snapshots())
    assert sorted(listed) == sorted([f"dup~{aid[:8]}", f"dup~{bid[:8]}"])
    assert mounted.xattr(mounted.snapshots() / f"dup~{aid[:8]}", "id") == aid
    # Both IDs still resolve, and the labels resolve in the volume view too.
    assert mounted.xattr(mounted.volume("vol1") / f"dup~{bid[:8]}", "id") == bid
    assert not (mounted.snapshots() / "dup").exists()


def test_tags_view(mounted: Mount) -> None:
    s = snap(mounted)
    run("setfattr", "-n", "user.tags", "-v", "daily,prod", s)
    assert ls(mounted.project / "tags") == ["daily", "prod"]
    assert ls(mounted.project / "tags" / "prod") == ["s1"]
    assert mounted.xattr(mounted.project / "tags" / "daily" / "s1", "tags") == "daily,prod"
    run("cmp", mounted.project / "tags" / "daily" / "s1" / "image.raw", s / "image.raw")


def test_snapshot_json_is_the_api_object(mounted: Mount) -> None:
    s = snap(mounted)
    obj = json.loads(run("cat", s / "snapshot.json").stdout)
    assert obj["id"] == mounted.xattr(s, "id") and obj["name"] == "s1"
    assert obj["state"] == "available" and obj["size"] == 16 * MiB
    assert obj["base_volume"]["name"] == "vol1" and obj["zone"] == ZONE
    assert os.stat(s / "snapshot.json").st_size == len(run("cat", s / "snapshot.json").stdout)


def test_listing_pages_through_the_service(mount_factory: Callable[..., Mount],
                                           tmp_path: Path) -> None:
    """More snapshots than one List page (100): all listed, duplicates labelled."""
    import trio

    from snapfs.local import open_local_service

    vol = tmp_path / "tiny.raw"
    vol.write_bytes(os.urandom(64 * 1024))
    store = tmp_path / "store"

    async def populate() -> list[str]:
        async with open_local_service(store) as svc:
            v = await svc.add_volume("tiny", vol)
            ids = [(await svc.create_snapshot(ZONE, name=f"n{i:03d}" if i < 240 else "same",
                                              volume_id=v.id)).id for i in range(250)]
            for sid in ids:
                while (await svc.get_snapshot(ZONE, sid)).state == "snapshotting":
                    await trio.sleep(0.01)
            return ids
    ids = trio.run(populate)
    m = mount_factory(store)
    names = ls(m.snapshots())
    assert len(names) == 250
    assert sorted(n for n in names if n.startswith("same~")) == \
        sorted(f"same~{i[:8]}" for i in ids[240:])
    assert ls(m.volume("tiny")) == names
    out = run("ls", "-l", m.snapshots()).stdout
    assert out.count("\nd") == 250
    assert m.xattr(m.snapshots() / ids[123], "name") == "n123"
