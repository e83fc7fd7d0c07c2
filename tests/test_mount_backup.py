"""Backup tools against the real mount (#17): stable inode numbers and times
across remounts, st_blocks/st_nlink that let cp, du and restic see holes and
count each snapshot once, `.`/`..`, map.json against qemu-img map, changes/
and an incremental image backup with dd built on them."""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from fixtures_mount import MiB, ZONE, Mount, run, snapfs

pytestmark = pytest.mark.mount

#: A raw volume whose data sits in whole chunks (MiB 1, 2 and 5 of 8), so that
#: the chunk map and a sparse copy's holes agree exactly.
DATA_MIB = (1, 2, 5)


def snap(m: Mount, name: str, volume: str = "vol1") -> Path:
    run("mkdir", m.volume(volume) / name)
    path = m.snapshots() / name
    assert m.wait_state(path) == "available"
    return path


def raw_volume(path: Path, size_mib: int = 8) -> Path:
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
        for i in DATA_MIB:
            f.seek(i * MiB)
            f.write(os.urandom(MiB))
    return path


@pytest.fixture
def raw_store(tmp_path: Path) -> tuple[Path, Path]:
    """A store with volume vol1 = an 8 MiB raw file with three data chunks."""
    store = tmp_path / "store"
    vol = raw_volume(tmp_path / "vol1.raw")
    snapfs("volume", "add", "vol1", vol, "--store", store)
    return store, vol


def remount(m: Mount) -> Mount:
    """Unmount, stop the daemon, and mount the store again on the same path (a
    backup tool keys its parent snapshot on the path)."""
    m.stop()
    m.start()
    return m


def identity(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns


def every_kind(m: Mount) -> list[Path]:
    """One path of each node kind, snapshot s1 tagged 'daily'."""
    s = m.snapshots() / "s1"
    return [m.path, m.path / ZONE, m.project, m.snapshots(), m.project / "volumes",
            m.volume("vol1"), m.project / "tags", m.project / "tags" / "daily",
            m.project / "imports", s, s / "image.raw", s / "snapshot.json", s / "export",
            s / "map.json", s / "changes", s / "changes" / "s1",
            m.volume("vol1") / "s1", m.project / "tags" / "daily" / "s1" / "image.raw"]


def test_inodes_and_times_survive_a_remount(mount_factory: Callable[..., Mount],
                                            raw_store: tuple[Path, Path]) -> None:
    m = mount_factory(raw_store[0])
    s = snap(m, "s1")
    run("setfattr", "-n", "user.tags", "-v", "daily", s)
    time.sleep(2.1)  # past the listings' cache of this mount
    before = [identity(p) for p in every_kind(m)]
    assert len({ino for ino, _, _ in before}) == len(before) - 1  # image.raw twice
    m = remount(m)
    after = [identity(p) for p in every_kind(m)]
    assert after == before
    # Times mean something: a tag's directory is its newest snapshot's change.
    assert os.stat(m.project / "tags" / "daily").st_mtime_ns >= \
        os.stat(m.snapshots() / "s1").st_ctime_ns > 0
    assert os.stat(m.path).st_mtime > 1e9


def test_the_daemon_forgets_what_the_kernel_forgets(mount_factory: Callable[..., Mount],
                                                   raw_store: tuple[Path, Path]) -> None:
    """Nodes the kernel evicts (FORGET) leave the daemon's memory -- df -i's
    IUsed (f_files - f_ffree) counts what it holds -- and come back with the
    same numbers."""
    m = mount_factory(raw_store[0])
    s = snap(m, "s1")
    run("setfattr", "-n", "user.tags", "-v", "daily", s)
    time.sleep(1.1)
    before = [os.stat(p).st_ino for p in every_kind(m)]
    held = used_inodes(m.path)
    assert held >= len(set(before))
    df = run("df", "--output=iused,ipcent", m.path).stdout.split()
    assert df[2:] == [str(held), "1%"]  # it said 100%: f_ffree was 0
    deadline = time.monotonic() + 20
    while used_inodes(m.path) > 3:  # the root, maybe the zone and project
        assert time.monotonic() < deadline, f"still {used_inodes(m.path)} nodes"
        Path("/proc/sys/vm/drop_caches").write_text("2\n")  # evict unused inodes
        time.sleep(0.2)
    assert [os.stat(p).st_ino for p in every_kind(m)] == before
    assert used_inodes(m.path) >= len(set(before))


def used_inodes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_files - st.f_ffree


def test_image_mtime_never_moves_but_ctime_may(mounted: Mount) -> None:
    s = snap(mounted, "s1")
    img = s / "image.raw"
    created = os.stat(img).st_mtime_ns
    run("setfattr", "-n", "user.tags", "-v", "a,b", s)
    run("mv", s, mounted.snapshots() / "renamed")
    time.sleep(1.1)  # past the attribute timeout
    moved = os.stat(mounted.snapshots() / "renamed" / "image.raw")
    assert moved.st_mtime_ns == created and moved.st_ctime_ns >= created


def test_one_inode_in_every_view_with_nlink(mount_factory: Callable[..., Mount],
                                            raw_store: tuple[Path, Path]) -> None:
    m = mount_factory(raw_store[0])
    s = snap(m, "s1")
    run("setfattr", "-n", "user.tags", "-v", "a,b", s)
    time.sleep(1.1)
    views = [s, m.volume("vol1") / "s1", m.project / "tags" / "a" / "s1",
             m.project / "tags" / "b" / "s1"]
    for name in ("image.raw", "snapshot.json", "map.json"):
        sts = [os.stat(v / name) for v in views]
        assert len({st.st_ino for st in sts}) == 1, name
        assert {st.st_nlink for st in sts} == {4}, name  # snapshots/, volume, 2 tags
    out = run("ls", "-a", s).stdout.split()
    assert out[:2] == [".", ".."] and "image.raw" in out
    assert run("ls", "-a", m.path).stdout.split()[:2] == [".", ".."]


def test_st_blocks_cp_and_du_see_the_holes(mount_factory: Callable[..., Mount],
                                           raw_store: tuple[Path, Path],
                                           tmp_path: Path) -> None:
    m = mount_factory(raw_store[0])
    s1, s2 = snap(m, "s1"), snap(m, "s2")
    img = s1 / "image.raw"
    data = len(DATA_MIB) * MiB  # no all-zero chunk is stored
    st = os.stat(img)
    assert st.st_size == 8 * MiB and st.st_blocks * 512 == data
    copy = tmp_path / "copy.raw"
    run("cp", img, copy)  # plain cp: --sparse=auto
    assert run("cmp", img, copy).returncode == 0
    assert os.stat(copy).st_blocks * 512 <= 1.2 * data
    # du of the whole mount counts each snapshot once, whatever lists it.
    run("setfattr", "-n", "user.tags", "-v", "t1,t2", s2)
    time.sleep(1.1)
    used = int(run("du", "-s", "-B1", m.path).stdout.split()[0])
    assert used <= 1.3 * 2 * data, used


def test_map_json_is_qemu_img_map(mount_factory: Callable[..., Mount],
                                  raw_store: tuple[Path, Path], tmp_path: Path) -> None:
    m = mount_factory(raw_store[0])
    s = snap(m, "s1")
    copy = tmp_path / "copy.raw"
    run("cp", "--sparse=always", s / "image.raw", copy)
    expected = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", copy).stdout)
    text = (s / "map.json").read_text()
    assert json.loads(text) == expected
    assert [e["start"] // MiB for e in expected if e["data"]] == [1, 5]  # 1-2 merged
    assert os.stat(s / "map.json").st_size == len(text)


def extents(path: Path) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = json.loads(path.read_text())
    return result


def test_changes_and_an_incremental_backup_with_dd(
        mount_factory: Callable[..., Mount], raw_store: tuple[Path, Path],
        tmp_path: Path) -> None:
    store, vol = raw_store
    other = raw_volume(tmp_path / "vol2.raw")
    snapfs("volume", "add", "vol2", other, "--store", store)
    m = mount_factory(store)
    s1, s2 = snap(m, "s1"), snap(m, "s2")
    assert extents(s2 / "changes" / "s1") == []  # identical
    assert run("ls", "-A", s2 / "changes").stdout == ""  # looked up, never listed
    with open(vol, "r+b") as f:  # one 64 KiB overwrite, and a hole filled
        f.seek(3 * MiB + 100_000)
        f.write(os.urandom(64 << 10))
    with open(vol, "r+b") as f:
        f.seek(2 * MiB)
        f.write(bytes(MiB))  # a data chunk zeroed
    s3 = snap(m, "s3")
    assert extents(s3 / "changes" / "s2") == [
        {"start": 2 * MiB, "length": MiB, "depth": 0, "present": True, "zero": True,
         "data": False, "offset": 2 * MiB},
        {"start": 3 * MiB, "length": MiB, "depth": 0, "present": True, "zero": False,
         "data": True, "offset": 3 * MiB}]
    s3_id = m.xattr(s3, "id")
    assert extents(s2 / "changes" / s3_id)[1]["data"] is False  # by ID, from the other side

    # The README's incremental backup: the base image, then only changed extents.
    backup = tmp_path / "backup.raw"
    run("cp", s1 / "image.raw", backup)
    for e in extents(s3 / "changes" / "s1"):
        src = (s3 / "image.raw") if e["data"] else Path("/dev/zero")
        run("dd", f"if={src}", f"of={backup}", "bs=1M", "conv=notrunc",
            "iflag=skip_bytes,count_bytes", "oflag=seek_bytes",
            f"skip={e['start'] if e['data'] else 0}", f"seek={e['start']}",
            f"count={e['length']}", "status=none")
    assert run("cmp", backup, s3 / "image.raw").returncode == 0

    # Another volume: EINVAL, and nothing changed.
    t1 = snap(m, "t1", "vol2")
    listing = run("ls", m.snapshots()).stdout
    with pytest.raises(OSError) as exc:
        os.stat(s3 / "changes" / "t1")
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:
        os.stat(t1 / "changes" / "s1")
    assert exc.value.errno == errno.EINVAL
    assert run("ls", m.snapshots()).stdout == listing
    assert "not of the same volume" in m.log()
    with pytest.raises(FileNotFoundError):
        os.stat(s3 / "changes" / "nosuch")
    # The volume resized: EINVAL too.
    with open(vol, "r+b") as f:
        f.truncate(12 * MiB)
    s4 = snap(m, "s4")
    with pytest.raises(OSError) as exc:
        os.stat(s4 / "changes" / "s1")
    assert exc.value.errno == errno.EINVAL and "resized" in m.log()


def test_restic_twice_across_a_remount_finds_nothing_new(
        mount_factory: Callable[..., Mount], raw_store: tuple[Path, Path],
        tmp_path: Path) -> None:
    m = mount_factory(raw_store[0])
    snap(m, "s1")
    snap(m, "s2")
    env = {"RESTIC_REPOSITORY": str(tmp_path / "repo"), "RESTIC_PASSWORD": "test",
           "RESTIC_CACHE_DIR": str(tmp_path / "cache")}
    run("restic", "init", env=env)

    def backup(mnt: Mount) -> dict[str, Any]:
        out = run("restic", "backup", "--json", "--host", "h", mnt.snapshots(),
                  env=env).stdout
        return [json.loads(line) for line in out.splitlines()
                if '"message_type":"summary"' in line][0]  # type: ignore[no-any-return]

    first = backup(m)
    assert first["files_new"] >= 4
    m = remount(m)
    second = backup(m)
    assert second["files_new"] == 0 and second["files_changed"] == 0, second


def test_ls_dates_tags_and_keeps_modes(mounted: Mount) -> None:
    s = snap(mounted, "s1")
    run("setfattr", "-n", "user.tags", "-v", "weekly", s)
    time.sleep(1.1)
    tag = os.stat(mounted.project / "tags" / "weekly")
    assert stat.S_ISDIR(tag.st_mode) and tag.st_mtime > 1e9  # not 1970
