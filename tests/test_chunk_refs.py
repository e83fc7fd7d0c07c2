"""Chunk reference counts (schema v11, chunkindex.py): kept by triggers whatever
writes the maps, so that a snapshot that copies its volume's previous map costs
the same however many snapshots share its chunks; fsck recounts them and
``fsck --repair`` sets them right."""

from __future__ import annotations

import sqlite3
import statistics
from pathlib import Path

import trio

from fixtures_store import (MiB, ZONE, deletes_done, proc_io, read_all, snapfs_cli,
                            snapshot_of, write_volume)
from snapfs.local import open_local_service
from snapfs.local.chunkindex import wrong_refs

CHUNKS = 64


def distinct_chunks(path: Path) -> Path:
    """A volume of CHUNKS different 1 MiB chunks (cheap to write and to compress)."""
    return write_volume(path, CHUNKS * MiB,
                        [(i * MiB, bytes([i % 251 + 1]) * 4096 * 256) for i in range(CHUNKS)])


async def test_a_map_copy_costs_the_same_at_the_hundredth_snapshot(tmp_path: Path) -> None:
    """Each snapshot of an unchanged volume copies the previous map (its lease
    held). With an index by chunk, the copy wrote an entry beside every other
    snapshot's entry of each chunk: its writes grew with the snapshot count."""
    vol = distinct_chunks(tmp_path / "v.raw")
    async with open_local_service(tmp_path / "store") as svc:
        await snapshot_of(svc, vol, "s0")

        async def written_by_one(name: str) -> int:
            before = proc_io("wchar")
            await snapshot_of(svc, vol, name)
            return proc_io("wchar") - before
        # Medians: a checkpoint lands in one of them now and then. Measured: ~50 KB
        # each, early and late; with the index, 45 KB early and 234-460 KB late.
        early = [await written_by_one(f"e{i}") for i in range(5)]
        for i in range(120):
            await snapshot_of(svc, vol, f"m{i}")
        late = [await written_by_one(f"l{i}") for i in range(5)]
        assert statistics.median(late) < 2 * statistics.median(early), (early, late)
        refs = svc.md.conn.execute("SELECT min(refs), max(refs) FROM chunks").fetchone()
        assert tuple(refs) == (131, 131)
        assert wrong_refs(svc.md.conn) == []


def test_fsck_finds_and_repair_recounts_a_wrong_reference_count(tmp_path: Path) -> None:
    """One reference too few: a delete would free a chunk another snapshot still
    maps. fsck says so (changing nothing), repair counts again, and a delete of
    one of the two snapshots then leaves the other whole."""
    vol = distinct_chunks(tmp_path / "v.raw")
    store = tmp_path / "store"

    async def make() -> tuple[str, str]:
        async with open_local_service(store) as svc:
            return (await snapshot_of(svc, vol, "a")).id, (await snapshot_of(svc, vol, "b")).id
    a, b = trio.run(make)
    with sqlite3.connect(store / "metadata.db") as conn:
        cid = conn.execute("SELECT min(id) FROM chunks").fetchone()[0]
        conn.execute("UPDATE chunks SET refs = refs - 1 WHERE id = ?", (cid,))
    conn.close()
    db_before = (store / "metadata.db").read_bytes()
    res = snapfs_cli("fsck", store=store)
    assert res.returncode == 1
    assert f"chunk {cid} counts 1 reference(s), the maps hold 2" in res.stdout, res.stdout
    assert (store / "metadata.db").read_bytes() == db_before
    res = snapfs_cli("fsck", "--repair", store=store)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "repair: will count the references of 1 chunk(s) again" in res.stdout
    assert snapfs_cli("fsck", store=store).returncode == 0

    async def delete_one() -> None:
        async with open_local_service(store) as svc:
            await svc.delete_snapshot(ZONE, a)
            await deletes_done(svc)
            assert await read_all(svc, b) == vol.read_bytes()
            assert wrong_refs(svc.md.conn) == []
    trio.run(delete_one)
    assert snapfs_cli("fsck", store=store).returncode == 0
