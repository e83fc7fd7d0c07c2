"""The chunk index: which chunks exist, where they are, who references them.

Most of it is SQL on the metadata connection, run on the trio thread in short
transactions; releasing a whole map and punching its space run in a worker
thread on a connection of their own, in steps (a million entries would otherwise
hold the mount for seconds). The ordering rules that make crashes harmless: pack
bytes are fsynced *before* ``commit_batch`` commits rows pointing at them; a
snapshot is marked failed *before* its map is released; rows are deleted (and
their extents queued in ``free_extents``) *before* space is punched.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from ..errors import CorruptData, NotFound
from ..model import now
from .metadata import Metadata

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Location:
    pack: int
    offset: int
    length: int
    hash: bytes  # blake3 of the raw bytes
    xxh: bytes | None  # xxh3 of the stored bytes
    #: None: stored raw (``length`` bytes); else a zstd frame of ``length`` bytes
    #: holding this many raw bytes (compression.py).
    raw_length: int | None = None

    @property
    def size(self) -> int:
        """The chunk's raw length (what a reader gets)."""
        return self.length if self.raw_length is None else self.raw_length


#: Map entries released per transaction by release_in_steps (~0.1 s each).
RELEASE_STEP = 20_000


def _release_step(conn: sqlite3.Connection, snap: int, limit: int | None) -> bool:
    """Drop up to ``limit`` (None: all) of the snapshot's map entries, lowest
    indices first; chunks nobody references any more are deleted and their extents
    queued for punching, in the caller's transaction. True if entries remain."""
    # The map's window digests go with its first step: never older than the map.
    conn.execute("DELETE FROM map_digests WHERE snap = ?", (snap,))
    last = None
    if limit is not None:
        row = conn.execute("SELECT idx FROM snapshot_chunks WHERE snap = ? ORDER BY idx "
                           "LIMIT 1 OFFSET ?", (snap, limit - 1)).fetchone()
        last = None if row is None else int(row[0])
    cond, args = ("snap = ?", (snap,)) if last is None else ("snap = ? AND idx <= ?",
                                                                (snap, last))
    conn.execute("DROP TABLE IF EXISTS temp.cand")
    conn.execute(f"CREATE TEMP TABLE cand AS SELECT DISTINCT chunk AS id FROM snapshot_chunks "
                 f"WHERE {cond}", args)
    conn.execute(f"DELETE FROM snapshot_chunks WHERE {cond}", args)
    orphan = "SELECT c.id FROM chunks c JOIN cand USING (id) WHERE c.refs <= 0"
    conn.execute("INSERT INTO free_extents (pack, offset, length) "
                 f"SELECT pack, offset, length FROM chunks WHERE id IN ({orphan})")
    conn.execute(f"DELETE FROM chunks WHERE id IN ({orphan})")
    conn.execute("DROP TABLE temp.cand")
    if last is None:
        return False
    return conn.execute("SELECT 1 FROM snapshot_chunks WHERE snap = ? LIMIT 1",
                        (snap,)).fetchone() is not None


def wrong_refs(conn: sqlite3.Connection) -> list[tuple[int, int, int]]:
    """(chunk, its refs, the map entries naming it) of every chunk that no entry
    names or whose count is off. One pass over the maps (grouped in a temporary
    b-tree: there is no index by chunk), in one statement: one snapshot of a store
    that others may be writing."""
    return [(int(c), int(r), int(n)) for c, r, n in conn.execute(
        "SELECT c.id, c.refs, coalesce(m.n, 0) FROM chunks c LEFT JOIN "
        "(SELECT chunk, count(*) AS n FROM snapshot_chunks GROUP BY chunk) m "
        "ON m.chunk = c.id WHERE m.n IS NULL OR c.refs != m.n")]


def set_refs(conn: sqlite3.Connection, counts: list[tuple[int, int]]) -> None:
    """Set chunks' refs to the counts (chunk, entries) that wrong_refs found: for
    fsck --repair, which holds the store to itself, so nothing changed since."""
    with _immediate(conn):
        conn.executemany("UPDATE chunks SET refs = ? WHERE id = ?",
                         [(n, c) for c, n in counts])


def _check_live(conn: sqlite3.Connection, snap: int) -> None:
    """In a write transaction: snapshot ``snap`` is not being deleted (a delete
    marks it before releasing its map, so a write checked here is released too)."""
    if conn.execute("SELECT 1 FROM snapshots WHERE rowid = ? AND deleting = 0",
                    (snap,)).fetchone() is None:
        raise NotFound("snapshot", f"#{snap}")


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction on a worker connection: committed when the block
    ends (a return included), rolled back if it raises: a step is all or nothing."""
    conn.execute("BEGIN IMMEDIATE")
    committed = False
    try:
        yield
        committed = True
    finally:
        conn.execute("COMMIT" if committed else "ROLLBACK")


class ChunkIndex:
    def __init__(self, md: Metadata) -> None:
        self.md = md
        self.conn: sqlite3.Connection = md.conn

    @contextmanager
    def _worker(self) -> Iterator[sqlite3.Connection]:
        """The long jobs' own connection (see Metadata.worker_connection)."""
        conn = self.md.worker_connection()
        try:
            yield conn
        finally:
            conn.close()

    def known(self, hashes: list[bytes], damaged_too: bool = False) -> dict[bytes, int]:
        """chunk id by hash, for the hashes already stored -- but those whose
        bytes are known bad (damaged_chunks, schema v12): a capture stores
        their content anew instead of reusing them (commit_batch heals them)."""
        skip = "" if damaged_too else \
            " AND NOT EXISTS (SELECT 1 FROM damaged_chunks d WHERE d.chunk = c.id)"
        return self._ids_by_hash(hashes, skip)

    def _ids_by_hash(self, hashes: list[bytes], condition: str) -> dict[bytes, int]:
        """chunk id by hash of the stored chunks (``c``) among ``hashes`` that meet
        ``condition`` (SQL, "" or " AND ..."), 500 hashes a query."""
        found: dict[bytes, int] = {}
        for i in range(0, len(hashes), 500):
            part = hashes[i:i + 500]
            marks = ",".join("?" * len(part))
            for h, cid in self.conn.execute(
                    f"SELECT hash, id FROM chunks c WHERE hash IN ({marks}){condition}", part):
                found[bytes(h)] = int(cid)
        return found

    def mark_damaged(self, chunk_ids: list[int]) -> None:
        """fsck --repair: these chunks' bytes are bad (see known())."""
        with self.md.transaction():
            self.conn.executemany(
                "INSERT OR IGNORE INTO damaged_chunks (chunk, found) VALUES (?, ?)",
                [(cid, now()) for cid in chunk_ids])

    def mark_damaged_at(self, loc: Location) -> int | None:
        """A read found this chunk's stored bytes bad: mark it damaged, if the
        chunk's row still names that copy (a heal may have repointed it since the
        reader looked it up: the new copy is not the bad one). Its id if newly
        marked."""
        with self.md.transaction():
            row = self.conn.execute(
                "SELECT id FROM chunks WHERE hash = ? AND pack = ? AND offset = ?",
                (loc.hash, loc.pack, loc.offset)).fetchone()
            if row is None:
                return None
            cur = self.conn.execute(
                "INSERT OR IGNORE INTO damaged_chunks (chunk, found) VALUES (?, ?)",
                (int(row[0]), now()))
            return int(row[0]) if cur.rowcount else None

    def damaged(self) -> list[int]:
        return [int(r[0]) for r in self.conn.execute(
            "SELECT chunk FROM damaged_chunks ORDER BY chunk")]

    def new_pack(self, floor: int = 0) -> int:
        """A new pack's id: above every row, above ``floor`` (PackFiles.floor) and
        above every id ever given (a high-water mark in meta). A pack number is
        never given twice: another process on the store may still hold a
        descriptor of a removed pack of that number, and would read the new
        pack's chunks from the old file (seen: a hash mismatch under the stress
        test), as SQLite would reuse a deleted highest rowid."""
        with self.md.transaction():
            row = self.conn.execute(
                "SELECT max(coalesce((SELECT max(id) FROM packs), 0), "
                "coalesce((SELECT CAST(value AS INTEGER) FROM meta "
                "WHERE key = 'last_pack_id'), 0), ?) + 1", (floor,)).fetchone()
            pack = int(row[0])
            self.conn.execute("INSERT INTO packs (id, committed) VALUES (?, 0)", (pack,))
            self.conn.execute("INSERT OR REPLACE INTO meta (key, value) "
                              "VALUES ('last_pack_id', ?)", (str(pack),))
        return pack

    def commit_batch(self, snap: int, pack: int | None, pack_end: int,
                     new: list[tuple[bytes, int, int, bytes, int | None]],
                     refs: list[tuple[int, bytes]],
                     progress: tuple[str, int] | None) -> None:
        """One atomic step of a capture: new chunks (hash, offset, stored length, xxh,
        raw length or None when stored raw) already
        fsynced in ``pack`` up to ``pack_end``, and the snapshot's map entries
        (idx, hash). The caller guarantees (by holding the index lock since
        ``known``) that every hash in refs is either stored or in ``new``.
        Raises NotFound, committing nothing, once the snapshot is being deleted
        (by another process: a delete here cancels the capture first), so that
        no map row outlives its snapshot's delete."""
        with self.md.transaction():
            _check_live(self.conn, snap)
            if new:
                new = self._heal(new, pack)
                self.conn.executemany(
                    "INSERT INTO chunks (hash, pack, offset, length, xxh, raw_length) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [(h, pack, off, ln, x, raw) for h, off, ln, x, raw in new])
            if pack is not None:
                self.conn.execute("UPDATE packs SET committed = max(committed, ?) WHERE id = ?",
                                  (pack_end, pack))
            if refs:
                ids = self.known(list({h for _, h in refs}), damaged_too=True)
                if len(ids) != len({h for _, h in refs}):
                    # Only another process on the same store can do this (deletes here
                    # wait for the index lock): fail this capture, not the store.
                    raise CorruptData("a chunk this capture reuses was deleted meanwhile by "
                                      "another process on the same store; take it again")
                self.conn.executemany(
                    # An upsert, not OR REPLACE: its delete would not fire the
                    # trigger that counts references (schema v11).
                    "INSERT INTO snapshot_chunks (snap, idx, chunk) VALUES (?, ?, ?) "
                    "ON CONFLICT (snap, idx) DO UPDATE SET chunk = excluded.chunk",
                    [(snap, idx, ids[h]) for idx, h in refs])
            if progress is not None:
                self.conn.execute("UPDATE snapshots SET progress = ? WHERE id = ?",
                                  (progress[1], progress[0]))

    def _heal(self, new: list[tuple[bytes, int, int, bytes, int | None]], pack: int | None
              ) -> list[tuple[bytes, int, int, bytes, int | None]]:
        """In commit_batch's transaction: of the chunks about to be stored, those
        whose hash a damaged chunk has (known() skipped it) become that chunk's
        new copy -- its row, id kept, now points at them, so every map naming it
        reads the good bytes -- and the bad copy's extent is queued to be punched.
        Returns the rest, to be inserted."""
        damaged = self._ids_by_hash(
            [h for h, *_ in new],
            " AND EXISTS (SELECT 1 FROM damaged_chunks d WHERE d.chunk = c.id)")
        if not damaged:
            return new
        for h, off, ln, x, raw in new:
            cid = damaged.get(h)
            if cid is None:
                continue
            self.conn.execute("INSERT INTO free_extents (pack, offset, length) "
                              "SELECT pack, offset, length FROM chunks WHERE id = ?", (cid,))
            self.conn.execute("UPDATE chunks SET pack = ?, offset = ?, length = ?, xxh = ?, "
                              "raw_length = ? WHERE id = ?", (pack, off, ln, x, raw, cid))
            self.conn.execute("DELETE FROM damaged_chunks WHERE chunk = ?", (cid,))
            log.info("chunk %d: its damaged copy replaced by a new one in pack %s at %d",
                     cid, pack, off)
        return [row for row in new if row[0] not in damaged]

    def next_mapped(self, snap: int, first: int) -> int | None:
        """The first chunk index >= ``first`` the map has (None: only holes
        follow). One primary-key seek, however many holes lie before it."""
        row = self.conn.execute(
            "SELECT idx FROM snapshot_chunks WHERE snap = ? AND idx >= ? ORDER BY idx "
            "LIMIT 1", (snap, first)).fetchone()
        return None if row is None else int(row[0])

    def next_unmapped(self, snap: int, first: int) -> int:
        """The first chunk index >= ``first`` the map lacks (a hole, or the end):
        on the worker connection, for a worker thread.

        Indices are unique and ordered, so ``first..first+n`` are all mapped iff
        the n-th row from ``first`` is ``first+n``: galloping with OFFSET probes
        (then halving back) finds the run's end in 2 log2(run) queries whose
        steps SQLite takes in C with the GIL released -- ~3 index steps per
        entry of the run, a million-entry run in ~0.1 s, not ~0.4 s of rows
        compared in Python."""
        with self._worker() as conn:
            def mapped_through(start: int, n: int) -> bool:
                row = conn.execute(
                    "SELECT idx FROM snapshot_chunks WHERE snap = ? AND idx >= ? "
                    "ORDER BY idx LIMIT 1 OFFSET ?", (snap, start, n)).fetchone()
                return row is not None and row[0] == start + n

            if not mapped_through(first, 0):
                return first
            # first..pos mapped; then the run ends in (pos, pos + step].
            pos, step = first, 1
            while mapped_through(pos, step):
                pos, step = pos + step, step * 2
            while step > 1:
                step //= 2
                if mapped_through(pos, step):
                    pos += step
            return pos + 1

    def mapped_count(self, snap: int) -> int:
        """How many chunks the snapshot's map has (its allocation, in chunks). A
        scan of the map: on the worker connection, for a worker thread."""
        with self._worker() as conn:
            return int(conn.execute("SELECT count(*) FROM snapshot_chunks WHERE snap = ?",
                                    (snap,)).fetchone()[0])

    def locate(self, snap: int, first: int, last: int) -> dict[int, Location]:
        """Map entries for chunk indices first..last (inclusive); absent = hole."""
        rows = self.conn.execute(
            "SELECT m.idx, c.pack, c.offset, c.length, c.hash, c.xxh, c.raw_length "
            "FROM snapshot_chunks m "
            "JOIN chunks c ON c.id = m.chunk WHERE m.snap = ? AND m.idx BETWEEN ? AND ?",
            (snap, first, last))
        return {r[0]: Location(r[1], r[2], r[3], bytes(r[4]), r[5] and bytes(r[5]), r[6])
                for r in rows}

    def release(self, snap: int) -> None:
        """Drop a snapshot's map at once (recovery, before anything is served);
        see release_in_steps for a live store."""
        with self.md.transaction():
            _release_step(self.conn, snap, None)

    def release_in_steps(self, snap: int, then_delete: str | None = None,
                         stop: threading.Event | None = None) -> None:
        """Drop a snapshot's map in transactions of RELEASE_STEP entries, on a
        connection of its own: for a worker thread (a million-chunk map took 7.5 s
        in one transaction, measured, all of it blocking the mount). The caller
        first marks the snapshot failed, so that a map left half released by a
        crash reads as an error, never as holes; ``then_delete`` (a snapshot id)
        is deleted with the last step. ``stop`` set ends it between two steps
        (a service closing: the next open resumes it)."""
        with self._worker() as conn:
            while stop is None or not stop.is_set():
                with _immediate(conn):
                    more = _release_step(conn, snap, RELEASE_STEP)
                    if not more and then_delete is not None:
                        conn.execute("DELETE FROM snapshots WHERE id = ?", (then_delete,))
                if not more:
                    return

    def copy_map_in_steps(self, base: int, snap: int, snapshot_id: str,
                          ranges: list[tuple[int, int]] | None = None) -> bool:
        """Give snapshot ``snap`` the map of snapshot ``base`` (same bytes: see
        leases.py) -- or only its entries in the chunk index ``ranges`` (first, last),
        shown unchanged by shadows.py, the capture then reading the rest --,
        RELEASE_STEP entries per transaction on a connection of its own, with the
        progress (whole copies only). False, leaving a partial copy for the caller to
        release, if ``base`` stops being available meanwhile (deleted by another
        process: in this one, deletes wait for the index lock the caller holds) or
        if it names a damaged chunk (the capture reads the volume, which heals it)."""
        with self._worker() as conn:
            if conn.execute("SELECT 1 FROM damaged_chunks d JOIN snapshot_chunks m ON "
                            "m.chunk = d.chunk AND m.snap = ? LIMIT 1", (base,)).fetchone():
                log.info("snapshot #%d's map names a damaged chunk: not reused", base)
                return False
            within = ""
            if ranges is not None:
                # The ranges as a table: a capture of a big, scattered change has
                # many, and each map entry finds its range in one index probe.
                conn.execute("CREATE TEMP TABLE IF NOT EXISTS keep "
                             "(first INTEGER PRIMARY KEY, last INTEGER NOT NULL)")
                conn.execute("DELETE FROM temp.keep")
                conn.executemany("INSERT INTO temp.keep VALUES (?, ?)", ranges)
                within = (" AND (SELECT last FROM temp.keep WHERE first <= idx "
                          "ORDER BY first DESC LIMIT 1) >= idx")
            total = 0 if ranges is not None else conn.execute(
                "SELECT count(*) FROM snapshot_chunks WHERE snap = ?", (base,)).fetchone()[0]
            last, done = -1, 0
            while True:
                with _immediate(conn):
                    row = conn.execute("SELECT state FROM snapshots WHERE rowid = ? AND "
                                       "deleting = 0", (base,)).fetchone()
                    if row is None or row[0] not in ("available", "exporting"):
                        return False  # before this step wrote anything
                    _check_live(conn, snap)
                    n = conn.execute(
                        "INSERT INTO snapshot_chunks (snap, idx, chunk) SELECT ?, idx, chunk "
                        f"FROM snapshot_chunks WHERE snap = ? AND idx > ?{within} "
                        "ORDER BY idx LIMIT ?", (snap, base, last, RELEASE_STEP)).rowcount
                    done += n
                    if n:
                        last = conn.execute("SELECT max(idx) FROM snapshot_chunks WHERE snap = ?",
                                            (snap,)).fetchone()[0]
                    if ranges is None:
                        conn.execute("UPDATE snapshots SET progress = ? WHERE id = ?",
                                     (min(99, done * 100 // max(total, 1)), snapshot_id))
                if n < RELEASE_STEP:
                    return True

    def orphan_maps(self) -> list[tuple[int, int]]:
        """(map key, entries) of map rows whose snapshot row is gone. One index
        probe per mapped snapshot, not a scan of every map row."""
        found: list[tuple[int, int]] = []
        key = -1
        while True:
            row = self.conn.execute("SELECT min(snap) FROM snapshot_chunks WHERE snap > ?",
                                    (key,)).fetchone()
            if row[0] is None:
                return found
            key = int(row[0])
            if self.conn.execute("SELECT 1 FROM snapshots WHERE rowid = ?",
                                 (key,)).fetchone() is None:
                n = self.conn.execute("SELECT count(*) FROM snapshot_chunks WHERE snap = ?",
                                      (key,)).fetchone()[0]
                found.append((key, int(n)))

    def free_extents(self) -> list[tuple[int, int, int, int]]:
        """(rowid, pack, offset, length) of extents waiting to be punched."""
        return [tuple(r) for r in self.conn.execute(
            "SELECT rowid, pack, offset, length FROM free_extents")]  # type: ignore[misc]

    def reclaim_in_steps(self, punch: Callable[[list[tuple[int, int, int]]], None]) -> None:
        """Punch out the queued extents (pack, offset, length) and forget them,
        RELEASE_STEP at a time, on a connection of its own: for a worker thread.
        Punching an extent twice (a crash between the two) is harmless: packs are
        append-only, a freed range is never written again."""
        with self._worker() as conn:
            while True:
                rows = conn.execute("SELECT rowid, pack, offset, length FROM free_extents "
                                    "LIMIT ?", (RELEASE_STEP,)).fetchall()
                if not rows:
                    return
                punch([(pack, offset, length) for _, pack, offset, length in rows])
                with _immediate(conn):
                    conn.executemany("DELETE FROM free_extents WHERE rowid = ?",
                                     [(r[0],) for r in rows])

    def extents_done(self, rowids: list[int]) -> None:
        with self.md.transaction():
            self.conn.executemany("DELETE FROM free_extents WHERE rowid = ?",
                                  [(r,) for r in rowids])

    def empty_packs(self, exclude: set[int]) -> list[int]:
        """Packs without any live chunk (and not being written by this process)."""
        rows = self.conn.execute("SELECT id FROM packs p WHERE NOT EXISTS "
                                 "(SELECT 1 FROM chunks c WHERE c.pack = p.id)")
        return [int(r[0]) for r in rows if int(r[0]) not in exclude]

    def drop_pack(self, pack: int) -> None:
        self.conn.execute("DELETE FROM packs WHERE id = ?", (pack,))

    def packs(self) -> dict[int, int]:
        """committed length by pack id."""
        return {int(r[0]): int(r[1]) for r in self.conn.execute("SELECT id, committed FROM packs")}
