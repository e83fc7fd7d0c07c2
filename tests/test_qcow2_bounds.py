"""Hostile QCOW2 objects: the decoder's work and memory stay in proportion to
the bytes of the image, whatever a crafted header or table claims. zstd bombs,
multi-frame and truncated zstd clusters (judged against qemu-img, the reference
reader), L1 entries beyond the virtual size, one L2 table behind many L1
entries, merged GETs that would fetch mostly gaps, and header fields QEMU
itself refuses."""

from __future__ import annotations

import struct
import subprocess
import time
import zlib
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import pytest
import zstandard

from fixtures_qcow2 import compressed_entry, header, image
from fixtures_s3 import SeaweedServer, counted_objects
from snapfs.errors import InvalidData
from snapfs.qcow2.allocation import Allocation
from snapfs.qcow2.decoder import Qcow2Map, decompress_cluster, parse_header, read_file

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


def zstd_image(tmp_path: Path, cluster: bytes, *, tail: bytes = b"") -> Path:
    """A 64 KiB-cluster zstd image of one cluster holding ``cluster`` (the
    compressed bytes), placed at the very end of the object unless ``tail``
    follows it."""
    h = header(16, 64 * KiB, 1, zstd=True)
    host = 4 * 65536
    entry = compressed_entry(16, host, len(cluster))
    data = image(h, [3 * 65536], {3 * 65536: [entry]}, {host: cluster + tail})
    p = tmp_path / "z.qcow2"
    p.write_bytes(data)
    return p


def qemu_reads(path: Path, tmp_path: Path) -> bytes | None:
    """What qemu-img reads of the image (None: it fails, EIO)."""
    out = tmp_path / "qemu.raw"
    r = subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path),
                        str(out)], capture_output=True, text=True)
    return out.read_bytes() if r.returncode == 0 else None


def snapfs_reads(path: Path) -> bytes:
    img = read_file(str(path))
    try:
        return img.read(0, img.size)
    finally:
        img.close()


def peak_bytes(fn: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        try:
            fn()
        except InvalidData:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# -- 1. zstd clusters ---------------------------------------------------------

@pytest.mark.parametrize("sized", [True, False], ids=["content-size", "no-content-size"])
def test_zstd_bomb_is_refused_without_allocating_its_output(tmp_path: Path,
                                                            sized: bool) -> None:
    """A 64 KiB cluster whose frame inflates to 64 MiB: refused (QEMU: EIO, the
    frame does not end where the cluster does), and decoding it never holds
    more than a few clusters of memory."""
    c = zstandard.ZstdCompressor(write_content_size=sized)
    if sized:
        bomb = c.compress(bytes(64 * MiB))
    else:
        obj = c.compressobj()
        bomb = b"".join(obj.compress(bytes(MiB)) for _ in range(64)) + obj.flush()
    assert len(bomb) < 60 * KiB
    p = zstd_image(tmp_path, bomb)
    assert qemu_reads(p, tmp_path) is None
    with pytest.raises(InvalidData, match="compressed cluster for guest offset 0"):
        snapfs_reads(p)
    h = parse_header(p.read_bytes()[:4096], p.stat().st_size)
    assert peak_bytes(lambda: decompress_cluster(bomb, h, 0)) < 8 * 65536


def test_zstd_cluster_of_several_frames_reads_as_qemu_reads_it(tmp_path: Path) -> None:
    """QEMU decompresses frame after frame until the cluster is full; what
    follows it (the next cluster's bytes, a stray frame) is not read."""
    data = bytes(range(256)) * 256
    sized, unsized = zstandard.ZstdCompressor(), \
        zstandard.ZstdCompressor(write_content_size=False, write_checksum=True)
    cases = {
        "two": sized.compress(data[:20000]) + sized.compress(data[20000:]),
        "three-mixed": (unsized.compress(data[:1000]) + sized.compress(data[1000:50000])
                        + unsized.compress(data[50000:])),
        "trailing-frame": sized.compress(data) + sized.compress(b"x" * 5000),
        "trailing-garbage": sized.compress(data) + b"\xff" * 300,
        "skippable-first": struct.pack("<II", 0x184D2A50, 5) + b"12345" + sized.compress(data),
    }
    for name, cluster in cases.items():
        p = zstd_image(tmp_path, cluster)
        assert qemu_reads(p, tmp_path) == data, name
        assert snapfs_reads(p) == data, name


def test_zstd_truncated_frame_is_refused_even_when_the_cluster_is_full(
        tmp_path: Path) -> None:
    """Frames cut at the end of the object: each one QEMU fails with EIO is
    refused, including the cut that still yields exactly one cluster."""
    data = bytes(range(256)) * 256
    whole = zstandard.ZstdCompressor(write_checksum=True).compress(data)
    raw_frame = zstandard.ZstdCompressor(level=-1000, write_checksum=False).compress(
        b"\x00\x01" * 32768)
    cases = {
        "no-checksum": whole[:-4],  # every block there: exactly one cluster
        "half-checksum": whole[:-2],
        "mid-block": whole[:len(whole) // 2],
        "header-only": whole[:6],
        "short-of-a-frame": sized_half(data) + whole[:5],
        "second-frame-cut": sized_half(data) + raw_frame[:40],
    }
    for name, cluster in cases.items():
        p = zstd_image(tmp_path, cluster)
        assert qemu_reads(p, tmp_path) is None, name
        with pytest.raises(InvalidData, match="compressed cluster for guest offset 0"):
            snapfs_reads(p)


def sized_half(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data[:len(data) // 2])


def test_zstd_frame_with_a_huge_window_is_refused(tmp_path: Path) -> None:
    """A frame that asks for a 128 MiB window (what zstd would allocate to
    decode it, whatever its output) for a 64 KiB cluster."""
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=27,
                                                            write_content_size=False)
    obj = zstandard.ZstdCompressor(compression_params=params).compressobj()
    frame = obj.compress(bytes(range(256)) * 256) + obj.flush()
    assert zstandard.get_frame_parameters(frame).window_size == 128 * MiB
    with pytest.raises(InvalidData, match="compressed cluster for guest offset 0"):
        snapfs_reads(zstd_image(tmp_path, frame))


@pytest.mark.parametrize("cluster", ["512", "64k", "2M"])
def test_qemu_zstd_images_still_read(tmp_path: Path, cluster: str) -> None:
    raw = tmp_path / "r.raw"
    with open(raw, "wb") as f:
        f.truncate(5 * MiB)
        f.write(b"zstd clusters of every size\n" * 50000)
        f.seek(3 * MiB)
        f.write(bytes(range(256)) * 4000)
    img = tmp_path / "r.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", "-o",
                    f"compression_type=zstd,cluster_size={cluster}", str(raw), str(img)],
                   check=True, capture_output=True)
    assert snapfs_reads(img) == raw.read_bytes()


# -- 2. L1 entries: only those the virtual size needs; one fetch per table -------

def test_l1_entries_beyond_the_virtual_size_are_ignored(tmp_path: Path) -> None:
    """QEMU never reads L1 entries past the virtual size: garbage there is no
    reason to refuse the image, and costs nothing."""
    cs = 65536
    h = header(16, 1 * MiB, 1000)
    table = [(4 + i) * cs for i in range(16)]
    data = bytes(range(256)) * 4096
    l1 = [3 * cs] + [(1 << 62) | 12345] * 999  # reserved bits, unaligned: garbage
    p = tmp_path / "l1.qcow2"
    p.write_bytes(image(h, l1, {3 * cs: table}, {4 * cs: data}))
    assert qemu_reads(p, tmp_path) == data
    assert snapfs_reads(p) == data
    assert h.l1_used == 1
    qmap = Qcow2Map(parse_header(p.read_bytes()[:4096], p.stat().st_size),
                    p.read_bytes()[cs:cs + 8000], p.stat().st_size)
    assert len(qmap.l1) == 1


def test_mark_l2_of_one_table_behind_every_l1_entry_is_fast_and_exact() -> None:
    """64 TiB whose 131072 L1 entries all name one full L2 table: marked in
    well under a second, exactly as marking each index alone would."""
    cs = 65536
    h = header(16, 64 * TiB, 131072)
    full = [(4 + i) * cs for i in range(8192)]
    qmap = Qcow2Map(h, struct.pack(">Q", 3 * cs) * 131072, 600 * MiB)
    alloc = Allocation(h.size)
    start = time.monotonic()
    alloc.mark_l2(qmap, list(range(131072)), _array(full))
    assert time.monotonic() - start < 1.5
    assert alloc.count() == alloc.grains == 64 * MiB

    # Sparse, irregular tables, small clusters and a partial last table: the
    # shared marking equals marking one index at a time.
    for bits, size in ((16, 3 * GiB + 5 * MiB + 512), (12, 37 * MiB + 4096),
                       (9, 3 * MiB + 512), (13, 100 * MiB)):
        h = header(bits, size, 1 << 16)
        per = (1 << bits) // 8
        entries = [0] * per
        for i in (0, 1, 2, 17, per // 3, per // 2 + 1, per - 1):
            entries[i] = (5 + i) << bits
        entries[per // 4] = compressed_entry(bits, 12345, 100)
        qmap = Qcow2Map(h, bytes(8 * h.l1_size), 1 << 40)
        n = h.l1_used
        indices = [i for i in range(n) if i % 3 != 1] + [n - 1]
        shared, alone = Allocation(size), Allocation(size)
        shared.mark_l2(qmap, indices, _array(entries))
        for i in indices:
            alone.mark_l2(qmap, [i], _array(entries))
        assert shared.bits == alone.bits and shared.count() == alone.count(), bits
        assert list(shared.runs()) == list(alone.runs())


def _array(entries: list[int]) -> Any:
    from array import array
    return array("Q", entries)


async def test_one_l2_table_behind_many_l1_entries_is_fetched_once(
        s3_server: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """512 L1 entries (256 GiB at 64 KiB clusters) name the same L2 table:
    opening fetches the header, the used part of the L1 table and that table
    once; the entries past the virtual size (a garbage table) are not read.
    (The table names a small compressed cluster: a data cluster named 512
    times is refused, test_qcow2_claims.py.)"""
    cs = 65536
    h = header(16, 256 * GiB, 2000)
    table = [0] * 8192
    data = b"\x07" * cs  # 79 bytes of deflate: it claims 63 of them 512 times
    packer = zlib.compressobj(9, zlib.DEFLATED, -12)
    packed = packer.compress(data) + packer.flush()
    table[3] = compressed_entry(16, 4 * cs, len(packed))
    body = image(h, [3 * cs] * 512 + [5 * cs] * 1488,
                 {3 * cs: table, 5 * cs: [(1 << 62) | 7] * 8192}, {4 * cs: packed})
    s3_server.client().put_object(Bucket=bucket, Key="shared", Body=body)
    objects, seen = await counted_objects(s3_server)
    try:
        reader: Any = await objects.open_qcow2(bucket, "shared")
        try:
            assert sorted(seen) == [(0, 4096), (cs, 512 * 8), (3 * cs, cs)]
            span = 8192 * cs
            for i in (0, 1, 300, 511):
                assert await reader.next_allocated(i * span) == i * span
                got = bytes(await reader.fetch(i * span + 3 * cs, cs))
                assert got == data
            assert reader.allocation.count() == 512
        finally:
            await reader.aclose()
    finally:
        await objects.aclose()


# -- 3. merged GETs stay within twice the bytes needed ---------------------------

async def test_scattered_clusters_are_not_fetched_with_their_gaps(
        s3_server: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """512-byte clusters, each 60 KiB after the last on the host: a 64 KiB read
    needs 64 KiB; merging across every gap would GET 7.5 MiB."""
    cb, cs = 9, 512
    n = 128
    h = header(cb, n * cs, 2, l1_table_offset=8 * cs, refcount_table_offset=16 * cs)
    gap = 60 * KiB
    first = 64 * KiB
    tables = {24 * cs: [first + i * gap for i in range(64)],
              25 * cs: [first + (64 + i) * gap for i in range(64)]}
    blobs = {first + i * gap: bytes([i]) * cs for i in range(n)}
    body = image(h, [24 * cs, 25 * cs], tables, blobs)
    p = tmp_path / "scattered.qcow2"
    p.write_bytes(body)
    want = b"".join(bytes([i]) * cs for i in range(n))
    assert qemu_reads(p, tmp_path) == want
    s3_server.client().put_object(Bucket=bucket, Key="scattered", Body=body)
    objects, seen = await counted_objects(s3_server)
    try:
        reader: Any = await objects.open_qcow2(bucket, "scattered")
        try:
            seen.clear()
            assert bytes(await reader.fetch(0, n * cs)) == want
            assert sum(length for _, length in seen) <= 2 * n * cs, seen
        finally:
            await reader.aclose()
    finally:
        await objects.aclose()


# -- 4. header fields QEMU refuses -------------------------------------------------

def test_refcount_table_beyond_qemus_limits_is_refused(tmp_path: Path) -> None:
    """QEMU refuses a refcount table over 8 MiB, missing, or off a cluster
    boundary; so does the decoder (it never reads the table)."""
    cs = 65536
    for kw, match in (({"refcount_table_clusters": 129}, "refcount table of 129 clusters"),
                      ({"refcount_table_clusters": 0}, "no refcount table"),
                      ({"refcount_table_offset": 2 * cs + 8}, "refcount table offset")):
        h = header(16, MiB, 1, **kw)
        p = tmp_path / "rt.qcow2"
        p.write_bytes(image(h, [0], {}))
        assert qemu_reads(p, tmp_path) is None
        with pytest.raises(InvalidData, match=match):
            snapfs_reads(p)
