"""Operations through the kernel, and every refusal: the errno AND that nothing
changed (listings, attributes and snapshot.json compared before and after)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest
import trio

from fixtures_mount import (MiB, ZONE, Mount, blocked_in_open, interrupted_open, random_volume,
                            run, snapfs)
from fixtures_s3 import SeaweedServer
from snapfs.fs.context import MAX_WAITING_OPENS
from snapfs.fs.daemon import CONGESTION_THRESHOLD, FUSECTL, MAX_BACKGROUND, READAHEAD_KB
from snapfs.local import open_local_service
from test_mount_s3 import mount_with_s3

pytestmark = pytest.mark.mount


@pytest.fixture
def mounted_s3(mount_factory: Callable[..., Mount], store_with_volume: Path,
               s3_server: SeaweedServer) -> tuple[Mount, str]:
    """A mount with Object Storage (imports start; a missing object fails them fast),
    and an empty bucket."""
    return mount_with_s3(mount_factory, store_with_volume, s3_server), s3_server.new_bucket()


def ls(path: Path) -> list[str]:
    return sorted(run("ls", "-1", path).stdout.split())


def snap(m: Mount, name: str = "s1", volume: str = "vol1") -> Path:
    run("mkdir", m.volume(volume) / name)
    path = m.snapshots() / name
    assert m.wait_state(path) == "available"
    return path


def state_of(m: Mount) -> dict[str, object]:
    """Everything a refusal must leave alone: every view's listing and every
    snapshot's attributes and API object."""
    out: dict[str, object] = {"snapshots": ls(m.snapshots()), "tags": ls(m.project / "tags"),
                              "volumes": ls(m.project / "volumes"),
                              "imports": ls(m.project / "imports")}
    for v in out["volumes"]:  # type: ignore[union-attr]
        out[f"volumes/{v}"] = ls(m.volume(v))
    for s in out["snapshots"]:  # type: ignore[union-attr]
        d = m.snapshots() / s
        out[s] = (run("getfattr", "-d", d).stdout, (d / "snapshot.json").read_text())
    return out


def refused(code: int, fn: Callable[..., object], *args: object) -> None:
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == code, f"{fn.__name__}{args}: {info.value}"


# --- operations --------------------------------------------------------------------------

def test_mkdir_creates_a_snapshot_in_snapshotting_or_available(mounted: Mount) -> None:
    run("mkdir", mounted.volume("vol1") / "first")
    s = mounted.snapshots() / "first"
    assert mounted.xattr(s, "state") in ("snapshotting", "available")
    assert mounted.wait_state(s) == "available"
    assert ls(mounted.volume("vol1")) == ["first"]
    assert "mkdir volumes/" in mounted.log()


WRITER = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY)
block = os.urandom(4096)
print("writing", flush=True)
while True:  # a VM writing its disk image, as QEMU does: pwrite
    os.pwrite(fd, block, 8 << 20)
    time.sleep(0.0005)
"""


def test_a_snapshot_of_a_volume_written_meanwhile_carries_a_warning(
        mounted: Mount, ext4_volume: tuple[Path, dict[str, bytes]]) -> None:
    """On ext4 a capture reads the live volume: if it was written meanwhile the
    snapshot may be torn, and user.warning says so (tar: "file changed as we read
    it"); a snapshot of a volume nobody writes has none."""
    idle = snap(mounted, "idle")
    assert run("getfattr", "-n", "user.warning", "--only-values", idle).stdout == ""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(ext4_volume[0])],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "writing\n"
        live = snap(mounted, "live")
    finally:
        writer.kill()
        writer.communicate()
    warning = run("getfattr", "-n", "user.warning", "--only-values", live).stdout
    assert "the volume was written while it was read" in warning
    assert mounted.xattr(live, "state") == "available"
    assert "warning" not in json.loads((live / "snapshot.json").read_text())  # not the API's
    assert f"snapshot {mounted.xattr(live, 'id')}: the volume was written" in mounted.log()


def test_rmdir_deletes_in_any_view(mounted: Mount) -> None:
    snap(mounted, "a")
    snap(mounted, "b")
    run("setfattr", "-n", "user.tags", "-v", "t", mounted.snapshots() / "b")
    run("rmdir", mounted.snapshots() / "a")
    assert ls(mounted.snapshots()) == ["b"]
    run("rmdir", mounted.project / "tags" / "t" / "b")
    assert ls(mounted.snapshots()) == [] and ls(mounted.volume("vol1")) == []


def test_rmdir_while_image_raw_is_open_is_ebusy(mounted: Mount) -> None:
    s = snap(mounted)
    fd = os.open(s / "image.raw", os.O_RDONLY)
    try:
        before = state_of(mounted)
        refused(errno.EBUSY, os.rmdir, s)
        refused(errno.EBUSY, os.rmdir, mounted.volume("vol1") / "s1")
        assert state_of(mounted) == before
        assert len(os.pread(fd, 4096, 0)) == 4096
    finally:
        os.close(fd)
    run("rmdir", s)  # right after close: the daemon may see RELEASE a moment later
    assert ls(mounted.snapshots()) == []


def test_mv_renames(mounted: Mount) -> None:
    s = snap(mounted, "old")
    sid = mounted.xattr(s, "id")
    run("mv", s, mounted.snapshots() / "new")
    assert ls(mounted.snapshots()) == ["new"]
    assert mounted.xattr(mounted.snapshots() / "new", "id") == sid
    run("mv", mounted.volume("vol1") / "new", mounted.volume("vol1") / "newer")
    assert mounted.xattr(mounted.snapshots() / sid, "name") == "newer"
    # renameat2's RENAME_WHITEOUT (overlayfs) was done as a plain rename.
    snaps = os.fsencode(mounted.snapshots())
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(snaps, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert libc.renameat2(fd, b"newer", fd, b"other", 4) == -1  # RENAME_WHITEOUT
        assert ctypes.get_errno() == errno.EINVAL
        assert libc.renameat2(fd, b"newer", fd, b"other", 1) == 0  # RENAME_NOREPLACE
    finally:
        os.close(fd)
    assert ls(mounted.snapshots()) == ["other"]


def test_setfattr_name_and_tags(mounted: Mount) -> None:
    s = snap(mounted)
    sid = mounted.xattr(s, "id")
    run("setfattr", "-n", "user.tags", "-v", "b,a,c", s)
    assert mounted.xattr(s, "tags") == "b,a,c"  # order kept
    assert json.loads((s / "snapshot.json").read_text())["tags"] == ["b", "a", "c"]
    run("setfattr", "-x", "user.tags", s)
    assert mounted.xattr(s, "tags") == ""
    run("setfattr", "-n", "user.name", "-v", "renamed", s)
    assert ls(mounted.snapshots()) == ["renamed"]
    assert mounted.xattr(mounted.snapshots() / sid, "name") == "renamed"


def test_snapshot_json_write_is_set(mounted: Mount) -> None:
    s = snap(mounted)
    obj = json.loads((s / "snapshot.json").read_text())
    obj["name"], obj["tags"] = "via-json", ["x", "y"]
    run("tee", s / "snapshot.json", input=json.dumps(obj, indent=2))
    assert ls(mounted.snapshots()) == ["via-json"]
    assert mounted.xattr(mounted.snapshots() / "via-json", "tags") == "x,y"


def test_outside_changes_appear_within_the_ttl(mounted: Mount) -> None:
    snap(mounted, "inside")
    assert ls(mounted.snapshots()) == ["inside"]

    async def outside() -> None:
        async with open_local_service(mounted.store) as svc:
            vol = (await svc.list_volumes(ZONE)).items[0]
            await svc.create_snapshot(ZONE, name="outside", volume_id=vol.id)
    trio.run(outside)
    deadline = time.monotonic() + 5
    while "outside" not in ls(mounted.snapshots()):
        assert time.monotonic() < deadline, "a snapshot made outside never appeared"
        time.sleep(0.2)


@contextmanager
def index_lock_held(store: Path) -> Iterator[None]:
    """The store's index lock (storelocks.py: byte 0 of DIR/lock, an OFD lock)
    taken by this process: a capture in any other process cannot commit a group,
    so it certainly stays `snapshotting` until the lock is given back."""
    fd = os.open(store / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK,
                                                       os.SEEK_SET, 0, 1, 0))
        yield
    finally:
        os.close(fd)  # drops the lock


def test_open_of_a_snapshotting_image_waits(mount_factory: Callable[..., Mount],
                                            tmp_path: Path) -> None:
    """The capture is gated (the index lock held here), so it is certainly still
    running while `cmp` opens image.raw: open() must wait, then the bytes match.
    Checked by breaking it: with the wait in fs/nodes/files.py removed, the open
    is answered at once and blocked_in_open fails."""
    store = tmp_path / "store"
    vol = random_volume(store, tmp_path / "big.raw", 8 * MiB, "big")
    m = mount_factory(store)
    s = m.snapshots() / "s"
    with index_lock_held(store):
        run("mkdir", m.volume("big") / "s")
        assert m.xattr(s, "state") == "snapshotting"
        reader = subprocess.Popen(["cmp", str(s / "image.raw"), str(vol)])
        try:
            blocked_in_open(reader.pid)
            time.sleep(0.3)
            assert reader.poll() is None and m.xattr(s, "state") == "snapshotting"
        except BaseException:
            reader.kill()
            raise
    assert reader.wait(timeout=60) == 0  # the gate is gone: the wait ends, bytes equal
    assert m.xattr(s, "state") == "available"



def test_opens_waiting_for_a_capture_are_bounded_and_the_mount_keeps_answering(
        mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    """Each open waiting for a snapshot being made holds one of pyfuse3's 99
    request tasks: 105 `head`s of one such image.raw stalled every request of
    the mount (an `ls` of anything) until the capture ended -- any user of an
    allow_other mount could freeze it. Past MAX_WAITING_OPENS an open is refused
    with EAGAIN, the waiting ones read right once the capture is done, and the
    mount answers meanwhile."""
    store = tmp_path / "store"
    vol = random_volume(store, tmp_path / "big.raw", 8 * MiB, "big")
    m = mount_factory(store)
    s = m.snapshots() / "s"
    count = 105
    with index_lock_held(store):
        run("mkdir", m.volume("big") / "s")
        readers = [subprocess.Popen(["head", "-c", "1M", str(s / "image.raw")],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                   for _ in range(count)]
        try:
            refused: list[str] = []
            deadline = time.monotonic() + 60
            while len(refused) < count - MAX_WAITING_OPENS:
                assert time.monotonic() < deadline, f"{len(refused)} refused"
                for r in readers:
                    if r.returncode is None and r.poll() is not None:
                        _, err = r.communicate()  # (closes its pipes)
                        assert r.returncode == 1, err
                        refused.append(err.decode())
                time.sleep(0.05)
            assert all("Resource temporarily unavailable" in e for e in refused), refused[:3]
            waiting = [r for r in readers if r.returncode is None]
            assert len(waiting) == MAX_WAITING_OPENS
            for r in waiting:
                blocked_in_open(r.pid)
            started = time.monotonic()
            assert sorted(os.listdir(m.project / "volumes")) == ["big"]
            assert m.xattr(s, "state") == "snapshotting"
            assert time.monotonic() - started < 2
        except BaseException:
            for r in readers:
                r.kill()
                r.communicate()
            raise
    first = vol.read_bytes()[:MiB]
    for r in waiting:
        out, _ = r.communicate(timeout=60)
        assert r.returncode == 0 and out == first
    assert "opens already wait for snapshots being made" in m.log()


# --- refusals ----------------------------------------------------------------------------

def test_mkdir_elsewhere_is_eperm(mounted: Mount) -> None:
    s = snap(mounted)
    before = state_of(mounted)
    for where in (mounted.snapshots(), mounted.project / "tags", mounted.project,
                  mounted.path / ZONE, mounted.path, s, mounted.project / "volumes",
                  mounted.project / "imports"):
        refused(errno.EPERM, os.mkdir, where / "new")
    res = run("mkdir", mounted.snapshots() / "new", check=False)
    assert res.returncode != 0 and "Operation not permitted" in res.stderr
    assert state_of(mounted) == before
    assert "EPERM: mkdir 'new'" in mounted.log()


def test_mkdir_of_a_listed_name_is_eexist(mounted: Mount) -> None:
    snap(mounted)
    before = state_of(mounted)
    refused(errno.EEXIST, os.mkdir, mounted.volume("vol1") / "s1")
    assert state_of(mounted) == before


def test_a_mkdir_and_a_rename_racing_to_one_name_leave_one_snapshot(mounted: Mount) -> None:
    """mkdir in volumes/vol1/ and mv in snapshots/ lock different directories, so
    the kernel lets them run at once: one of them gets the name, the other EEXIST."""
    current = snap(mounted, "a").name
    for i in range(5):
        name = f"race{i}"
        procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for cmd in (
            ["mv", "-T", str(mounted.snapshots() / current), str(mounted.snapshots() / name)],
            ["mkdir", str(mounted.volume("vol1") / name)])]
        done = [(p.returncode, err) for p in procs for _, err in [p.communicate()]]
        assert sorted(rc == 0 for rc, _ in done) == [False, True], done
        # mv may see the name taken before it calls rename(2), and say so itself.
        assert all("File exists" in err or "cannot overwrite" in err
                   for rc, err in done if rc), done
        if done[0][0] == 0:
            current = name
        assert ls(mounted.snapshots()).count(name) == 1
        assert mounted.wait_state(mounted.snapshots() / name) == "available"
    assert len(ls(mounted.snapshots())) == len(set(ls(mounted.snapshots())))


def test_rename_across_views_is_eperm(mounted: Mount) -> None:
    s = snap(mounted)
    run("setfattr", "-n", "user.tags", "-v", "t", s)
    before = state_of(mounted)
    for dst in (mounted.volume("vol1") / "s2", mounted.project / "tags" / "t" / "s2",
                mounted.path / "fr-par-2" / "default" / "snapshots" / "s1",
                mounted.project / "s1"):
        refused(errno.EPERM, os.rename, s, dst)
    res = run("mv", s, mounted.volume("vol1") / "s2", check=False)
    assert res.returncode != 0 and "Operation not permitted" in res.stderr
    refused(errno.EPERM, os.rename, s / "image.raw", s / "other.raw")
    assert state_of(mounted) == before


def test_rename_onto_an_existing_snapshot_is_eexist(mounted: Mount) -> None:
    a = snap(mounted, "a")
    snap(mounted, "b")
    before = state_of(mounted)
    refused(errno.EEXIST, os.rename, a, mounted.snapshots() / "b")
    # What the README says of the tool: `mv a b` onto an existing directory means
    # "move into b" (refused, EPERM); `mv -T` asks for the rename (EEXIST).
    res = run("mv", a, mounted.snapshots() / "b", check=False)
    assert res.returncode != 0 and "Operation not permitted" in res.stderr, res.stderr
    res = run("mv", "-T", a, mounted.snapshots() / "b", check=False)
    assert res.returncode != 0 and "File exists" in res.stderr, res.stderr
    assert state_of(mounted) == before


def test_read_only_xattrs_are_eperm(mounted: Mount) -> None:
    s = snap(mounted)
    before = state_of(mounted)
    for name in ("id", "state", "size", "volume_type", "base_volume_id", "base_volume_name",
                 "organization", "project", "zone", "creation_date", "modification_date",
                 "error_reason", "progress"):
        refused(errno.EPERM, os.setxattr, s, f"user.{name}", b"x")
    refused(errno.EPERM, os.removexattr, s, "user.name")
    for node in (mounted.project, mounted.volume("vol1"), mounted.path / ZONE):
        refused(errno.EPERM, os.setxattr, node, "user.name", b"x")
    res = run("setfattr", "-n", "user.id", "-v", "x", s, check=False)
    assert res.returncode != 0 and "Operation not permitted" in res.stderr
    assert state_of(mounted) == before
    assert "user.id of snapshot" in mounted.log()


def test_files_cannot_be_made_removed_or_rechmodded(mounted: Mount) -> None:
    s = snap(mounted)
    before = state_of(mounted)
    for where in (s, mounted.snapshots(), mounted.project, mounted.volume("vol1")):
        refused(errno.EPERM, os.open, where / "new-file", os.O_WRONLY | os.O_CREAT, 0o644)
    refused(errno.EPERM, os.unlink, s / "image.raw")
    refused(errno.EPERM, os.unlink, s / "snapshot.json")
    refused(errno.EPERM, os.chmod, s / "image.raw", 0o666)
    refused(errno.EPERM, os.chmod, s, 0o700)
    refused(errno.EPERM, os.rmdir, mounted.volume("vol1"))
    refused(errno.EPERM, os.rmdir, mounted.project / "tags")
    res = run("rm", "-f", s / "export", check=False)
    assert res.returncode != 0 and "Operation not permitted" in res.stderr
    assert state_of(mounted) == before


def test_an_import_is_started_once(mounted_s3: tuple[Mount, str]) -> None:
    mounted, bucket = mounted_s3
    imp = mounted.project / "imports" / "once"
    imp.write_text(f"{bucket}/a.qcow2\n")
    first = json.loads(imp.read_text())
    before = state_of(mounted)
    fd = os.open(imp, os.O_WRONLY | os.O_TRUNC)
    try:
        refused(errno.EEXIST, os.write, fd, f"{bucket}/b.qcow2\n".encode())
    finally:
        os.close(fd)
    refused(errno.EEXIST, os.open, imp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    after = state_of(mounted)
    for snap_state in (before, after):  # the snapshot may finish failing meanwhile
        snap_state.pop("once", None)
    assert after == before
    assert json.loads(imp.read_text())["key"] == first["key"] == "a.qcow2"
    # (imports/ also lists any snapshot still importing: let this one end first.)
    assert mounted.wait_state(mounted.snapshots() / "once") == "error"
    os.unlink(imp)  # forgets the record; the snapshot stays
    assert "once" not in ls(mounted.project / "imports")
    assert "once" in ls(mounted.snapshots())


def test_an_import_to_a_taken_name_is_eexist(mounted: Mount) -> None:
    """An import makes a snapshot of its file's name: like mkdir, it may not make a
    second one (both would then be listed as labels, moving the first one's path)."""
    snap(mounted, "s1")
    imports = mounted.project / "imports"
    before = state_of(mounted)
    refused(errno.EEXIST, os.open, imports / "s1", os.O_WRONLY | os.O_CREAT, 0o644)
    res = run("sh", "-c", f"echo bucket/a.qcow2 > {imports}/s1", check=False)
    assert res.returncode != 0 and "File exists" in res.stderr
    assert state_of(mounted) == before
    # Taken between the file's creation and the write that starts the import.
    fd = os.open(imports / "later", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        run("mkdir", mounted.volume("vol1") / "later")
        refused(errno.EEXIST, os.write, fd, b"bucket/a.qcow2\n")
    finally:
        os.close(fd)
    assert ls(mounted.snapshots()).count("later") == 1
    assert mounted.wait_state(mounted.snapshots() / "later") == "available"
    assert mounted.xattr(mounted.snapshots() / "later", "base_volume_name") == "vol1"


def test_bad_tags_and_names_are_einval(mounted: Mount) -> None:
    s = snap(mounted)
    before = state_of(mounted)
    refused(errno.EINVAL, os.setxattr, s, "user.tags", b"a,,b")
    refused(errno.EINVAL, os.setxattr, s, "user.name", b"")
    assert state_of(mounted) == before


def test_image_raw_opened_for_writing_is_erofs(mounted: Mount) -> None:
    s = snap(mounted)
    digest = run("sha256sum", s / "image.raw").stdout.split()[0]
    before = state_of(mounted)
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
        refused(errno.EROFS, os.open, s / "image.raw", flags)
    res = run("dd", "if=/dev/zero", f"of={s / 'image.raw'}", "bs=4096", "count=1",
              "conv=notrunc", check=False)
    assert res.returncode != 0 and "Read-only file system" in res.stderr
    assert state_of(mounted) == before
    assert run("sha256sum", s / "image.raw").stdout.split()[0] == digest


def test_image_raw_mmap_shared_by_default_private_only_with_direct_io(
        mount_factory: Callable[..., Mount], store_with_volume: Path) -> None:
    """--direct-io: the kernel refuses shared mmaps (ENODEV) and serves private
    ones; the default (page cache) serves both (the README says so)."""
    m = mount_factory(store_with_volume, "--direct-io")
    image = snap(m) / "image.raw"
    data = image.read_bytes()
    fd = os.open(image, os.O_RDONLY)
    try:
        refused(errno.ENODEV, mmap.mmap, fd, len(data), mmap.MAP_SHARED, mmap.PROT_READ)
        with mmap.mmap(fd, len(data), mmap.MAP_PRIVATE, mmap.PROT_READ) as private:
            assert private[:] == data
    finally:
        os.close(fd)
    m.stop()
    m = mount_factory(store_with_volume)
    fd = os.open(m.snapshots() / "s1" / "image.raw", os.O_RDONLY)
    try:
        with mmap.mmap(fd, len(data), mmap.MAP_SHARED, mmap.PROT_READ) as shared:
            assert shared[:] == data
    finally:
        os.close(fd)


def kernel_tuning(m: Mount) -> tuple[int, int | None, int | None]:
    """The mount's kernel read-ahead (KiB) and its FUSE connection's background
    queue (max_background, congestion_threshold; None without fusectl)."""
    dev = os.stat(m.path).st_dev
    conn = Path(FUSECTL) / str(os.minor(dev))
    ra = int(Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text())
    if not conn.is_dir():
        return ra, None, None
    return (ra, int((conn / "max_background").read_text()),
            int((conn / "congestion_threshold").read_text()))


def test_a_page_cache_mount_sets_its_read_ahead_and_request_queue(
        mount_factory: Callable[..., Mount], store_with_volume: Path,
        ext4_volume: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    """The default mount sets the kernel's read-ahead (READAHEAD_KB) and lets it
    keep up to 64 requests queued (fs/daemon.py: the default 12, congested at 9,
    cut read-ahead short); --direct-io has no page cache and keeps the kernel's
    defaults."""
    m = mount_factory(store_with_volume)
    ra, background, congestion = kernel_tuning(m)
    assert ra == READAHEAD_KB
    if background is None:  # a machine where fusectl cannot be mounted: said in the log
        assert "FUSE background queue stays at its default" in m.log()
    else:
        assert (background, congestion) == (MAX_BACKGROUND, CONGESTION_THRESHOLD)
    snap(m)
    m.stop()
    m = mount_factory(store_with_volume)  # nothing of the image cached yet
    copy = tmp_path / "copy.raw"
    run("dd", f"if={m.snapshots() / 's1' / 'image.raw'}", f"of={copy}", "bs=4k",
        "status=none")  # a small reader through the read-ahead
    assert copy.read_bytes() == ext4_volume[0].read_bytes()
    m.stop()
    m = mount_factory(store_with_volume, "--direct-io")
    ra, background, _ = kernel_tuning(m)
    assert ra != READAHEAD_KB and background != MAX_BACKGROUND


def test_error_snapshot_image_is_eio(mounted_s3: tuple[Mount, str]) -> None:
    # An import of a missing object ends in error: a snapshot with no bytes.
    mounted, bucket = mounted_s3
    (mounted.project / "imports" / "broken").write_text(f"{bucket}/disk.qcow2\n")
    s = mounted.snapshots() / "broken"
    assert mounted.wait_state(s) == "error"
    assert mounted.xattr(s, "error_reason")
    before = state_of(mounted)
    refused(errno.EIO, os.open, s / "image.raw", os.O_RDONLY)
    res = run("cat", s / "image.raw", check=False)
    assert res.returncode != 0 and "Input/output error" in res.stderr
    wait = snapfs("wait", s, check=False)
    assert wait.returncode == 1 and "error" in wait.stderr and "Traceback" not in wait.stderr
    assert state_of(mounted) == before
    assert "EIO: snapshot" in mounted.log()


def test_snapshot_json_bad_writes_are_einval_at_close(mounted: Mount) -> None:
    s = snap(mounted)
    obj = json.loads((s / "snapshot.json").read_text())
    before = state_of(mounted)

    def write(data: bytes) -> None:
        fd = os.open(s / "snapshot.json", os.O_WRONLY | os.O_TRUNC)
        try:
            assert os.write(fd, data) == len(data)  # accepted...
        finally:
            os.close(fd)  # ...and refused here, where Set is applied

    refused(errno.EINVAL, write, b"{not json")
    for field, value in (("size", 1), ("id", "00000000-0000-0000-0000-000000000000"),
                         ("zone", "nl-ams-1"), ("volume_type", "l_ssd"),
                         ("creation_date", "2020-01-01T00:00:00+00:00"), ("project", "x"),
                         ("base_volume", None), ("organization", "y")):
        changed = dict(obj, **{field: value})
        refused(errno.EINVAL, write, json.dumps(changed).encode())
    refused(errno.EINVAL, write, json.dumps(dict(obj, extra=1)).encode())
    res = run("tee", s / "snapshot.json", input="{", check=False)
    assert res.returncode != 0 and "Invalid argument" in res.stderr
    assert state_of(mounted) == before
    assert "EINVAL: invalid size: cannot be changed" in mounted.log()


def test_export_text_is_validated_at_once(mounted: Mount) -> None:
    s = snap(mounted)
    before = state_of(mounted)
    status = json.loads((s / "export").read_text())
    assert status["state"] is None
    for text in (b"\n", b"no-key\n", b"Bad_Bucket/key\n", b"http://b/k\n", b"bucket/\n",
                 b"s3://bucket\n"):
        fd = os.open(s / "export", os.O_WRONLY | os.O_TRUNC)
        try:
            refused(errno.EINVAL, os.write, fd, text)
        finally:
            os.close(fd)
    res = run("tee", s / "export", input="garbage\n", check=False)
    assert res.returncode != 0 and "Invalid argument" in res.stderr
    assert state_of(mounted) == before
    assert json.loads((s / "export").read_text()) == status


def test_export_without_object_storage_is_refused_at_the_write(mounted: Mount) -> None:
    s = snap(mounted)
    before = state_of(mounted)
    status = (s / "export").read_text()
    fd = os.open(s / "export", os.O_WRONLY)
    try:
        refused(errno.ENXIO, os.write, fd, b"bucket/key.qcow2\n")
    finally:
        os.close(fd)
    assert (s / "export").read_text() == status  # no task, not even a failed one
    assert json.loads(status)["state"] is None
    assert mounted.xattr(s, "state") == "available"
    assert state_of(mounted) == before
    assert "Object Storage is not configured" in mounted.log()


def test_import_without_object_storage_is_refused_at_the_write(mounted: Mount) -> None:
    imports = mounted.project / "imports"
    before = state_of(mounted)
    fd = os.open(imports / "bad", os.O_WRONLY | os.O_CREAT)
    try:
        refused(errno.EINVAL, os.write, fd, b"nokey\n")
    finally:
        os.close(fd)
    fd = os.open(imports / "restored", os.O_WRONLY | os.O_CREAT)
    try:
        refused(errno.ENXIO, os.write, fd, b"bucket/disk.qcow2\n")
    finally:
        os.close(fd)
    assert state_of(mounted) == before  # no snapshot in error, no imports/ entry
    assert ls(imports) == []
    assert "Object Storage is not configured" in mounted.log()


def test_open_waiting_for_a_capture_is_interruptible(mount_factory: Callable[..., Mount],
                                                     tmp_path: Path) -> None:
    """A signal to a reader waiting in open() for a capture ends its wait at once
    with EINTR, and the capture goes on. The capture is gated (index lock), so the
    reader certainly still waits when signalled. Checked by breaking it: without
    the Interrupted raise in fs/nodes/files.py the open is never answered."""
    vol = tmp_path / "slow.raw"
    vol.write_bytes(os.urandom(8 * MiB))
    store = tmp_path / "store"
    snapfs("volume", "add", "slow", vol, "--store", store)
    m = mount_factory(store)
    s = m.snapshots() / "s"
    with index_lock_held(store):
        run("mkdir", m.volume("slow") / "s")
        waited, out = interrupted_open(s / "image.raw")
        assert waited < 2
        assert out == ["-1", str(errno.EINTR)], out
        assert m.xattr(s, "state") == "snapshotting"  # the capture itself goes on
        assert "EINTR: process" in m.log() and "was signalled while waiting" in m.log()
    assert m.wait_state(s) == "available"
    run("cmp", s / "image.raw", vol)
