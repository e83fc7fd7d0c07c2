"""Opening one version of a QCOW2 object again does not validate its tables
again: the first open fetched and checked every L2 table (for a fully allocated
1 TB image, 128 MiB of GETs and ~20 s of checks, on every `cat image.raw`); the next ones of
that version (same ETag) cost a HEAD. A new version is validated afresh."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fixtures_s3 import SeaweedServer, counted_objects, qcow2_of

pytestmark = pytest.mark.s3
MiB = 1 << 20


def _image(path: Path) -> tuple[bytes, bytes]:
    raw = os.urandom(3 * MiB) + bytes(2 * MiB) + os.urandom(MiB)
    path.write_bytes(raw)
    return raw, qcow2_of(path).read_bytes()


async def test_a_version_is_validated_once_and_a_new_one_again(
        s3_server: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    first_raw, first = _image(tmp_path / "a.raw")
    second_raw, second = _image(tmp_path / "b.raw")
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="img", Body=first)
    objects, seen = await counted_objects(s3_server)
    try:
        reader = await objects.open_qcow2(bucket, "img")
        opened_with = len(seen)
        assert opened_with >= 3  # header, L1, the L2 table
        assert bytes(await reader.fetch(0, len(first_raw))) == first_raw
        await reader.aclose()

        seen.clear()
        again = await objects.open_qcow2(bucket, "img")
        assert seen == []  # a HEAD only: no table fetched or checked again
        assert again.allocation.count() == reader.allocation.count() > 0
        assert bytes(await again.fetch(0, len(first_raw))) == first_raw
        await again.aclose()

        client.put_object(Bucket=bucket, Key="img", Body=second)
        seen.clear()
        fresh = await objects.open_qcow2(bucket, "img")
        assert len(seen) >= 3  # another version: validated afresh
        assert bytes(await fresh.fetch(0, len(second_raw))) == second_raw
        await fresh.aclose()
    finally:
        await objects.aclose()


def test_a_version_is_known_by_its_server_and_etag_and_the_store_is_bounded() -> None:
    """Another server's object of the same name, ETag and size is not taken for
    it (an ETag is opaque: two servers may reuse one); without an ETag nothing
    is kept; the kept maps stay within their bytes."""
    import struct

    from fixtures_qcow2 import header
    from snapfs.qcow2.allocation import Allocation
    from snapfs.qcow2.decoder import Qcow2Map
    from snapfs.s3.shared import Validated, version

    h = header(16, 512 * MiB, 1)
    qmap = Qcow2Map(h, struct.pack(">Q", 3 * 65536), 600 * MiB)
    alloc = Allocation(h.size)
    store = Validated(capacity=3 * (8 + len(alloc.bits)))
    store.put(version("http://a", "b", "k", '"e1"', 600 * MiB), qmap, alloc)
    assert store.get(version("http://a", "b", "k", '"e1"', 600 * MiB)) == (qmap, alloc)
    assert store.get(version("http://other", "b", "k", '"e1"', 600 * MiB)) is None
    assert store.get(version("http://a", "b", "k", '"e2"', 600 * MiB)) is None
    store.put(version("http://a", "b", "n", None, 600 * MiB), qmap, alloc)
    assert store.get(version("http://a", "b", "n", None, 600 * MiB)) is None
    for i in range(5):
        store.put(version("http://a", "b", f"k{i}", '"e"', 600 * MiB), qmap, alloc)
    assert store.used <= store.capacity
    assert store.get(version("http://a", "b", "k4", '"e"', 600 * MiB)) is not None
    assert store.get(version("http://a", "b", "k", '"e1"', 600 * MiB)) is None  # the oldest went
