"""The chunk index: which chunks exist, where they are, who references them.

All of it is SQL on the metadata connection, run on the trio thread in short
transactions. The ordering rule that makes crashes harmless: pack bytes are
fsynced *before* ``commit_batch`` commits rows pointing at them, and rows are
deleted (and their extents queued in ``free_extents``) *before* space is punched.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from ..errors import CorruptData
from .metadata import Metadata


@dataclass(frozen=True)
class Location:
    pack: int
    offset: int
    length: int
    hash: bytes
    xxh: bytes | None


class ChunkIndex:
    def __init__(self, md: Metadata) -> None:
        self.md = md
        self.conn: sqlite3.Connection = md.conn

    def known(self, hashes: list[bytes]) -> dict[bytes, int]:
        """chunk id by hash, for the hashes already stored."""
        found: dict[bytes, int] = {}
        for i in range(0, len(hashes), 500):
            part = hashes[i:i + 500]
            marks = ",".join("?" * len(part))
            for h, cid in self.conn.execute(
                    f"SELECT hash, id FROM chunks WHERE hash IN ({marks})", part):
                found[bytes(h)] = int(cid)
        return found

    def new_pack(self) -> int:
        return int(self.conn.execute("INSERT INTO packs (committed) VALUES (0)").lastrowid or 0)

    def commit_batch(self, snap: int, pack: int | None, pack_end: int,
                     new: list[tuple[bytes, int, int, bytes]], refs: list[tuple[int, bytes]],
                     progress: tuple[str, int] | None) -> None:
        """One atomic step of a capture: new chunks (hash, offset, length, xxh) already
        fsynced in ``pack`` up to ``pack_end``, and the snapshot's map entries
        (idx, hash). The caller guarantees (by holding the index lock since
        ``known``) that every hash in refs is either stored or in ``new``."""
        with self.md.transaction():
            if new:
                self.conn.executemany(
                    "INSERT INTO chunks (hash, pack, offset, length, xxh) VALUES (?, ?, ?, ?, ?)",
                    [(h, pack, off, ln, x) for h, off, ln, x in new])
            if pack is not None:
                self.conn.execute("UPDATE packs SET committed = max(committed, ?) WHERE id = ?",
                                  (pack_end, pack))
            if refs:
                ids = self.known(list({h for _, h in refs}))
                if len(ids) != len({h for _, h in refs}):
                    # Only another process on the same store can do this (deletes here
                    # wait for the index lock): fail this capture, not the store.
                    raise CorruptData("a chunk this capture reuses was deleted meanwhile by "
                                      "another process on the same store; take it again")
                self.conn.executemany(
                    "INSERT OR REPLACE INTO snapshot_chunks (snap, idx, chunk) VALUES (?, ?, ?)",
                    [(snap, idx, ids[h]) for idx, h in refs])
            if progress is not None:
                self.conn.execute("UPDATE snapshots SET progress = ? WHERE id = ?",
                                  (progress[1], progress[0]))

    def locate(self, snap: int, first: int, last: int) -> dict[int, Location]:
        """Map entries for chunk indices first..last (inclusive); absent = hole."""
        rows = self.conn.execute(
            "SELECT m.idx, c.pack, c.offset, c.length, c.hash, c.xxh FROM snapshot_chunks m "
            "JOIN chunks c ON c.id = m.chunk WHERE m.snap = ? AND m.idx BETWEEN ? AND ?",
            (snap, first, last))
        return {r[0]: Location(r[1], r[2], r[3], bytes(r[4]), r[5] and bytes(r[5]))
                for r in rows}

    def release(self, snap: int) -> None:
        """Drop a snapshot's map; chunks nobody else references are deleted and their
        extents queued for punching, in the same transaction."""
        with self.md.transaction():
            self.conn.execute("DROP TABLE IF EXISTS temp.cand")
            self.conn.execute("CREATE TEMP TABLE cand AS "
                              "SELECT DISTINCT chunk AS id FROM snapshot_chunks WHERE snap = ?",
                              (snap,))
            self.conn.execute("DELETE FROM snapshot_chunks WHERE snap = ?", (snap,))
            orphan = ("SELECT c.id FROM chunks c JOIN cand USING (id) WHERE NOT EXISTS "
                      "(SELECT 1 FROM snapshot_chunks m WHERE m.chunk = c.id)")
            self.conn.execute("INSERT INTO free_extents (pack, offset, length) "
                              f"SELECT pack, offset, length FROM chunks WHERE id IN ({orphan})")
            self.conn.execute(f"DELETE FROM chunks WHERE id IN ({orphan})")
            self.conn.execute("DROP TABLE temp.cand")

    def free_extents(self) -> list[tuple[int, int, int, int]]:
        """(rowid, pack, offset, length) of extents waiting to be punched."""
        return [tuple(r) for r in self.conn.execute(
            "SELECT rowid, pack, offset, length FROM free_extents")]  # type: ignore[misc]

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
