"""Allocation and changed blocks of stored snapshots, from their chunk maps alone
(no data is read): what ``image.raw``'s st_blocks, ``map.json`` and
``changes/<other>`` show (the EBS direct APIs' ListSnapshotBlocks and
ListChangedBlocks, at chunk granularity).

A map entry is a stored chunk (content-addressed: equal chunk IDs = equal
bytes); an absent entry is a hole that reads as zeros. Queries run on a worker
connection in a thread, from the maps' window digests (mapdigest.py) and the
entries of the windows they do not settle.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Callable, Iterable, TypeVar

import trio

from ..errors import InvalidArgument, NotFound, PreconditionFailed
from ..extentmap import Extent
from ..model import Snapshot, check_zone
from . import mapdigest
from .chunks import CHUNK_SIZE
from .metadata import Metadata

T = TypeVar("T")



def stored_bytes(conn: sqlite3.Connection, snap: int) -> int:
    """Bytes the snapshot's map points at (each chunk counted at its stored length)."""
    row = conn.execute("SELECT coalesce(sum(c.length), 0) FROM snapshot_chunks m "
                       "JOIN chunks c ON c.id = m.chunk WHERE m.snap = ?", (snap,)).fetchone()
    return int(row[0])


def index_runs(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted chunk indices -> (first, last) of their consecutive runs."""
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
    return out


def byte_ranges(pairs: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """(first, last) chunk index runs -> (start, length) byte ranges, the last cut
    at the image's end."""
    return [(a * CHUNK_SIZE, min((b + 1) * CHUNK_SIZE, size) - a * CHUNK_SIZE)
            for a, b in pairs]


def runs(indices: Iterable[int], size: int) -> list[tuple[int, int]]:
    """Sorted chunk indices -> (start, length) byte ranges of consecutive runs."""
    return byte_ranges(index_runs(indices), size)


def allocation(conn: sqlite3.Connection, snap: int, size: int) -> list[Extent]:
    """The whole image as alternating data and zero extents (``qemu-img map``'s
    coverage: every byte in exactly one extent). Windows wholly data or wholly
    holes are taken from the map's digest counts; only the others are read."""
    counts = mapdigest.ensure(conn, snap, size).counts
    win = mapdigest.WINDOW
    pairs: list[tuple[int, int]] = []
    w = 0
    while w < len(counts):
        end = w + 1
        if counts[w] == win:  # wholly data: one run, however many windows
            while end < len(counts) and counts[end] == win:
                end += 1
            found = [(w * win, end * win - 1)]
        elif counts[w]:  # partly: its entries (and those of partial windows after it)
            while end < len(counts) and counts[end] not in (0, win):
                end += 1
            found = index_runs(r[0] for r in conn.execute(
                "SELECT idx FROM snapshot_chunks WHERE snap = ? AND idx >= ? AND idx < ? "
                "ORDER BY idx", (snap, w * win, end * win)))
        else:
            found = []
        for a, b in found:
            if pairs and pairs[-1][1] + 1 == a:
                pairs[-1] = (pairs[-1][0], b)
            else:
                pairs.append((a, b))
        w = end
    return cover(byte_ranges(pairs, size), size)


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


_RANGE = "SELECT idx, chunk FROM snapshot_chunks WHERE snap = ? AND idx >= ? AND idx < ?"


def changed(conn: sqlite3.Connection, snap: int, other: int, size: int) -> list[Extent]:
    """The extents of ``snap`` whose chunk differs from ``other``'s at the same
    index (a chunk stored in one and a hole in the other, or different chunks),
    split by whether ``snap`` has data there (False: write zeros).

    Only the windows whose digests differ (mapdigest.py) are read, entry by entry;
    between two snapshots of one volume that is the part the volume's writes
    touched."""
    mine, theirs = mapdigest.ensure(conn, snap, size), mapdigest.ensure(conn, other, size)
    differ: list[tuple[int, bool]] = []
    for first, end in mapdigest.differing(mine, theirs):
        lo, hi = first * mapdigest.WINDOW, end * mapdigest.WINDOW
        a = dict(conn.execute(_RANGE, (snap, lo, hi)).fetchall())
        b = dict(conn.execute(_RANGE, (other, lo, hi)).fetchall())
        differ += ((idx, idx in a) for idx in sorted(a.keys() | b.keys())
                   if a.get(idx) != b.get(idx))
    out: list[Extent] = []
    group: list[int] = []
    kind = True
    for idx, is_data in differ:
        if group and (is_data != kind or idx != group[-1] + 1):
            out += [(s, n, kind) for s, n in runs(group, size)]
            group = []
        kind = is_data
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
