#!/usr/bin/env python3
"""Delete (and map reuse) benchmark: how long deleting a snapshot with a huge chunk map makes the
caller wait (an rmdir), how long until its space is free, and how long the work
holds the service's trio loop (every mount request waits while it is held).

A snapshot of a small volume gets N synthetic map entries (tiny chunks that are
never read: the rows of a 1 TiB snapshot without writing a TiB). A ticker task
sleeps 10 ms at a time while the snapshot is deleted and freed; its longest gap
is the loop's longest stall. For comparison, the same map released the old way --
one transaction on the trio thread (``ChunkIndex.release``, still what recovery
uses for an interrupted capture before anything is served) -- in the same run.
Also timed: a snapshot of the volume untouched since that capture began, which
copies the million-entry map instead of reading the volume (leases.py).

    .venv/bin/python scripts/bench/delete.py [--entries 1000000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable

import trio

from snapfs.local import LocalService, open_local_service

ZONE = "fr-par-1"


async def snapshot_with_map(svc: LocalService, vol: Path, name: str, entries: int) -> str:
    volumes = {v.path: v for v in await svc.list_all_volumes()}
    v = volumes.get(str(vol)) or await svc.add_volume("v", vol)
    snap = await svc.create_snapshot(ZONE, name=name, volume_id=v.id)
    while (await svc.get_snapshot(ZONE, snap.id)).state == "snapshotting":
        await trio.sleep(0.02)
    key, conn = svc.md.snap_key(snap.id), svc.md.conn
    first = conn.execute("SELECT coalesce(max(id), 0) FROM chunks").fetchone()[0] + 1
    base = conn.execute("SELECT coalesce(max(offset), 0) FROM chunks").fetchone()[0] + (1 << 20)
    with svc.md.transaction():
        conn.executemany("INSERT INTO chunks (hash, pack, offset, length, xxh) "
                         "VALUES (?, 1, ?, 4096, ?)",
                         ((os.urandom(32), base + (i << 12), os.urandom(16))
                          for i in range(entries)))
        conn.execute("INSERT INTO snapshot_chunks (snap, idx, chunk) "
                     "SELECT ?, id - ? + 1000, id FROM chunks WHERE id >= ?",
                     (key, first, first))
    # As a map committed long ago: not in the WAL, whose checkpoint would
    # otherwise land on whichever commit comes next.
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return snap.id


async def longest_stall(job: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    """(seconds the job took, longest gap of a 10 ms ticker meanwhile)."""
    gaps: list[float] = []
    done = False

    async def ticker() -> None:
        last = time.perf_counter()
        while not done:
            await trio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.sleep(0.05)
        t = time.perf_counter()
        await job()
        elapsed = time.perf_counter() - t
        done = True
    return elapsed, max(gaps)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="snapfs-delete-", dir=args.dir))
    try:
        vol = work / "v.raw"
        with open(vol, "wb") as f:
            f.write(os.urandom(1 << 20))
        async with open_local_service(work / "store") as svc:
            old = await snapshot_with_map(svc, vol, "one-transaction", args.entries)
            key = svc.md.snap_key(old)

            async def one_transaction() -> None:
                async with svc.index_lock:
                    svc.index.release(key)
            t1, s1 = await longest_stall(one_transaction)
            await svc.delete_snapshot(ZONE, old)  # the row and the queued extents

            new = await snapshot_with_map(svc, vol, "in-steps", args.entries)

            # The volume is untouched since that capture began (its read lease
            # holds): the next snapshot copies the map instead of reading.
            copy_id = ""

            async def reuse() -> None:
                nonlocal copy_id
                v = {v.path: v for v in await svc.list_all_volumes()}[str(vol)]
                snap = await svc.create_snapshot(ZONE, name="reused", volume_id=v.id)
                while (await svc.get_snapshot(ZONE, snap.id)).state == "snapshotting":
                    await trio.sleep(0.01)
                copy_id = snap.id
            t3, s3 = await longest_stall(reuse)
            copied = svc.md.conn.execute("SELECT count(*) FROM snapshot_chunks WHERE snap = ?",
                                         (svc.md.snap_key(copy_id),)).fetchone()[0]
            await svc.delete_snapshot(ZONE, copy_id)
            while svc.freeing():
                await trio.sleep(0.01)

            returned = 0.0

            async def delete() -> None:
                nonlocal returned
                t = time.perf_counter()
                await svc.delete_snapshot(ZONE, new)
                returned = time.perf_counter() - t
                while svc.freeing():  # the background half: map, then space
                    await trio.sleep(0.01)
            t2, s2 = await longest_stall(delete)
            left = svc.md.conn.execute("SELECT count(*) FROM snapshot_chunks").fetchone()[0]
        print(f"map of {args.entries:,} entries")
        print(f"one transaction on the trio thread (release only): {t1:6.2f} s, "
              f"loop stalled up to {s1 * 1000:7.0f} ms")
        print(f"delete_snapshot returned after {returned * 1000:.0f} ms; "
              f"map released in steps in a worker after {t2:6.2f} s, "
              f"loop stalled up to {s2 * 1000:7.0f} ms")
        print(f"snapshot of the untouched volume (map of {copied:,} entries copied): "
              f"{t3:6.2f} s, loop stalled up to {s3 * 1000:7.0f} ms")
        if left:
            raise SystemExit(f"{left} map entries left after the delete")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(trio.run(main))
