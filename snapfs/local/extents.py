"""Allocation and changed blocks of stored snapshots, from their chunk maps alone
(no data is read): what ``image.raw``'s st_blocks, ``map.json`` and
``changes/<other>`` show (the EBS direct APIs' ListSnapshotBlocks and
ListChangedBlocks, at chunk granularity).

A map entry is a stored chunk (content-addressed: equal chunk IDs = equal
bytes); an absent entry is a hole that reads as zeros. Queries run on a worker
connection in a thread: a million-entry map takes a good part of a second.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Callable, Iterable, TypeVar

import trio

from ..errors import InvalidArgument, NotFound, PreconditionFailed
from ..extentmap import Extent
from ..model import Snapshot, check_zone
from .chunks import CHUNK_SIZE
from .metadata import Metadata

T = TypeVar("T")



def stored_bytes(conn: sqlite3.Connection, snap: int) -> int:
    """Bytes the snapshot's map points at (each chunk counted at its stored length)."""
    row = conn.execute("SELECT coalesce(sum(c.length), 0) FROM snapshot_chunks m "
                       "JOIN chunks c ON c.id = m.chunk WHERE m.snap = ?", (snap,)).fetchone()
    return int(row[0])


def runs(indices: Iterable[int], size: int) -> list[tuple[int, int]]:
    """Sorted chunk indices -> (start, length) byte ranges of consecutive runs,
    the last cut at the image's end."""
    out: list[tuple[int, int]] = []
    first = prev = -2
    for idx in indices:
        if idx != prev + 1:
            if prev >= 0:
                out.append((first, prev))
            first = idx
        prev = idx
    if prev >= 0:
        out.append((first, prev))
    return [(a * CHUNK_SIZE, min((b + 1) * CHUNK_SIZE, size) - a * CHUNK_SIZE)
            for a, b in out]


def allocation(conn: sqlite3.Connection, snap: int, size: int) -> list[Extent]:
    """The whole image as alternating data and zero extents (``qemu-img map``'s
    coverage: every byte in exactly one extent)."""
    data = runs((r[0] for r in conn.execute(
        "SELECT idx FROM snapshot_chunks WHERE snap = ? ORDER BY idx", (snap,))), size)
    return cover(data, size)


def cover(data: list[tuple[int, int]], size: int) -> list[Extent]:
    """Data ranges, with the zero ranges between them, from 0 to ``size``."""
    out: list[Extent] = []
    pos = 0
    for start, length in data:
        if start > pos:
            out.append((pos, start - pos, False))
        out.append((start, length, True))
        pos = start + length
    if pos < size:
        out.append((pos, size - pos, False))
    return out


#: Map entries compared per step.
WINDOW = 1 << 14

_WINDOW_MAP = ("SELECT group_concat(idx || ':' || chunk, ' ') FROM snapshot_chunks "
               "WHERE snap = ? AND idx >= ? AND idx < ?")
_WINDOW_DIFF = (
    "SELECT a.idx, 1 FROM snapshot_chunks a LEFT JOIN snapshot_chunks b "
    "ON b.snap = :o AND b.idx = a.idx WHERE a.snap = :s AND a.idx >= :lo AND a.idx < :hi "
    "AND (b.chunk IS NULL OR b.chunk != a.chunk) "
    "UNION ALL "
    "SELECT b.idx, 0 FROM snapshot_chunks b WHERE b.snap = :o AND b.idx >= :lo "
    "AND b.idx < :hi AND NOT EXISTS "
    "(SELECT 1 FROM snapshot_chunks a WHERE a.snap = :s AND a.idx = b.idx)")


def changed(conn: sqlite3.Connection, snap: int, other: int, size: int) -> list[Extent]:
    """The extents of ``snap`` whose chunk differs from ``other``'s at the same
    index (a chunk stored in one and a hole in the other, or different chunks),
    split by whether ``snap`` has data there (False: write zeros).

    Both maps are read a window at a time, each as one string of its "idx:chunk"
    entries that SQLite builds on a sequential scan: equal windows (most, between
    two snapshots of one volume) compare as strings, without an index descent or
    a Python object per entry; only windows that differ are joined entry by entry."""
    chunks = (size + CHUNK_SIZE - 1) // CHUNK_SIZE
    differ: list[tuple[int, int]] = []
    for lo in range(0, chunks, WINDOW):
        hi = lo + WINDOW
        mine = conn.execute(_WINDOW_MAP, (snap, lo, hi)).fetchone()[0]
        if mine == conn.execute(_WINDOW_MAP, (other, lo, hi)).fetchone()[0]:
            continue
        differ += conn.execute(_WINDOW_DIFF, {"s": snap, "o": other, "lo": lo, "hi": hi})
    differ.sort()
    out: list[Extent] = []
    group: list[int] = []
    kind = True
    for idx, is_data in differ:
        if group and (is_data != kind or idx != group[-1] + 1):
            out += [(s, n, kind) for s, n in runs(group, size)]
            group = []
        kind = bool(is_data)
        group.append(idx)
    out += [(s, n, kind) for s, n in runs(group, size)]
    return out


# --- the queries as the local service answers them ---------------------------------

#: States whose chunk map is complete (the data is captured or imported).
_COMPLETE = ("available", "exporting")


def complete_map(md: Metadata, zone: str, snapshot_id: str) -> tuple[Snapshot, int]:
    """The snapshot and its map key, once its map is whole: not while it is being
    captured or imported, nor while a clone still holds bytes its map lacks."""
    snap = md.snapshot(check_zone(zone), snapshot_id)
    if snap.state not in _COMPLETE:
        raise PreconditionFailed(f"snapshot {snap.id} is {snap.state}: its chunk map is not "
                                 "complete yet")
    if md.shadow_of(snapshot_id) is not None:
        raise PreconditionFailed(f"snapshot {snap.id}: its chunks are still being stored; "
                                 "its chunk map is not complete yet")
    return snap, md.snap_key(snapshot_id)


async def on_worker(md: Metadata, fn: Callable[..., T], *args: Any) -> T:
    """``fn(conn, *args)`` on a connection of its own in a worker thread."""
    def run() -> T:
        conn = md.worker_connection()
        try:
            return fn(conn, *args)
        finally:
            conn.close()
    return await trio.to_thread.run_sync(run)


async def snapshot_stored_bytes(md: Metadata, zone: str, snapshot_id: str) -> int | None:
    try:
        _, key = complete_map(md, zone, snapshot_id)
    except PreconditionFailed:
        return None
    return await on_worker(md, stored_bytes, key)


async def snapshot_allocation(md: Metadata, zone: str, snapshot_id: str) -> list[Extent]:
    snap, key = complete_map(md, zone, snapshot_id)
    return await on_worker(md, allocation, key, snap.size)


async def snapshot_changes(md: Metadata, zone: str, snapshot_id: str, other_id: str
                           ) -> list[Extent]:
    snap, key = complete_map(md, zone, snapshot_id)
    try:
        other, other_key = complete_map(md, zone, other_id)
    except NotFound:
        raise NotFound("snapshot", other_id) from None
    vol = snap.base_volume.id if snap.base_volume else None
    other_vol = other.base_volume.id if other.base_volume else None
    if vol != other_vol or vol is None:
        raise InvalidArgument("changes", f"snapshot {other.id} is not of the same volume as "
                              f"snapshot {snap.id}: blocks compare only between snapshots "
                              "of one volume")
    if snap.size != other.size:
        raise InvalidArgument("changes", f"snapshot {other.id} has size {other.size}, "
                              f"snapshot {snap.id} {snap.size}: the volume was resized")
    return await on_worker(md, changed, key, other_key, snap.size)
