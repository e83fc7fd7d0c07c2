"""Compressed chunks (snapfs/local/compression.py): compressible, incompressible
and mixed chunks round-trip byte-identical through capture, the mount, export,
import and fsck; a store written before compressed chunks reads unchanged; a
corrupted compressed chunk is EIO and an fsck problem; a capture killed mid-way
leaves a store fsck finds clean."""

from __future__ import annotations

import errno
import mmap
import os
import sqlite3
import tarfile
from pathlib import Path
from typing import Callable

import pytest
import trio

from fixtures_mount import Mount, run, snapfs
from fixtures_s3 import SeaweedServer, qemu_img_judges
from fixtures_store import (PACED_CAPTURE, MiB, ZONE, chunks_stored, flip_bits, kill_mid_way,
                            random_bytes, read_all, snapfs_cli, snapshot_of, wait_state,
                            write_volume)
from snapfs.errors import CorruptData
from snapfs.local import open_local_service
from snapfs.local.compression import set_store_level
from snapfs.local.fsck import fsck
from snapfs.local.shadows import fiemap

FIEMAP_EXTENT_SHARED = 0x2000

KiB = 1 << 10
PRECHANGE_STORE = Path(__file__).parent / "data" / "prechange_store.tar.gz"


def text_bytes(n: int, seed: int = 0) -> bytes:
    """Compressible, and different for each seed (so chunks do not dedup)."""
    out = bytearray()
    i = 0
    while len(out) < n:
        line = f"{seed}:{i} the quick brown fox jumps over the lazy dog {i * 7919 % 1000}\n"
        out += line.encode()
        i += 1
    return bytes(out[:n])


def mixed_volume(path: Path) -> Path:
    """Chunk 0 compressible, 1 random, 2 half and half, 3 a hole, 4 a short
    compressible tail: the three kinds and a hole."""
    return write_volume(path, 4 * MiB + 300 * KiB, [
        (0, text_bytes(MiB, 10)),
        (MiB, random_bytes(MiB, 11)),
        (2 * MiB, random_bytes(MiB // 2, 12) + text_bytes(MiB // 2, 13)),
        (4 * MiB, text_bytes(300 * KiB, 14)),
    ])


def forms(conn: sqlite3.Connection, snap_name: str) -> dict[int, bool]:
    """chunk index -> stored compressed?"""
    return {int(idx): raw is not None for idx, raw in conn.execute(
        "SELECT m.idx, c.raw_length FROM snapshot_chunks m JOIN chunks c ON c.id = m.chunk "
        "JOIN snapshots s ON s.rowid = m.snap WHERE s.name = ?", (snap_name,))}


async def test_the_three_kinds_of_chunk_round_trip_and_fsck_checks_them(
        store_dir: Path, tmp_path: Path) -> None:
    vol = mixed_volume(tmp_path / "mixed.raw")
    async with open_local_service(store_dir) as svc:
        snap = await snapshot_of(svc, vol, "s")
        assert forms(svc.md.conn, "s") == {0: True, 1: False, 2: True, 4: True}
        stored = svc.md.conn.execute("SELECT sum(length) FROM chunks").fetchone()[0]
        assert stored < 2 * MiB  # the random MiB raw, the rest much smaller
        assert await read_all(svc, snap.id) == vol.read_bytes()
        # The same bytes again dedup onto the stored chunks, whatever their form.
        again = write_volume(tmp_path / "again.raw", vol.stat().st_size,
                             [(0, vol.read_bytes())])
        before = svc.md.conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
        await snapshot_of(svc, again, "again")
        assert svc.md.conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == before
        # Level 0: new chunks raw, beside the compressed ones.
        set_store_level(svc.md, 0)
        off = write_volume(tmp_path / "off.raw", MiB, [(0, text_bytes(MiB, 15))])
        s_off = await snapshot_of(svc, off, "off")
        assert forms(svc.md.conn, "off") == {0: False}
        assert await read_all(svc, s_off.id) == off.read_bytes()
        rep = await fsck(svc)
        assert rep.ok and rep.chunks == 5, rep.problems
    res = snapfs_cli("fsck", store=store_dir)
    assert res.returncode == 0 and "clean" in res.stdout, res.stdout + res.stderr


def test_the_level_is_a_store_setting(store_dir: Path) -> None:
    res = snapfs_cli("compression", "1", "--store", str(store_dir))
    assert res.returncode == 0 and "zstd level 1" in res.stdout, res.stderr
    assert "zstd level 1" in snapfs_cli("compression", "--store", str(store_dir)).stdout
    bad = snapfs_cli("compression", "99", "--store", str(store_dir))
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "zstd level 1" in snapfs_cli("compression", "--store", str(store_dir)).stdout


async def test_a_store_written_before_compressed_chunks_reads_unchanged(
        tmp_path: Path) -> None:
    """A real pre-change store (made by tests/data/make_prechange_store.py with the
    snapfs before compressed chunks: schema 8, every chunk raw) is migrated on
    open, reads the same, takes compressed chunks beside its raw ones and is
    fsck-clean."""
    with tarfile.open(PRECHANGE_STORE) as tar:
        tar.extractall(tmp_path, filter="tar")
    store = tmp_path / "store"
    want = (tmp_path / "old.raw").read_bytes()
    async with open_local_service(store) as svc:
        old = (await svc.list_snapshots(ZONE, name="old")).items[0]
        assert old.state == "available"
        assert svc.md.conn.execute("SELECT count(*) FROM chunks WHERE raw_length IS NOT NULL"
                                   ).fetchone()[0] == 0
        assert old.size == len(want)
        assert await read_all(svc, old.id) == want
        vol = write_volume(tmp_path / "new.raw", len(want) + MiB,
                           [(0, want), (len(want), text_bytes(MiB, 16))])
        new = await snapshot_of(svc, vol, "new")
        assert list(forms(svc.md.conn, "new").values()).count(True) >= 1
        assert await read_all(svc, new.id) == vol.read_bytes()
        rep = await fsck(svc)
        assert rep.ok, rep.problems


async def test_a_corrupt_compressed_chunk_is_corrupt_data_and_an_fsck_problem(
        store_dir: Path, tmp_path: Path) -> None:
    vol = mixed_volume(tmp_path / "v.raw")
    async with open_local_service(store_dir) as svc:
        snap = await snapshot_of(svc, vol, "s")
        pack, offset, length = svc.md.conn.execute(
            "SELECT c.pack, c.offset, c.length FROM chunks c JOIN snapshot_chunks m "
            "ON m.chunk = c.id WHERE m.idx = 0").fetchone()
    flip_bits(store_dir, (pack, offset), length // 2, 0x10)
    async with open_local_service(store_dir) as svc:
        reader = await svc.open_image(ZONE, snap.id)
        try:
            with pytest.raises(CorruptData):
                await reader.read(0, 4096)
            assert await reader.read(MiB, MiB) == vol.read_bytes()[MiB:2 * MiB]
        finally:
            await reader.aclose()
        rep = await fsck(svc)
        assert len(rep.problems) == 1 and "does not match" in rep.problems[0]
    res = snapfs_cli("fsck", store=store_dir)
    assert res.returncode == 1 and "problem: chunk" in res.stdout


def test_a_corrupt_compressed_chunk_reads_as_eio_through_the_mount(
        mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    vol = mixed_volume(tmp_path / "v.raw")
    data = vol.read_bytes()
    store = tmp_path / "store"
    snapfs("volume", "add", "v", vol, "--store", store)
    m = mount_factory(store, "--page-cache")
    run("mkdir", m.volume("v") / "s")
    path = m.snapshots() / "s"
    assert m.wait_state(path) == "available"
    image = path / "image.raw"
    copy = tmp_path / "copy.raw"
    run("dd", f"if={image}", f"of={copy}", "bs=1M")
    assert run("cmp", copy, vol, check=False).returncode == 0
    db = sqlite3.connect(store / "metadata.db")
    pack, offset, length, raw = db.execute(
        "SELECT c.pack, c.offset, c.length, c.raw_length FROM chunks c JOIN snapshot_chunks m "
        "ON m.chunk = c.id WHERE m.idx = 2").fetchone()
    db.close()
    assert raw == MiB and length < MiB
    flip_bits(store, (pack, offset), length - 100, 0x01)
    m.stop()
    m = mount_factory(store, "--page-cache")  # nothing of the chunk cached anywhere
    image = m.snapshots() / "s" / "image.raw"
    bad = run("dd", f"if={image}", "of=/dev/null", "bs=1M", "skip=2", "count=1", check=False)
    assert bad.returncode != 0 and "Input/output error" in bad.stderr
    with open(image, "rb", buffering=0) as f:
        with pytest.raises(OSError) as info:
            os.pread(f.fileno(), 4096, 2 * MiB)
        assert info.value.errno == errno.EIO
        assert os.pread(f.fileno(), MiB, 0) == data[:MiB]
    assert "EIO" in m.log()


@pytest.mark.s3
async def test_export_and_import_round_trip_compressed_chunks(
        s3_server: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    vol = mixed_volume(tmp_path / "v.raw")
    objects = s3_server.objects(part_size=5 * MiB)
    async with open_local_service(tmp_path / "store", objects=objects) as svc:
        snap = await snapshot_of(svc, vol)
        task = await svc.export_snapshot(ZONE, snap.id, bucket=bucket, key="m.qcow2")
        with trio.fail_after(120):
            while (t := await svc.get_task(ZONE, task.id)).status in ("pending", "started"):
                await trio.sleep(0.02)
        assert t.status == "success", t.error
    await objects.aclose()
    out = tmp_path / "out.qcow2"
    s3_server.client().download_file(bucket, "m.qcow2", str(out))
    qemu_img_judges(out, vol)
    # Imported into a second store: the chunks are compressed again, and read back.
    objects = s3_server.objects()
    async with open_local_service(tmp_path / "store2", objects=objects) as svc:
        imp = await svc.create_snapshot(ZONE, name="imported", bucket=bucket, key="m.qcow2",
                                        size=vol.stat().st_size)
        done = await wait_state(svc, imp.id)
        assert done.state == "available", done.error_reason
        assert forms(svc.md.conn, "imported") == {0: True, 1: False, 2: True, 4: True}
        assert await read_all(svc, imp.id) == vol.read_bytes()
        rep = await fsck(svc)
        assert rep.ok, rep.problems
    await objects.aclose()




async def test_a_capture_killed_mid_way_with_compression_leaves_fsck_clean(
        store_dir: Path, tmp_path: Path) -> None:
    size = 96 * MiB
    runs = [(i * MiB, text_bytes(MiB, 100 + i) if i % 3 else random_bytes(MiB, i))
            for i in range(size // MiB)]
    big = write_volume(tmp_path / "big.raw", size, runs)
    progress = await trio.to_thread.run_sync(kill_mid_way, PACED_CAPTURE, store_dir, big)
    assert 10 <= progress < 100
    db = sqlite3.connect(store_dir / "metadata.db")
    compressed = db.execute("SELECT count(*) FROM chunks WHERE raw_length IS NOT NULL"
                            ).fetchone()[0]
    db.close()
    assert compressed > 0  # it did store compressed chunks before it died
    async with open_local_service(store_dir) as svc:  # recovery
        doomed = (await svc.list_snapshots(ZONE, name="doomed")).items[0]
        assert doomed.state == "error"
        keep = await snapshot_of(svc, big, "after")
        assert await read_all(svc, keep.id) == big.read_bytes()
    res = snapfs_cli("fsck", store=store_dir)
    assert res.returncode == 0 and "clean" in res.stdout, res.stdout + res.stderr


async def test_on_a_reflink_filesystem_raw_chunks_are_cloned_and_the_rest_compressed(
        reflink_dir: Path) -> None:
    """XFS/btrfs: a snapshot is a clone of the volume (shadows.py) whose chunks are
    stored after; those compression leaves raw are cloned into the pack (their
    blocks shared with the shadow), the others appended compressed; both read back."""
    store = reflink_dir / "store"
    vol = mixed_volume(reflink_dir / "v.raw")
    async with open_local_service(store) as svc:
        snap = await snapshot_of(svc, vol, "s")
        await chunks_stored(svc)
        assert forms(svc.md.conn, "s") == {0: True, 1: False, 2: True, 4: True}
        pack, offset = svc.md.conn.execute(
            "SELECT c.pack, c.offset FROM chunks c JOIN snapshot_chunks m ON m.chunk = c.id "
            "WHERE m.idx = 1").fetchone()
        assert await read_all(svc, snap.id) == vol.read_bytes()
        rep = await fsck(svc)
        assert rep.ok, rep.problems
    fd = os.open(store / "packs" / f"{pack:08d}.pack", os.O_RDONLY)
    try:
        extents = [e for e in fiemap(fd, os.fstat(fd).st_size)
                   if e.logical <= offset < e.logical + e.length]
    finally:
        os.close(fd)
    assert extents and extents[0].flags & FIEMAP_EXTENT_SHARED


async def test_the_compress_stage_compresses_only_new_chunks_once_and_the_write_stage_decides(
        store_dir: Path, tmp_path: Path) -> None:
    """Stage 2 (capture._compress_stage) compresses, once per hash, only what the
    index does not hold; through a whole capture a known chunk dedups and a new
    one is stored once, compressed."""
    from snapfs.local.capture import Hashed, _compress_stage
    from snapfs.local.chunks import digest

    old = text_bytes(MiB, 20)
    vol = write_volume(tmp_path / "old.raw", MiB, [(0, old)])
    async with open_local_service(store_dir) as svc:
        await snapshot_of(svc, vol, "old")
        new = text_bytes(MiB, 21)
        batch = [Hashed(0, old, digest(old)), Hashed(1, new, digest(new)),
                 Hashed(2, new, digest(new)), Hashed(3, None, None)]
        send, recv = trio.open_memory_channel[list[Hashed]](1)
        send2, recv2 = trio.open_memory_channel[list[Hashed]](1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_compress_stage, recv, send2, svc.index, 3,
                               trio.CapacityLimiter(1))
            await send.send(batch)
            await send.aclose()
            out = await recv2.receive()
        assert out[0].packed is None and out[3].packed is None  # known / a hole
        assert out[1].packed and out[1].packed is out[2].packed  # compressed once
        assert len(out[1].packed) < MiB // 4

        # The whole path: the known chunk dedups (not stored again), the new one
        # is stored once, compressed, and everything reads back.
        before = svc.md.conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
        vol2 = write_volume(tmp_path / "again.raw", 3 * MiB, [(0, old), (MiB, new + new)])
        snap = await snapshot_of(svc, vol2, "again")
        assert svc.md.conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == before + 1
        assert forms(svc.md.conn, "again") == {0: True, 1: True, 2: True}
        assert await read_all(svc, snap.id) == vol2.read_bytes()
        rep = await fsck(svc)
        assert rep.ok, rep.problems


def test_a_chunk_whose_redundancy_the_probe_misses_is_still_compressed() -> None:
    """350,000 random bytes three times (copies of a .gz file in one chunk): every
    sample of the probe is incompressible, the chunk compresses to a third; random
    data stays raw."""
    from snapfs.local.compression import _worth_trying, compress, decompress
    thrice = (random_bytes(350_000, 21) * 3)[:MiB]
    assert not _worth_trying(thrice)  # the probe alone would store it raw
    z = compress(thrice, 3)
    assert z is not None and len(z) < MiB * 0.4
    assert decompress(z, MiB, "chunk") == thrice
    assert compress(random_bytes(MiB, 22), 3) is None


def test_decompress_into_fills_exactly_the_buffer_or_refuses() -> None:
    """The reader's form of decompress(): the raw bytes land in the caller's
    buffer; a frame that holds more or fewer bytes than the chunk's raw length,
    or is cut short, is CorruptData, never a partial chunk."""
    from snapfs.local.compression import compress, decompress_into
    raw = text_bytes(MiB, 23)
    z = compress(raw, 3)
    assert z is not None
    buf = bytearray(MiB)
    decompress_into(z, memoryview(buf), "chunk")
    assert buf == raw
    for frame, room in ((z, MiB - 1), (z, MiB + 1), (z[:len(z) // 2], MiB)):
        with pytest.raises(CorruptData):
            decompress_into(frame, memoryview(bytearray(room)), "chunk")


async def test_compressed_chunks_are_read_into_the_pooled_chunk_buffers(
        store_dir: Path, tmp_path: Path) -> None:
    """A stream through 24 compressed chunks reuses the readers' spare chunk
    buffers as raw chunks do: a new 1 MiB object (mapped and faulted in afresh)
    for each decompressed chunk cost a streaming daemon half again its kernel
    time."""
    n = 24
    vol = write_volume(tmp_path / "v.raw", n * MiB,
                       [(i * MiB, text_bytes(MiB, 100 + i)) for i in range(n)])
    buffers: set[int] = set()
    parts = []
    async with open_local_service(store_dir) as svc:
        snap = await snapshot_of(svc, vol, "s")
        assert all(forms(svc.md.conn, "s").values())
        reader = await svc.open_image(ZONE, snap.id)
        try:
            for off in range(0, n * MiB, 128 * KiB):
                view = await reader.read_transient(off, 128 * KiB)
                assert isinstance(view, memoryview) and isinstance(view.obj, mmap.mmap)
                buffers.add(id(view.obj))
                parts.append(bytes(view))
        finally:
            await reader.aclose()
    assert b"".join(parts) == vol.read_bytes()
    assert len(buffers) <= 16, f"{len(buffers)} chunk buffers for {n} chunks"


def test_a_raw_length_no_chunk_has_is_refused_before_it_is_allocated() -> None:
    """fsck reads the raw length from the chunk's row: a damaged row claiming a
    terabyte is CorruptData, not a terabyte allocated."""
    from snapfs.local.compression import compress, decompress
    z = compress(text_bytes(MiB, 24), 3)
    assert z is not None
    for claimed in (0, MiB + 1, 1 << 40):
        with pytest.raises(CorruptData, match="claims"):
            decompress(z, claimed, "chunk")
