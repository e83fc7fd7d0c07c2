"""SEEK_DATA / SEEK_HOLE on image.raw (pyfuse3 built with scripts/pyfuse3-lseek.patch):
lseek answers from the chunk map, so cp, tar --sparse and qemu-img skip holes
without reading them -- a 1 TiB image holding 4 MiB copies in well under a second
where reading its zeros through FUSE would take minutes."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pyfuse3
import pytest
import trio

from fixtures_mount import MiB, Mount, run, seek_landings, snapfs
from snapfs.errors import InvalidArgument, NoMoreData, errno_for
from snapfs.fs.allocation import seek
from snapfs.local.allocation import seek_hole

pytestmark = pytest.mark.mount

#: Data in MiB 0, 1 and 5 of an 8 MiB volume; the rest holes.
DATA_MIB = (0, 1, 5)


def sparse_volume(path: Path, size: int, data_at: tuple[int, ...]) -> dict[int, bytes]:
    """A raw file of ``size`` bytes with 1 MiB of random data at each offset."""
    written = {}
    with open(path, "wb") as f:
        f.truncate(size)
        for off in data_at:
            written[off] = os.urandom(MiB)
            f.seek(off)
            f.write(written[off])
    return written


def take(m: Mount, volume: str, name: str) -> Path:
    run("mkdir", m.volume(volume) / name)
    assert m.wait_state(m.volume(volume) / name) == "available"
    return m.snapshots() / name


def lseek(path: Path, offset: int, whence: int) -> int:
    """The offset lseek lands on, or -errno."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, offset, whence)
    except OSError as exc:
        return -exc.errno
    finally:
        os.close(fd)


def test_the_installed_pyfuse3_has_lseek() -> None:
    # scripts/setup builds it; without it the kernel would see every image as data.
    assert hasattr(pyfuse3.Operations, "lseek")


def test_seek_data_and_hole_follow_the_chunk_map(mount_factory: Callable[..., Mount],
                                                 tmp_path: Path) -> None:
    store = tmp_path / "store"
    sparse_volume(tmp_path / "v.raw", 8 * MiB, tuple(i * MiB for i in DATA_MIB))
    snapfs("volume", "add", "v", tmp_path / "v.raw", "--store", store)
    m = mount_factory(store)
    s = take(m, "v", "s1")
    img = s / "image.raw"
    before = img.read_bytes()
    D, H = os.SEEK_DATA, os.SEEK_HOLE
    cases = [  # (offset MiB, whence, landing MiB or -errno)
        (0, D, 0), (0, H, 2), (1, H, 2), (2, D, 5), (2, H, 2), (4, D, 5),
        (5, D, 5), (5, H, 6), (6, D, -errno.ENXIO), (7, H, 7), (8, D, -errno.ENXIO),
        (8, H, -errno.ENXIO), (100, H, -errno.ENXIO)]
    for off, whence, want in cases:
        got = lseek(img, off * MiB, whence)
        assert got == (want * MiB if want >= 0 else want), (off, whence, got)
    # Inside a chunk: data at once, the hole at the chunk's end.
    assert lseek(img, MiB + 123, D) == MiB + 123
    assert lseek(img, MiB + 123, H) == 2 * MiB
    # qemu-img's raw driver maps holes with these seeks: its map is map.json.
    mapped = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", img).stdout)
    assert mapped == json.loads((s / "map.json").read_text())
    # Seeking changed nothing.
    assert img.read_bytes() == before
    # A document has no holes: data at the offset, the hole at its end.
    doc = s / "snapshot.json"
    size = len(doc.read_bytes())
    assert (lseek(doc, 3, D), lseek(doc, 3, H), lseek(doc, size, D)) == (3, size, -errno.ENXIO)


def test_tools_skip_the_holes_of_a_1_tib_image(mount_factory: Callable[..., Mount],
                                               tmp_path: Path) -> None:
    """Without SEEK_DATA, cp/tar/qemu-img would read 1 TiB of zeros through FUSE
    (minutes); the timeouts below are far under that."""
    store = tmp_path / "store"
    vol = tmp_path / "big.raw"
    data = sparse_volume(vol, 1 << 40, (0, 300_000 * MiB + 4096, (1 << 40) - MiB))
    snapfs("volume", "add", "big", vol, "--store", store)
    m = mount_factory(store)
    img = take(m, "big", "b1") / "image.raw"
    copy = tmp_path / "copy.raw"
    run("cp", img, copy, timeout=60)
    assert os.path.getsize(copy) == 1 << 40
    assert os.stat(copy).st_blocks * 512 <= 8 * MiB  # three data chunks, one split
    with open(copy, "rb") as f:
        for off, raw in data.items():
            f.seek(off)
            assert f.read(len(raw)) == raw, off
    assert run("qemu-img", "compare", "-f", "raw", "-F", "raw", copy, vol,
               timeout=60).returncode == 0
    copy.unlink()
    tarred = run("sh", "-c", f"tar -cSf - -C '{img.parent}' image.raw | wc -c",
                 timeout=60).stdout
    assert int(tarred) < 16 * MiB
    qcow = tmp_path / "b.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", img, qcow, timeout=60)
    assert run("qemu-img", "compare", "-F", "raw", qcow, vol, timeout=60).returncode == 0


def test_seek_rules_without_the_kernel(tmp_path: Path) -> None:
    async def data_at(o: int) -> int:
        return max(o, 10)

    async def hole_at(o: int) -> int:
        return 20 if o < 20 else o

    async def main() -> None:
        assert await seek(0, os.SEEK_DATA, 30, data_at, hole_at) == 10
        assert await seek(12, os.SEEK_HOLE, 30, data_at, hole_at) == 20
        assert await seek(25, os.SEEK_HOLE, 30, data_at, hole_at) == 25
        for off, whence in ((30, os.SEEK_HOLE), (-1, os.SEEK_DATA)):
            with pytest.raises(NoMoreData) as exc:
                await seek(off, whence, 30, data_at, hole_at)
            assert errno_for(exc.value) == errno.ENXIO
        with pytest.raises(InvalidArgument):
            await seek(0, os.SEEK_SET, 30, data_at, hole_at)
    trio.run(main)
    # A shadow's holes come from its own filesystem (the volume's copy).
    path = tmp_path / "f"
    sparse_volume(path, 4 * MiB, (MiB,))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert seek_hole(fd, MiB, 4 * MiB) == 2 * MiB
        assert seek_hole(fd, 4 * MiB, 4 * MiB) == 4 * MiB
    finally:
        os.close(fd)


def answers(path: Path, offsets: list[int]) -> list[tuple[int, int]]:
    """(SEEK_DATA, SEEK_HOLE) landing of each offset in ``path``, or -errno."""
    return [(lseek(path, off, os.SEEK_DATA), lseek(path, off, os.SEEK_HOLE)) for off in offsets]


#: Data runs of 1, 2, 3, 8 and 17 chunks (SEEK_HOLE gallops then halves back over
#: each), and a last chunk of 1 KiB, in a volume of 40 MiB + 1 KiB.
RUNS_MIB = (0, 2, 3, 5, 6, 7, *range(9, 17), *range(18, 35), 39, 40)


@pytest.mark.parametrize("direct_io", [False, True], ids=["page-cache", "direct-io"])
def test_every_seek_lands_where_ext4_lands_on_the_volume_itself(
        mount_factory: Callable[..., Mount], tmp_path: Path, direct_io: bool) -> None:
    """The volume file on the test's own filesystem is the reference: every run
    and hole MiB-aligned, so its 4 KiB extents are the chunk map's. At and past
    the end, a negative offset and the largest ones: ENXIO for both, as there."""
    store = tmp_path / "store"
    size = 40 * MiB + 1024
    vol = tmp_path / "v.raw"
    sparse_volume(vol, size, tuple(i * MiB for i in RUNS_MIB[:-1]))
    with open(vol, "r+b") as f:  # the short last chunk: 1 KiB of data, then the end
        f.seek(40 * MiB)
        f.write(os.urandom(1024))
    snapfs("volume", "add", "v", vol, "--store", store)
    m = mount_factory(store, *(["--direct-io"] if direct_io else []))
    img = take(m, "v", "s1") / "image.raw"
    offsets = [k * MiB + d for k in range(42) for d in (0, 4095, MiB - 1)]
    offsets += [size - 1, size, size + 1, -1, -MiB, 2**62, 2**63 - 1]
    want = answers(vol, offsets)
    assert answers(img, offsets) == want
    # Many at once, on one descriptor and on several: the same answers.
    shared = os.open(img, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: seek_landings(shared, offsets), range(8)))
            results += list(pool.map(lambda _: answers(img, offsets), range(8)))
    finally:
        os.close(shared)
    assert all(r == want for r in results)
    assert lseek(img, size, os.SEEK_HOLE) == -errno.ENXIO  # at the end: ENXIO, not the size
    assert lseek(img, size - 1, os.SEEK_HOLE) == size  # the end is a hole
    # Tools built on them: qemu-img maps both alike, cp makes the same bytes.
    mapped = [run("qemu-img", "map", "--output=json", "-f", "raw", p).stdout for p in (img, vol)]
    assert mapped[0] == mapped[1]
    copy = tmp_path / "copy.raw"
    run("cp", "--sparse=always", img, copy)
    run("cmp", copy, vol)
    assert "bug #" not in m.log()


def test_documents_seek_in_what_their_open_reads_after_the_snapshot_goes(
        mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    """snapshot.json, map.json and export are rendered at open: once their
    snapshot is deleted (from another process) reads still answer from that, and
    so must SEEK_DATA/SEEK_HOLE (they said ENOENT, from the node's stat)."""
    store = tmp_path / "store"
    sparse_volume(tmp_path / "v.raw", 8 * MiB, (0,))
    snapfs("volume", "add", "v", tmp_path / "v.raw", "--store", store)
    m = mount_factory(store)
    s = take(m, "v", "s1")
    fds = {name: os.open(s / name, os.O_RDONLY) for name in ("snapshot.json", "map.json", "export")}
    try:
        sizes = {name: os.fstat(fd).st_size for name, fd in fds.items()}
        before = {name: os.pread(fd, 1 << 16, 0) for name, fd in fds.items()}
        run("rmdir", s)
        assert not s.exists()
        for name, fd in fds.items():
            size = sizes[name]
            got = []
            for off in (0, size // 2, size - 1, size, -1):
                for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                    try:
                        got.append(os.lseek(fd, off, whence))
                    except OSError as exc:
                        got.append(-exc.errno)
            nx = -errno.ENXIO
            assert got == [0, size, size // 2, size, size - 1, size, nx, nx, nx, nx], name
            assert os.pread(fd, 1 << 16, 0) == before[name]
    finally:
        for fd in fds.values():
            os.close(fd)
    # imports/<name> while being written: what it reads (its status) or was written.
    fd = os.open(m.project / "imports" / "newimp", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"bucket")
        status = os.fstat(fd).st_size
        assert status > 6
        assert [os.lseek(fd, 3, os.SEEK_DATA), os.lseek(fd, 3, os.SEEK_HOLE)] == [3, status]
    finally:
        with pytest.raises(OSError):  # "bucket" names no object: refused at close
            os.close(fd)
    assert "bug #" not in m.log()


def test_seek_hole_in_a_million_entry_run_is_quick(mount_factory: Callable[..., Mount],
                                                   tmp_path: Path) -> None:
    """SEEK_HOLE from the start of 1 TB of data: the run's end found by galloping
    over the map in SQLite (~0.05 s; rows compared in Python took ~0.4 s), then
    known to the open file: asking again from inside the run costs no scan.
    SEEK_DATA over the 1 TiB hole after it is one index seek."""
    store = tmp_path / "store"
    size = 2 << 40
    vol = tmp_path / "big.raw"
    sparse_volume(vol, size, (0, size - MiB))
    snapfs("volume", "add", "big", vol, "--store", store)
    m = mount_factory(store)
    take(m, "big", "b1")
    snap_id = m.xattr(m.snapshots() / "b1", "id")
    m.stop()
    # A million more entries, all the first chunk's (readable, so the image is
    # data there): a terabyte's map without writing a terabyte.
    run_end = 1_000_000
    db = sqlite3.connect(store / "metadata.db")
    with db:
        snap, chunk = db.execute(
            "SELECT m.snap, m.chunk FROM snapshot_chunks m JOIN snapshots s ON s.rowid = m.snap "
            "WHERE s.id = ? AND m.idx = 0", (snap_id,)).fetchone()
        db.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
                   "WHERE i < ?) INSERT INTO snapshot_chunks (snap, idx, chunk) "
                   "SELECT ?, i, ? FROM n", (run_end - 1, snap, chunk))
    db.close()
    m = mount_factory(store)
    img = m.snapshots() / "b1" / "image.raw"
    fd = os.open(img, os.O_RDONLY)
    try:
        t = time.perf_counter()
        assert os.lseek(fd, 0, os.SEEK_HOLE) == run_end * MiB
        first = time.perf_counter() - t
        t = time.perf_counter()
        for k in range(1, 200):  # each a scan of the rest of the run, without the kept one
            assert os.lseek(fd, k * 4999 * MiB + k, os.SEEK_HOLE) == run_end * MiB
        again = time.perf_counter() - t
        t = time.perf_counter()
        assert os.lseek(fd, run_end * MiB + 5, os.SEEK_DATA) == size - MiB
        over_hole = time.perf_counter() - t
        assert os.pread(fd, 16, 500_000 * MiB) == os.pread(fd, 16, 0)  # data indeed
    finally:
        os.close(fd)
    print(f"SEEK_HOLE at 0: {first:.3f} s, 199 more: {again:.3f} s, SEEK_DATA: {over_hole:.4f} s")
    assert first < 0.5 and again < 1.0 and over_hole < 0.1, (first, again, over_hole)
    assert "bug #" not in m.log()
