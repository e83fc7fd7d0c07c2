"""The streaming QCOW2 encoder, judged by qemu-img (check, compare, map) and by
our own decoder, on local files: no S3 involved."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from snapfs.qcow2.decoder import read_file
from snapfs.qcow2.encoder import CLUSTER_SIZE, StreamingEncoder

MiB = 1 << 20


def encode_file(raw: Path, out: Path, block: int = MiB) -> StreamingEncoder:
    """Encode ``raw`` the way the exporter does: body streamed, head written last."""
    size = raw.stat().st_size
    enc = StreamingEncoder(size)
    with open(raw, "rb") as src, open(out, "wb") as dst:
        dst.seek(enc.head_size)
        while True:
            data = src.read(block)
            if not data:
                break
            dst.write(enc.feed(data))
        tail, head = enc.finish()
        dst.write(tail)
        dst.seek(0)
        dst.write(head)
    assert out.stat().st_size == enc.image_size
    return enc


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def make_raw(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
    for off, data in pieces:
        write_at(path, off, data)


def qemu_check(path: Path) -> dict:
    r = subprocess.run(["qemu-img", "check", "--output=json", "-f", "qcow2", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def qemu_compare(qcow: Path, raw: Path) -> None:
    r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw",
                        str(qcow), str(raw)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Images are identical" in r.stdout


def test_sparse_image_is_valid_identical_and_small(tmp_path: Path) -> None:
    raw, img = tmp_path / "image.raw", tmp_path / "image.qcow2"
    size = 64 * MiB + 512  # not a whole number of clusters
    pieces = [(0, os.urandom(3 * CLUSTER_SIZE)),
              (5 * MiB + 100, os.urandom(70_000)),  # unaligned, spans clusters
              (size - 300, os.urandom(300))]  # the partial last cluster
    make_raw(raw, size, pieces)
    enc = encode_file(raw, img)
    info = qemu_check(img)
    assert info["check-errors"] == 0 and info.get("leaks", 0) == 0
    assert not info.get("corruptions")
    qemu_compare(img, raw)
    # Clusters holding data: 3 + 2 (70 000 bytes straddling) + the last one.
    assert enc.data_clusters == 3 + 2 + 1
    # + one L2 table + one refcount block
    assert img.stat().st_size == enc.head_size + (6 + 1 + 1) * CLUSTER_SIZE
    # Zero clusters are unallocated in qemu's view too.
    r = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(img)],
                       capture_output=True, text=True, check=True)
    allocated = sum(e["length"] for e in json.loads(r.stdout) if e["data"])
    assert allocated == 6 * CLUSTER_SIZE - (CLUSTER_SIZE - size % CLUSTER_SIZE)
    img_r = read_file(str(img))
    try:
        assert img_r.read(0, size) == raw.read_bytes()
    finally:
        img_r.close()


def test_data_across_several_l2_tables(tmp_path: Path) -> None:
    """Guest ranges > 512 MiB use several L2 tables, each emitted after its data."""
    raw, img = tmp_path / "big.raw", tmp_path / "big.qcow2"
    size = 1300 * MiB
    pieces = [(511 * MiB + 7, os.urandom(2 * MiB)),  # straddles the first L2 boundary
              (1299 * MiB, os.urandom(MiB))]
    make_raw(raw, size, pieces)
    enc = encode_file(raw, img, block=4 * MiB)
    assert enc.l1_size == 3
    info = qemu_check(img)
    assert info["check-errors"] == 0 and info.get("leaks", 0) == 0
    qemu_compare(img, raw)
    assert img.stat().st_size < 4 * MiB + enc.head_size + 8 * CLUSTER_SIZE


def test_all_zero_image_has_no_data_clusters(tmp_path: Path) -> None:
    raw, img = tmp_path / "zero.raw", tmp_path / "zero.qcow2"
    make_raw(raw, 16 * MiB, [])
    enc = encode_file(raw, img)
    assert enc.data_clusters == 0
    qemu_check(img)
    qemu_compare(img, raw)
    assert img.stat().st_size == enc.head_size + CLUSTER_SIZE  # + one refcount block


def test_feed_rules() -> None:
    enc = StreamingEncoder(3 * CLUSTER_SIZE)
    enc.feed(bytes(100))  # a partial cluster may only come last
    with pytest.raises(ValueError):
        enc.feed(bytes(CLUSTER_SIZE))
    enc2 = StreamingEncoder(CLUSTER_SIZE)
    with pytest.raises(ValueError):
        enc2.feed(bytes(2 * CLUSTER_SIZE))


def test_head_is_small_for_large_volumes() -> None:
    """Only header, L1 and refcount table are sized up front: 1 TiB -> 3 clusters."""
    enc = StreamingEncoder(1 << 40)
    assert enc.head_size == 3 * CLUSTER_SIZE


def test_pieces_are_one_view_per_run_of_data_clusters() -> None:
    """feed_pieces hands a caller one view per run of data clusters (not one per
    cluster: the export copies each piece with Python overhead per piece); zero
    clusters split runs, and a new L2 range starts after the table of the last."""
    enc = StreamingEncoder(1024 * MiB)
    data = bytearray(os.urandom(2 * MiB))
    data[5 * CLUSTER_SIZE:7 * CLUSTER_SIZE] = bytes(2 * CLUSTER_SIZE)
    pieces = enc.feed_pieces(data)
    assert all(isinstance(p, memoryview) for p in pieces)
    assert [len(p) for p in pieces] == [5 * CLUSTER_SIZE, 25 * CLUSTER_SIZE]
    assert b"".join(pieces) == data[:5 * CLUSTER_SIZE] + data[7 * CLUSTER_SIZE:]
    enc.skip_to(512 * MiB - CLUSTER_SIZE)  # one cluster before the second L2 range
    pieces = enc.feed_pieces(data[:3 * CLUSTER_SIZE])
    assert [len(p) for p in pieces] == [CLUSTER_SIZE, CLUSTER_SIZE, 2 * CLUSTER_SIZE]
    assert bytes(pieces[0]) == data[:CLUSTER_SIZE]  # the last cluster of range 0,
    assert bytes(pieces[2]) == data[CLUSTER_SIZE:3 * CLUSTER_SIZE]  # then range 1's two
    assert pieces[1][:8] != bytes(8)  # between them: range 0's L2 table, mapping data
