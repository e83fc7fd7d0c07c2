"""The QCOW2 decoder on images qemu-img made (plain, deflate, zstd, v2, other
cluster sizes) and on every kind of bad image: each refusal is InvalidData with
a message naming what is wrong."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from snapfs.errors import InvalidData
from snapfs.qcow2.decoder import read_file

MiB = 1 << 20


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sparse raw image: compressible text, random data, holes, a partial end."""
    path = tmp_path_factory.mktemp("raw") / "image.raw"
    size = 24 * MiB + 4096
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(0)
        f.write(b"snapfs qcow2 decoder test line\n" * 40000)  # ~1.2 MiB compressible
        f.seek(7 * MiB + 12345)
        f.write(os.urandom(3 * MiB))  # incompressible: stored uncompressed by -c
        f.seek(size - 1000)
        f.write(os.urandom(1000))
    return path


def convert(raw: Path, out: Path, *opts: str) -> Path:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *opts,
                    str(raw), str(out)], check=True, capture_output=True)
    return out


def decode(path: Path, block: int = MiB) -> bytes:
    img = read_file(str(path))
    try:
        parts = []
        for off in range(0, img.size, block):
            parts.append(img.read(off, block))
        return b"".join(parts)
    finally:
        img.close()


@pytest.mark.parametrize("opts", [
    (),
    ("-c",),
    ("-c", "-o", "compression_type=zstd"),
    ("-o", "compat=0.10"),
    ("-c", "-o", "compat=0.10"),
    ("-o", "cluster_size=4096"),
    ("-c", "-o", "cluster_size=2M"),
    ("-o", "refcount_bits=64"),
], ids=["plain", "deflate", "zstd", "v2", "v2-deflate", "4k", "2M-deflate", "rc64"])
def test_decodes_qemu_images(raw: Path, tmp_path: Path, opts: tuple[str, ...]) -> None:
    img = convert(raw, tmp_path / "img.qcow2", *opts)
    assert decode(img) == raw.read_bytes()


def test_unaligned_reads(raw: Path, tmp_path: Path) -> None:
    img = convert(raw, tmp_path / "img.qcow2", "-c")
    data = raw.read_bytes()
    r = read_file(str(img))
    try:
        for off, n in [(1, 100), (65535, 2), (7 * MiB, 200_000), (len(data) - 10, 100)]:
            assert r.read(off, n) == data[off:off + n]
    finally:
        r.close()


def test_zero_flag_clusters(tmp_path: Path) -> None:
    """qemu-io 'write -z' leaves v3 zero-flag entries over previously written data."""
    img = tmp_path / "z.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(img), "4M"], check=True,
                   capture_output=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 2M",
                    "-c", "write -z 64k 128k", str(img)], check=True, capture_output=True)
    data = decode(img)
    assert data[:65536] == b"\xab" * 65536
    assert data[65536:196608] == bytes(131072)
    assert data[196608:2 * MiB] == b"\xab" * (2 * MiB - 196608)
    assert data[2 * MiB:] == bytes(2 * MiB)


def refuse(path: Path, match: str) -> None:
    with pytest.raises(InvalidData, match=match):
        decode(path)


def patch(src: Path, dst: Path, offset: int, data: bytes) -> Path:
    buf = bytearray(src.read_bytes())
    buf[offset:offset + len(data)] = data
    dst.write_bytes(bytes(buf))
    return dst


@pytest.fixture
def good(raw: Path, tmp_path: Path) -> Path:
    return convert(raw, tmp_path / "good.qcow2")


def test_refuses_garbage(tmp_path: Path) -> None:
    p = tmp_path / "garbage"
    p.write_bytes(os.urandom(100_000))
    refuse(p, "not a QCOW2 image: bad magic")
    e = tmp_path / "empty"
    e.write_bytes(b"")
    refuse(e, "not a QCOW2 image: bad magic")


def test_refuses_truncated_header(good: Path, tmp_path: Path) -> None:
    p = tmp_path / "t.qcow2"
    p.write_bytes(good.read_bytes()[:50])
    refuse(p, "truncated QCOW2 image: 50 bytes")


def test_refuses_truncated_data(good: Path, tmp_path: Path) -> None:
    p = tmp_path / "t.qcow2"
    data = good.read_bytes()
    p.write_bytes(data[:len(data) // 2])
    refuse(p, "truncated QCOW2 image: .* beyond the object's")


def test_refuses_truncated_compressed(raw: Path, tmp_path: Path) -> None:
    img = convert(raw, tmp_path / "c.qcow2", "-c")
    p = tmp_path / "t.qcow2"
    data = img.read_bytes()
    p.write_bytes(data[:len(data) - 3 * 65536])
    refuse(p, "truncated QCOW2 image|does not decompress|decompresses to")


def test_refuses_bad_version(good: Path, tmp_path: Path) -> None:
    refuse(patch(good, tmp_path / "v.qcow2", 4, struct.pack(">I", 4)),
           "unsupported QCOW2 version 4")


def test_refuses_backing_file(raw: Path, tmp_path: Path) -> None:
    base = convert(raw, tmp_path / "base.qcow2")
    over = tmp_path / "over.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(over)], check=True, capture_output=True)
    refuse(over, "has a backing file")


def qemu_reads(path: Path) -> bool:
    return subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path),
                           str(path) + ".raw"], capture_output=True).returncode == 0


def test_an_empty_backing_file_name_is_no_backing_file(raw: Path, good: Path,
                                                       tmp_path: Path) -> None:
    """backing_file_offset set with backing_file_size 0 was refused as "has a
    backing file"; QEMU reads such an image as standalone (an empty name)."""
    p = patch(good, tmp_path / "b.qcow2", 8, struct.pack(">QI", 512, 0))
    assert qemu_reads(p)
    assert decode(p) == raw.read_bytes()


@pytest.mark.parametrize("offset,data,match", [
    (88, struct.pack(">Q", 2), "data-file-raw"),  # autoclear bit 1, no data file
    (60, struct.pack(">IQ", 70000, 65536), "snapshot table of 70000 snapshots"),
    (60, struct.pack(">IQ", 1, 12345), "snapshot table offset 12345 is not"),
    (60, struct.pack(">IQ", 0, 12345), "snapshot table offset 12345 is not"),
], ids=["data-file-raw", "snapshots", "snapshot-offset", "no-snapshots-offset"])
def test_refuses_what_qemu_refuses_in_the_header(good: Path, tmp_path: Path, offset: int,
                                                 data: bytes, match: str) -> None:
    """Header fields snapfs ignored (it imports no internal snapshots, reads no
    data file) on which QEMU refuses the image: accepted, so an import made a
    snapshot of an image no QEMU would read."""
    p = patch(good, tmp_path / "h.qcow2", offset, data)
    assert not qemu_reads(p)
    refuse(p, match)


def test_refuses_encryption(tmp_path: Path) -> None:
    p = tmp_path / "enc.qcow2"
    r = subprocess.run(["qemu-img", "create", "-f", "qcow2", "--object",
                    "secret,id=sec0,data=hunter2", "-o",
                    "encrypt.format=aes,encrypt.key-secret=sec0",
                    str(p), "1M"], capture_output=True, text=True)
    assert p.exists(), r.stderr
    refuse(p, r"is encrypted \(AES\)")


def test_refuses_luks(good: Path, tmp_path: Path) -> None:
    # (qemu-img's LUKS creation times PBKDF and fails on a busy machine: patch instead)
    refuse(patch(good, tmp_path / "l.qcow2", 32, struct.pack(">I", 2)),
           r"is encrypted \(LUKS\)")


def test_refuses_extended_l2(tmp_path: Path) -> None:
    p = tmp_path / "ext.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-o", "extended_l2=on",
                    str(p), "1M"], check=True, capture_output=True)
    refuse(p, "extended L2 entries")


def test_refuses_unknown_incompatible_feature(good: Path, tmp_path: Path) -> None:
    refuse(patch(good, tmp_path / "f.qcow2", 72, struct.pack(">Q", 1 << 40)),
           "unknown incompatible features 0x10000000000")


def test_refuses_corrupt_bit(good: Path, tmp_path: Path) -> None:
    refuse(patch(good, tmp_path / "c.qcow2", 72, struct.pack(">Q", 2)), "marked corrupt")


def test_refuses_compression_type_without_bit(good: Path, tmp_path: Path) -> None:
    refuse(patch(good, tmp_path / "c.qcow2", 104, b"\x01"),
           "compression_type 1 without the compression type feature bit")


def test_refuses_l1_beyond_end(good: Path, tmp_path: Path) -> None:
    refuse(patch(good, tmp_path / "l1.qcow2", 40, struct.pack(">Q", 1 << 40)),
           "truncated QCOW2 image: L1 table ends at byte")


def test_refuses_small_l1(good: Path, tmp_path: Path) -> None:
    refuse(patch(good, tmp_path / "l1.qcow2", 24, struct.pack(">Q", 1 << 40)),
           "L1 table has 1 entries; the virtual size")


def test_refuses_odd_size(good: Path, tmp_path: Path) -> None:
    refuse(patch(good, tmp_path / "s.qcow2", 24, struct.pack(">Q", 1000)),
           "virtual size 1000 is not a positive multiple of 512")


@pytest.mark.parametrize("opts", [(), ("-c",), ("-c", "-o", "compression_type=zstd")],
                         ids=["plain", "deflate", "zstd"])
def test_damaged_metadata_is_refused_or_read_never_crashes(tmp_path: Path,
                                                           opts: tuple[str, ...]) -> None:
    """Random damage to the header and tables: every outcome is either data or
    InvalidData -- never another exception (IndexError, struct.error, ...)."""
    import random
    raw = tmp_path / "small.raw"
    with open(raw, "wb") as f:
        f.truncate(3 * MiB)
        f.write(b"0123456789abcdef" * 20000)
        f.seek(2 * MiB)
        f.write(os.urandom(200_000))
    good = convert(raw, tmp_path / "small.qcow2", *opts).read_bytes()
    hdr = struct.unpack(">4sIQIIQIIQQIIQ", good[:72])
    l1_off, rt_off = hdr[8], hdr[9]
    # Metadata worth hitting: header, L1, refcount table, and the first L2 table.
    l2_off = struct.unpack(">Q", good[l1_off:l1_off + 8])[0] & ((1 << 56) - 512)
    regions = [(0, 112), (l1_off, l1_off + 8), (rt_off, rt_off + 16), (l2_off, l2_off + 400)]
    rng = random.Random(1234)
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(150):
        buf = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            lo, hi = rng.choice(regions)
            pos = rng.randrange(lo, hi)
            buf[pos] = rng.randrange(256)
        if rng.random() < 0.2:
            del buf[rng.randrange(len(buf) // 2, len(buf)):]
        p = tmp_path / "damaged.qcow2"
        p.write_bytes(bytes(buf))
        try:
            decode(p)
            outcomes["ok"] += 1
        except InvalidData as exc:
            assert str(exc)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 20, outcomes


def test_refuses_a_virtual_size_beyond_64_tib_at_once(tmp_path: Path) -> None:
    """6 MB of object claiming 1 PiB: refused from the header, in no time."""
    import time

    from snapfs.qcow2.decoder import parse_header
    from snapfs.qcow2.format import MAX_VIRTUAL_SIZE
    for size, ok in (("1P", False), (str(MAX_VIRTUAL_SIZE + 512), False),
                     (str(MAX_VIRTUAL_SIZE), True)):
        p = tmp_path / f"{size}.qcow2"
        subprocess.run(["qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=2M",
                        str(p), size], check=True, capture_output=True)
        assert p.stat().st_size < 8 * MiB
        with open(p, "rb") as f:
            head = f.read(4096)
        start = time.monotonic()
        if ok:
            assert parse_header(head, p.stat().st_size).size == MAX_VIRTUAL_SIZE
        else:
            with pytest.raises(InvalidData,
                               match=f"beyond the {MAX_VIRTUAL_SIZE}-byte limit \\(64 TiB\\)"):
                parse_header(head, p.stat().st_size)
        assert time.monotonic() - start < 1


def _extents_per_cluster(qmap, offset: int, length: int, tables):  # type: ignore[no-untyped-def]
    """The reference: one L2 entry at a time (the decoder's earlier algorithm)."""
    from snapfs.qcow2.decoder import DATA, ZERO, Extent
    from snapfs.qcow2.format import OFFSET_MASK
    cs, per = qmap.header.cluster_size, qmap.header.l2_entries
    end = min(offset + length, qmap.size)
    out: list[Extent] = []
    pos = offset
    while pos < end:
        within = pos % cs
        n = min(cs - within, end - pos)
        l1i, l2i = divmod(pos // cs, per)
        l2_off = qmap.l1[l1i] & OFFSET_MASK
        ext = Extent(ZERO, pos, n) if not l2_off else \
            qmap._entry_extent(tables(l2_off)[l2i], pos, within, n)
        last = out[-1] if out else None
        if last is not None and last.kind == ext.kind == ZERO:
            out[-1] = Extent(ZERO, last.guest_offset, last.length + n)
        elif (last is not None and last.kind == ext.kind == DATA
              and last.host_offset + last.length == ext.host_offset):
            out[-1] = Extent(DATA, last.guest_offset, last.length + n, last.host_offset)
        else:
            out.append(ext)
        pos += n
    return out


def test_extents_by_runs_equal_the_per_cluster_walk() -> None:
    """The run-at-a-time extents (plain data runs, empty runs) give the very
    pieces -- and the very refusals -- of the per-cluster walk, on random tables
    mixing contiguous and scattered data, holes, zero flags, compressed entries,
    copied flags, reserved bits and hosts past the object."""
    import random
    from array import array

    from snapfs.qcow2.decoder import Qcow2Map, parse_header
    from snapfs.qcow2.format import OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO
    rng = random.Random(7)
    cs, per = 4096, 512  # 4 KiB clusters: 512 entries per table, 2 MiB per table
    n_tables = 4
    size = n_tables * per * cs - 3 * 512  # a partial last cluster
    hdr = bytearray(4096)
    struct.pack_into(">4sIQIIQIIQQIIQ", hdr, 0, b"QFI\xfb", 3, 0, 0, 12, size, 0,
                     n_tables, 1 << 20, 2 << 20, 1, 0, 0)
    struct.pack_into(">QQQII", hdr, 72, 0, 0, 0, 4, 104)
    outcomes = {"same": 0, "refused": 0, "data": 0}
    for trial in range(150):
        file_size = rng.choice([64 << 20, 8 << 20, (8 << 20) + 1234])
        header = parse_header(bytes(hdr), file_size)
        l1 = [0 if rng.random() < 0.2 else (3 << 20) + i * cs for i in range(n_tables)]
        qmap = Qcow2Map(header, b"".join(struct.pack(">Q", e) for e in l1), file_size)
        tables = {}
        for i in range(n_tables):
            entries = []
            host = rng.randrange(1, 2000) * cs
            while len(entries) < per:
                kind = rng.random()
                run = rng.randint(1, 60)
                for _ in range(run):
                    if kind < 0.45:  # contiguous data, sometimes copied
                        entries.append(host | (OFLAG_COPIED if rng.random() < 0.7 else 0))
                        host += cs
                    elif kind < 0.65:
                        entries.append(0)
                    elif kind < 0.75:
                        entries.append(rng.randrange(1, 2500) * cs)
                    elif kind < 0.8:
                        entries.append(OFLAG_ZERO | rng.choice([0, host]))
                    elif kind < 0.85:
                        entries.append(OFLAG_COMPRESSED | rng.randrange(1 << 20, 4 << 20))
                    elif kind < 0.87:
                        entries.append(host | rng.choice([2, 1 << 57, 4096 >> 1]))
                    else:
                        host = rng.randrange(1, 2500) * cs
            tables[(3 << 20) + i * cs] = array("Q", entries[:per])
        for _ in range(10):
            off = rng.randrange(0, size)
            length = rng.choice([1, 512, cs, 3 * cs + 17, 1 << 20, 5 << 20, size])
            try:
                want = _extents_per_cluster(qmap, off, length, tables.__getitem__)
            except InvalidData as exc:
                with pytest.raises(InvalidData) as got:
                    qmap.extents(off, length, tables.__getitem__)
                assert str(got.value) == str(exc), (trial, off, length)
                outcomes["refused"] += 1
                continue
            assert qmap.extents(off, length, tables.__getitem__) == want, (trial, off, length)
            outcomes["same"] += 1
            outcomes["data"] += sum(e.length > cs for e in want if e.kind == "data")
    assert min(outcomes.values()) > 100, outcomes  # every path taken, often
