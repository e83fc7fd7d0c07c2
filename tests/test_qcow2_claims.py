"""The host-bytes ledger (snapfs/qcow2/hostclaims.py): an image that names one
host cluster from many guest clusters -- a few hundred kilobytes of object
mapping a terabyte of data, hours of import work -- is refused before anything
is fetched beyond its tables, while every image QEMU makes (compressed
clusters packed back to back, internal snapshots, small and large clusters)
passes. ``qemu-img check`` is the judge of which images are broken."""

from __future__ import annotations

import os
import re
import struct
import subprocess
from array import array
from pathlib import Path

import pytest

from fixtures_qcow2 import compressed_entry, header, image
from fixtures_s3 import SeaweedServer, counted_objects, qcow2_of
from snapfs.errors import InvalidAnswer, InvalidData
from snapfs.memory import READERS
from snapfs.qcow2.decoder import Qcow2Map, parse_header
from snapfs.qcow2.format import OFFSET_MASK, OFLAG_ZERO
from snapfs.qcow2.hostclaims import MAX_GRANULES, HostClaims, min_compressed

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
CS = 64 * KiB
REFUSED = "from more guest clusters than they can hold"


def ledger(data: bytes) -> HostClaims:
    """The ledger of a whole image, fed as an import feeds it: each distinct
    L2 table once, with the L1 entries naming it, after check_l2."""
    h = parse_header(data[:4096], len(data))
    qmap = Qcow2Map(h, data[h.l1_table_offset:h.l1_table_offset + h.l1_used * 8], len(data))
    users: dict[int, list[int]] = {}
    for i, e in enumerate(qmap.l1):
        if e & OFFSET_MASK:
            users.setdefault(e & OFFSET_MASK, []).append(i)
    claims = HostClaims(qmap)
    for off, indices in users.items():
        table = qmap.parse_l2(data[off:off + h.cluster_size])
        qmap.check_l2(indices[0], table)
        claims.claim_l2(indices, table)
    return claims


def qemu_finds_a_cluster_named_twice(data: bytes, tmp_path: Path) -> bool:
    """Whether ``qemu-img check`` counts two or more references to one host
    cluster (crafted images have no refcounts: every cluster is an error
    there, so the reference count is what tells)."""
    p = tmp_path / "check.qcow2"
    p.write_bytes(data)
    r = subprocess.run(["qemu-img", "check", str(p)], capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert "refcount=0 reference=1" in out, out
    return re.search(r"reference=([2-9]|\d\d+)\b", out) is not None


def qemu(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


@pytest.mark.parametrize("opts", [
    ["-c", "-o", "cluster_size=512"],
    ["-c", "-o", "cluster_size=64k"],
    ["-c", "-o", "cluster_size=64k,compression_type=zstd"],
    ["-o", "cluster_size=64k"],
    ["-o", "cluster_size=2M"],
], ids=["deflate-512", "deflate-64k", "zstd-64k", "plain-64k", "plain-2M"])
def test_images_qemu_makes_pass(tmp_path: Path, opts: list[str]) -> None:
    """Compressible runs (tiny compressed clusters, many to a host cluster),
    random data and holes, as qemu-img convert writes them."""
    raw = tmp_path / "v.raw"
    with open(raw, "wb") as f:
        f.truncate(24 * MiB)
        f.write(b"\x01" * (3 * MiB))  # compresses to ~18-79 bytes a cluster
        f.seek(5 * MiB)
        f.write(os.urandom(2 * MiB))
        f.seek(9 * MiB)
        f.write(b"".join(b"line %d of text\n" % i for i in range(200_000)))
    out = tmp_path / "v.qcow2"
    qemu("qemu-img", "convert", "-O", "qcow2", *opts, raw, out)
    ledger(out.read_bytes())


def test_an_image_with_internal_snapshots_passes(tmp_path: Path) -> None:
    """Clusters shared with internal snapshots are named once by the active
    tree (the snapshots' own L1 tables are not read)."""
    img = tmp_path / "s.qcow2"
    qemu("qemu-img", "create", "-f", "qcow2", img, "16M")
    qemu("qemu-io", "-c", "write -P 0x11 0 8M", img)
    qemu("qemu-img", "snapshot", "-c", "one", img)
    qemu("qemu-io", "-c", "write -P 0x22 1M 2M", img)
    qemu("qemu-img", "snapshot", "-c", "two", img)
    qemu("qemu-io", "-c", "write -P 0x33 4M 64k", img)
    ledger(img.read_bytes())


def test_a_data_cluster_named_twice_is_refused(tmp_path: Path) -> None:
    """Twice in one table, once in each of two tables, or one table named by
    two L1 entries: refused, and qemu-img check calls each a refcount error."""
    h = header(16, 1 * GiB, 2)
    data = {5 * CS: b"\xaa" * CS, 6 * CS: b"\xbb" * CS}
    one = [5 * CS, 6 * CS] + [0] * 8190
    cases = {
        "one table": image(h, [3 * CS, 0], {3 * CS: [5 * CS, 6 * CS, 5 * CS]}, data),
        "two tables": image(h, [3 * CS, 4 * CS], {3 * CS: one, 4 * CS: [0, 0, 6 * CS]}, data),
        "shared table": image(h, [3 * CS, 3 * CS], {3 * CS: one}, data),
    }
    for what, body in cases.items():
        with pytest.raises(InvalidData, match=REFUSED):
            ledger(body)
        assert qemu_finds_a_cluster_named_twice(body, tmp_path), what
    # The same clusters named once each pass.
    once = image(h, [3 * CS, 4 * CS], {3 * CS: one, 4 * CS: [0, 0, 0]}, data)
    ledger(once)
    assert not qemu_finds_a_cluster_named_twice(once, tmp_path)


def test_zero_entries_and_a_shared_table_of_zeros_pass() -> None:
    """Zero-flag entries and empty ones claim nothing, however many name them."""
    h = header(16, 64 * TiB, 131072, refcount_table_offset=18 * CS)
    body = image(h, [20 * CS] * 131072, {20 * CS: [OFLAG_ZERO] * 8192})
    assert len(body) < 2 * MiB
    ledger(body)


def test_compressed_clusters_claim_the_bytes_they_surely_hold() -> None:
    """Packed back to back, across granule boundaries, they pass; one named
    twice is refused once the names claim more than the granule holds."""
    h = header(16, 512 * MiB, 1)
    base = 5 * CS
    # 40 clusters of 3000 bytes packed back to back from the middle of a granule:
    # their descriptors overlap in shared sectors, their bytes do not.
    packed = [compressed_entry(16, base + 1000 + i * 3000, 3000) for i in range(40)]
    ledger(image(h, [3 * CS], {3 * CS: packed}, {base: os.urandom(4 * CS)}))
    # A 20 KiB compressed cluster named four times: 80 KiB from one 64 KiB granule.
    big = compressed_entry(16, base, 20 * KiB)
    with pytest.raises(InvalidData, match=REFUSED):
        ledger(image(h, [3 * CS], {3 * CS: [big] * 4}, {base: os.urandom(CS)}))
    ledger(image(h, [3 * CS], {3 * CS: [big] * 3}, {base: os.urandom(CS)}))
    # A tiny one claims the least a cluster can own: 63 bytes of deflate here.
    tiny = compressed_entry(16, base, 10)
    fits = CS // min_compressed(CS, zstd=False)
    ledger(image(h, [3 * CS], {3 * CS: [tiny] * fits}, {base: os.urandom(CS)}))
    with pytest.raises(InvalidData, match=REFUSED):
        ledger(image(h, [3 * CS], {3 * CS: [tiny] * (fits + 1)}, {base: os.urandom(CS)}))


def test_a_huge_object_gets_coarser_granules_and_bounded_memory() -> None:
    """Past MAX_GRANULES clusters a granule holds several: the ledger stays at
    8 MiB, and a cluster named more often than its granule has clusters is
    still refused."""
    file_size = 4 * MAX_GRANULES * CS  # 256 GiB of object
    h = header(16, 8 * GiB, 16)
    qmap = Qcow2Map(h, struct.pack(">Q", 3 * CS) + bytes(8 * 15), file_size)
    claims = HostClaims(qmap)
    assert claims.granule == 4 * CS and len(claims.claimed) * 8 <= 8 * MiB
    claims.claim_l2([0], array("Q", [(8 + i) * CS for i in range(8192)]))
    claims = HostClaims(qmap)
    claims.claim_l2([0], array("Q", [9 * CS] * 4 + [0] * 8188))  # granule 8..11 full
    with pytest.raises(InvalidData, match=REFUSED):
        claims.claim_l2([1], array("Q", [9 * CS] + [0] * 8191))


def _terabyte_from_one_cluster() -> bytes:
    """1 TiB whose 2048 L1 entries name one L2 table whose 8192 entries all
    name one data cluster: 1 TiB of import work from ~300 KiB of object."""
    h = header(16, 1 * TiB, 2048, l1_table_offset=CS, refcount_table_offset=2 * CS)
    return image(h, [4 * CS] * 2048, {4 * CS: [5 * CS] * 8192},
                 {5 * CS: bytes(range(256)) * 256})


async def test_an_import_refuses_it_after_fetching_its_tables_once(
        s3_server: SeaweedServer, bucket: str) -> None:
    body = _terabyte_from_one_cluster()
    assert len(body) < 400 * KiB
    s3_server.client().put_object(Bucket=bucket, Key="bomb", Body=body)
    objects, seen = await counted_objects(s3_server)
    try:
        with pytest.raises(InvalidData, match=REFUSED):
            await objects.open_qcow2(bucket, "bomb")
        # Header, L1 and the one table: no data cluster was fetched.
        assert sorted(seen) == [(0, 4096), (CS, 2048 * 8), (4 * CS, CS)], seen
    finally:
        await objects.aclose()



async def test_a_refused_version_is_refused_again_without_its_tables_fetched(
        s3_server: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """The next open of a version already refused answers its reason after the
    HEAD (a crafted image is not fetched and checked again per `cat`); a new
    version under that key is judged afresh. The refused reader does not stay
    in the readers' budget (each refusal kept one, its map included)."""
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="bomb", Body=_terabyte_from_one_cluster())
    objects, seen = await counted_objects(s3_server)
    members = READERS.members
    try:
        with pytest.raises(InvalidData, match=REFUSED) as first:
            await objects.open_qcow2(bucket, "bomb")
        assert seen
        assert READERS.members == members  # the refused reader left the budget
        seen.clear()
        with pytest.raises(InvalidData, match=REFUSED) as again:
            await objects.open_qcow2(bucket, "bomb")
        assert str(again.value) == str(first.value)
        assert seen == []
        raw = tmp_path / "v.raw"
        raw.write_bytes(os.urandom(2 * CS))
        client.put_object(Bucket=bucket, Key="bomb", Body=qcow2_of(raw).read_bytes())
        reader = await objects.open_qcow2(bucket, "bomb")
        try:
            assert bytes(await reader.fetch(0, 2 * CS)) == raw.read_bytes()
        finally:
            await reader.aclose()
    finally:
        await objects.aclose()


async def test_a_refusal_of_one_answer_is_not_kept_as_the_versions_verdict(
        s3_server: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """A GET refused for its version (412, as a proxy gone wrong may answer) says
    nothing of the object's bytes: that open fails, the next open of the same
    version is judged afresh and reads right."""
    raw = tmp_path / "v.raw"
    raw.write_bytes(os.urandom(2 * CS))
    s3_server.client().put_object(Bucket=bucket, Key="flaky", Body=qcow2_of(raw).read_bytes())
    objects, seen = await counted_objects(s3_server)
    client = (await objects.calls_for()).client
    counted = client.get_object
    once = [True]

    def get_object(**kw: object) -> object:
        if once and kw.get("IfMatch"):  # the real server refuses a wrong version
            once.clear()
            kw["IfMatch"] = '"0123456789abcdef0123456789abcdef"'
        return counted(**kw)
    client.get_object = get_object
    try:
        with pytest.raises(InvalidAnswer, match="changed while being read"):
            await objects.open_qcow2(bucket, "flaky")
        seen.clear()
        reader = await objects.open_qcow2(bucket, "flaky")
        try:
            assert seen  # fetched and checked again, not answered from the refusal
            assert bytes(await reader.fetch(0, 2 * CS)) == raw.read_bytes()
        finally:
            await reader.aclose()
    finally:
        await objects.aclose()
