"""SEEK_DATA / SEEK_HOLE on image.raw (pyfuse3 built with scripts/pyfuse3-lseek.patch):
lseek answers from the chunk map, so cp, tar --sparse and qemu-img skip holes
without reading them -- a 1 TiB image holding 4 MiB copies in well under a second
where reading its zeros through FUSE would take minutes."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Callable

import pyfuse3
import pytest
import trio

from fixtures_mount import MiB, Mount, run, snapfs
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
