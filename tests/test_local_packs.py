"""Pack files on their own: how chunks are appended, where their bytes go."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from fixtures_store import (MiB, ZONE, deletes_done, random_bytes, read_all, snapfs_cli,
                            snapshot_of, wait_state)
from snapfs.local import LocalService, open_local_service
from snapfs.local.capture import BATCH_CHUNKS
from snapfs.local.chunks import (ALIGN, CHUNK_SIZE, STAGE_BYTES, PackFiles, PackWriter, check,
                                 digest)


def cached_bytes(path: Path) -> int:
    """Bytes of the file the page cache holds, as util-linux's fincore reports them."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.strip())


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_appended_chunks_read_back_at_aligned_offsets(tmp_path: Path, direct: bool) -> None:
    # More than one staging buffer's worth, odd lengths included (a volume's last
    # chunk), so every padding and flushing path runs.
    lengths = [MiB] * (STAGE_BYTES // MiB + 3) + [3 * 512, 1, MiB - 512, 4096]
    chunks = [random_bytes(n, seed=i) for i, n in enumerate(lengths)]
    packs = PackFiles(tmp_path / "packs")
    w = PackWriter(packs, 1, 0, direct=direct)
    offsets = w.append_all(chunks[:5]) + w.append_all(chunks[5:])
    w.sync()
    end = w.end
    w.close()
    assert all(off % ALIGN == 0 for off in offsets)
    assert all(a + len(c) <= b for a, b, c in zip(offsets, offsets[1:], chunks))
    assert end % ALIGN == 0 and end >= offsets[-1] + len(chunks[-1])
    for off, data in zip(offsets, chunks):
        assert packs.read(1, off, len(data), digest(data), check(data)) == data
    # A writer taking the pack up again appends after what was committed.
    w = PackWriter(packs, 1, end, direct=direct)
    [again] = w.append_all([chunks[0]])
    w.sync()
    w.close()
    assert again == end
    assert packs.read(1, offsets[-1], len(chunks[-1]), digest(chunks[-1]),
                      check(chunks[-1])) == chunks[-1]
    packs.close()


def test_direct_writes_leave_the_page_cache_alone(tmp_path: Path) -> None:
    chunks = [random_bytes(MiB, seed=i) for i in range(8)]
    packs = PackFiles(tmp_path / "packs")
    for pack, direct in ((1, True), (2, False)):
        w = PackWriter(packs, pack, 0, direct=direct)
        w.append_all(chunks)
        w.sync()
        w.close()
    assert cached_bytes(packs.path(1)) == 0
    assert cached_bytes(packs.path(2)) > 0  # what a buffered append costs: fresh pages


async def test_a_capture_stores_its_bytes_without_filling_the_page_cache(
        store_dir: Path, volume_file: Callable[..., Path]) -> None:
    data = random_bytes(24 * MiB + 512, seed=3)
    path = volume_file("v", len(data), [(0, data)])
    async with open_local_service(store_dir) as svc:
        snap = await snapshot_of(svc, path)
        assert sum(cached_bytes(p) for p in (store_dir / "packs").glob("*.pack")) == 0
        assert await read_all(svc, snap.id) == data
        # The pack's writer waits for the next capture without its staging buffers.
        [writer] = svc.pool.idle
        assert writer._direct is not None and writer._direct._free == []


def test_a_failed_background_write_fails_the_sync(tmp_path: Path) -> None:
    """Writes run in flight while the capture goes on; an error in one must reach
    sync() -- before anything commits rows pointing at the bytes."""
    packs = PackFiles(tmp_path / "packs")
    w = PackWriter(packs, 1, 0)
    assert w._direct is not None
    os.close(w._direct.fd)  # every write now fails (EBADF), as a dying disk's would
    w._direct.fd = os.open(os.devnull, os.O_RDONLY)
    w.append_all([random_bytes(MiB, seed=1)])
    with pytest.raises(OSError):
        w.sync()
    w.close()
    packs.close()


def test_cloned_and_appended_chunks_mix_in_one_pack(reflink_dir: Path) -> None:
    """Chunks of an unchanging file (a shadow) are cloned into the pack (XFS, btrfs)."""
    src_data = random_bytes(4 * MiB, seed=9)
    src = reflink_dir / "shadow"
    src.write_bytes(src_data)
    packs = PackFiles(reflink_dir / "packs")
    w = PackWriter(packs, 1, 0)
    fd = os.open(src, os.O_RDONLY)
    try:
        [a] = w.append_all([src_data[:1000]])  # an odd tail first: the end realigns
        b = w.clone_in(fd, MiB, MiB)
        c = w.clone_in(fd, 3 * MiB, 100)  # unaligned: never cloned
        [d] = w.append_all([src_data[:MiB]])
        e = w.clone_in(fd, 0, MiB)
    finally:
        os.close(fd)
    w.sync()
    w.close()
    assert c is None and b is not None and e is not None
    assert len({a, b, d, e}) == 4 and all(x % ALIGN == 0 for x in (a, b, d, e))
    src.unlink()  # the pack's blocks are its own now
    expected = [(a, src_data[:1000]), (b, src_data[MiB:2 * MiB]), (d, src_data[:MiB]),
                (e, src_data[:MiB])]
    for off, data in expected:
        assert packs.read(1, off, len(data), digest(data), check(data)) == data
    packs.close()


def test_a_filesystem_without_clones_gets_appends(tmp_path: Path) -> None:
    src = tmp_path / "shadow"  # ext4: no FICLONERANGE
    src.write_bytes(random_bytes(MiB, seed=10))
    packs = PackFiles(tmp_path / "packs")
    w = PackWriter(packs, 1, 0)
    fd = os.open(src, os.O_RDONLY)
    try:
        assert w.clone_in(fd, 0, MiB) is None
        assert w.clone_in(fd, 0, MiB) is None  # asked once, remembered
        [at] = w.append_all([src.read_bytes()])
    finally:
        os.close(fd)
    w.sync()
    w.close()
    assert packs.read(1, at, MiB, digest(src.read_bytes()), None) == src.read_bytes()
    packs.close()


async def test_packs_roll_over_at_the_limit_and_an_empty_pack_is_unlinked(
        store_dir: Path, volume_file: Callable[..., Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A pack takes no new batch of chunks once it has reached PACK_LIMIT
    (lowered to 20 MiB here; a capture writes batches of BATCH_CHUNKS): 48 MiB
    of distinct chunks fill a first pack past the limit and go on in a second.
    Once no live chunk is left in a pack, the next open unlinks the file and
    drops its row; a pack still holding one is kept.
    Checked by breaking it: with PackWriter.full always false everything lands
    in one pack; with the empty_packs loop of recovery.py removed the files stay."""
    limit = 20 * MiB
    batch = BATCH_CHUNKS * CHUNK_SIZE
    monkeypatch.setattr("snapfs.local.chunks.PACK_LIMIT", limit)
    big = random_bytes(48 * MiB, seed=11)
    small = random_bytes(2 * MiB, seed=12)
    a = volume_file("a", len(big), [(0, big)])
    b = volume_file("b", len(small), [(0, small)])
    packs_dir = store_dir / "packs"
    async with open_local_service(store_dir) as svc:
        first = await snapshot_of(svc, a, name="first")
        sizes = {int(p.stem): p.stat().st_size for p in packs_dir.glob("*.pack")}
        assert len(sizes) >= 2, sizes
        *filled, last = sorted(sizes)
        assert all(limit <= sizes[p] < limit + batch for p in filled), sizes
        assert sizes[last] <= limit + batch
        assert await read_all(svc, first.id) == big
        await snapshot_of(svc, b, name="second")  # into the last pack, or a new one
        holding_b = {int(r[0]) for r in svc.md.conn.execute(
            "SELECT DISTINCT c.pack FROM chunks c JOIN snapshot_chunks m ON m.chunk = c.id "
            "JOIN snapshots s ON s.rowid = m.snap WHERE s.name = 'second'")}
        await svc.delete_snapshot(ZONE, first.id)
        await deletes_done(svc)
    assert {int(p.stem) for p in packs_dir.glob("*.pack")} >= set(filled)  # not yet
    async with open_local_service(store_dir) as svc:  # the store to itself: recovery
        left = {int(p.stem) for p in packs_dir.glob("*.pack")}
        assert left == holding_b
        assert set(svc.index.packs()) == holding_b
        second = (await svc.list_snapshots(ZONE)).items
        assert [s.name for s in second] == ["second"]
        assert await read_all(svc, second[0].id) == small


async def test_a_pack_number_is_never_given_twice(service: LocalService) -> None:
    """The highest pack's row dropped (its pack emptied and removed), the next pack
    still gets a new number: another process may hold a descriptor of the removed
    file and would read the new pack's chunks from it. Fails with SQLite's rowid
    reuse (max(id) + 1)."""
    first = service.index.new_pack()
    service.index.drop_pack(first)
    assert service.index.new_pack() > first


async def test_a_pack_that_cannot_be_written_fails_the_capture_as_a_store_write(
        tmp_path: Path) -> None:
    """Packs made immutable (chattr +i) under a running service: the capture's
    append failed, then cutting the pack's tail failed too, and that second
    OSError replaced the first: "reading the source failed: Operation not
    permitted", though the volume was readable. The capture's own error stays."""
    store = tmp_path / "store"
    vol = tmp_path / "v.raw"
    vol.write_bytes(random_bytes(4 * MiB, seed=1))
    async with open_local_service(store) as svc:
        first = await snapshot_of(svc, vol, "s1")
        packs = sorted((store / "packs").glob("*.pack"))
        vol.write_bytes(random_bytes(4 * MiB, seed=2))
        subprocess.run(["chattr", "+i", *map(str, packs)], check=True)
        try:
            vols = await svc.list_all_volumes()
            snap = await svc.create_snapshot(ZONE, name="s2", volume_id=vols[0].id)
            failed = await wait_state(svc, snap.id)
        finally:
            subprocess.run(["chattr", "-i", *map(str, packs)], check=True)
        assert failed.state == "error"
        assert "writing to the store failed" in (failed.error_reason or ""), failed
        assert "Operation not permitted" in (failed.error_reason or "")
        assert await read_all(svc, first.id) == random_bytes(4 * MiB, seed=1)
        again = await snapshot_of(svc, vol, "s3")
        assert await read_all(svc, again.id) == vol.read_bytes()
    res = snapfs_cli("fsck", store=store)
    assert res.returncode == 0, res.stdout + res.stderr
