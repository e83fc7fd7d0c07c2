"""Per-window digests of a complete chunk map, so that ``changes/<other>`` skips
the windows two maps share without reading their entries, and ``map.json`` the
windows that are wholly data or wholly holes.

A window is WINDOW consecutive chunk indices (64 MiB of image); its digest is a
blake2b of the window's "idx:chunk" entries as SQLite concatenates them on a
scan of the map's primary key, and its count the number of entries. Equal
digests mean equal entries (equal chunk IDs are equal bytes); entries visited in
another order would only make equal windows look different, which costs a
closer look, never a wrong answer.

One row per snapshot (``map_digests``), written in one transaction once its map
is complete (capture, map reuse under a lease, import, the storing of a clone),
before the snapshot shows complete; maps never change after that. Releasing a
map deletes its row first (chunkindex._release_step), so a row never outlives
the map it describes; a snapshot without a row (made before the table, or a
crash between the two commits) gets one computed on first use. fsck recomputes
every row (verify).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from dataclasses import dataclass

from ..errors import SnapfsError
from .chunks import CHUNK_SIZE
from .metadata import Metadata

log = logging.getLogger(__name__)

#: Map entries per window (a count fits a byte).
WINDOW = 64
#: Bytes of one window's digest.
DIGEST = 16
#: Windows compared at once before looking at single ones.
_BLOCK = 256

_WINDOW_MAP = ("SELECT group_concat(idx || ':' || chunk, ' '), count(*) FROM snapshot_chunks "
               "WHERE snap = ? AND idx >= ? AND idx < ?")
#: The first mapped index at or after one (a seek on the primary key).
_NEXT_ENTRY = "SELECT min(idx) FROM snapshot_chunks WHERE snap = ? AND idx >= ?"
#: The digest of a window without entries (a hole).
_EMPTY = hashlib.blake2b(b"", digest_size=DIGEST).digest()


@dataclass(frozen=True)
class MapDigest:
    digests: bytes  # DIGEST bytes per window
    counts: bytes   # one byte per window: its entries

    @property
    def windows(self) -> int:
        return len(self.counts)


def windows_of(size: int) -> int:
    chunks = (size + CHUNK_SIZE - 1) // CHUNK_SIZE
    return (chunks + WINDOW - 1) // WINDOW


def compute(conn: sqlite3.Connection, snap: int, size: int) -> MapDigest:
    """The digest of map ``snap`` of an image of ``size`` bytes, one range scan
    per window that has entries (SQLite builds each window's string: no Python
    object per entry); a seek skips each run of empty windows, whose digest is a
    constant -- a query per window cost 10 s for a sparse 64 TiB map of a few
    entries (a million windows). About a second for a million entries."""
    total = windows_of(size)
    digests = bytearray()
    counts = bytearray()
    w = 0
    while w < total:
        text, n = conn.execute(_WINDOW_MAP, (snap, w * WINDOW, (w + 1) * WINDOW)).fetchone()
        if n:
            digests += hashlib.blake2b(text.encode(), digest_size=DIGEST).digest()
            counts.append(n)
            w += 1
            continue
        # An empty window: one seek finds where the run of empty ones ends.
        (nxt,) = conn.execute(_NEXT_ENTRY, (snap, w * WINDOW)).fetchone()
        skip = total - w if nxt is None else min(nxt // WINDOW, total) - w
        digests += _EMPTY * skip
        counts += bytes(skip)
        w += skip
    return MapDigest(bytes(digests), bytes(counts))


def load(conn: sqlite3.Connection, snap: int, size: int) -> MapDigest | None:
    row = conn.execute("SELECT window, digests, counts FROM map_digests WHERE snap = ?",
                       (snap,)).fetchone()
    if row is None or row[0] != WINDOW or len(row[2]) != windows_of(size):
        return None  # none yet, or of another window size: computed again
    return MapDigest(bytes(row[1]), bytes(row[2]))


def write(conn: sqlite3.Connection, snap: int, same_as: int | None = None
          ) -> MapDigest | None:
    """Compute and store the digest of map ``snap``, whose entries are all
    committed: on a connection of its own (a worker thread). The map is read
    outside the write transaction; the row is inserted only if the snapshot is
    not being deleted by then (a delete marks it before releasing its map, and
    the release deletes the row). None: the snapshot is gone. ``same_as``: a map
    this one is a whole copy of (a lease's reuse), whose stored digest is taken
    instead of reading the map again (300 reuses of a 128-chunk map read twice
    what one capture of the volume did)."""
    row = conn.execute("SELECT size FROM snapshots WHERE rowid = ? AND deleting = 0",
                       (snap,)).fetchone()
    if row is None:
        return None
    size = int(row[0])
    digest = load(conn, same_as, size) if same_as is not None else None
    digest = digest or compute(conn, snap, size)
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("SELECT 1 FROM snapshots WHERE rowid = ? AND deleting = 0",
                        (snap,)).fetchone() is None:
            return None
        conn.execute("INSERT OR REPLACE INTO map_digests (snap, window, digests, counts) "
                     "VALUES (?, ?, ?, ?)", (snap, WINDOW, digest.digests, digest.counts))
    finally:
        conn.execute("COMMIT")
    return digest


def write_completed(md: Metadata, snap: int, same_as: int | None = None) -> None:
    """``write`` on a connection of its own, for a worker thread, once a map's
    entries are all committed and before its snapshot shows complete. A failure
    costs only speed: the digest is then computed on first use."""
    conn = md.worker_connection()
    try:
        write(conn, snap, same_as)
    except (sqlite3.Error, SnapfsError) as exc:  # a full or failing disk too
        log.warning("map #%d: its window digests were not stored (%s); computed when "
                    "first needed", snap, exc)
    finally:
        conn.close()


def ensure(conn: sqlite3.Connection, snap: int, size: int) -> MapDigest:
    """The stored digest of a complete map, computed and stored if missing."""
    digest = load(conn, snap, size)
    if digest is None:
        log.info("map #%d has no window digests yet: computing them", snap)
        try:
            digest = write(conn, snap)
        except (sqlite3.Error, SnapfsError) as exc:  # a read-only store: used, not kept
            log.info("map #%d: its window digests are not stored (%s)", snap, exc)
        digest = digest or compute(conn, snap, size)
    return digest


def differing(a: MapDigest, b: MapDigest) -> list[tuple[int, int]]:
    """Runs [first, end) of windows whose digests differ (same window count)."""
    out: list[tuple[int, int]] = []
    step = _BLOCK * DIGEST
    for start in range(0, len(a.digests), step):
        if a.digests[start:start + step] == b.digests[start:start + step]:
            continue
        for pos in range(start, min(start + step, len(a.digests)), DIGEST):
            if a.digests[pos:pos + DIGEST] != b.digests[pos:pos + DIGEST]:
                w = pos // DIGEST
                if out and out[-1][1] == w:
                    out[-1] = (out[-1][0], w + 1)
                else:
                    out.append((w, w + 1))
    return out


def wrong(conn: sqlite3.Connection) -> list[tuple[int, str]]:
    """(map key, what is wrong) of every stored digest that does not match its map
    or has no snapshot: what fsck reports and ``fsck --repair`` drops (a complete
    map without a digest gets a new one on first use)."""
    out: list[tuple[int, str]] = []
    rows = conn.execute(
        "SELECT d.snap, d.window, d.digests, d.counts, s.id, s.size, s.deleting "
        "FROM map_digests d LEFT JOIN snapshots s ON s.rowid = d.snap").fetchall()
    for snap, window, digests, counts, sid, size, deleting in rows:
        if sid is None:
            out.append((snap, f"window digests of a deleted snapshot #{snap}"))
        elif deleting or window != WINDOW:
            continue  # being released (maybe beside fsck) / recomputed when needed
        elif compute(conn, snap, size) != MapDigest(bytes(digests), bytes(counts)):
            out.append((snap, f"snapshot {sid}: its window digests do not match its chunk "
                              "map (changes/ and map.json would be wrong)"))
    return out


def drop(conn: sqlite3.Connection, snap: int) -> None:
    conn.execute("DELETE FROM map_digests WHERE snap = ?", (snap,))
