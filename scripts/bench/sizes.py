#!/usr/bin/env python3
"""Metadata size per million chunks: the README's "the map of one fully allocated
1 TiB snapshot is ~29 MiB of SQLite, the index of a million distinct chunks
~129 MiB".

A fresh store (the real schema, made by snapfs) gets N synthetic index rows
(random blake3-sized hashes, xxh3-128 checks, 1 GiB packs of 1 MiB chunks) and
the N-entry map of one snapshot referring to them in order, as a first capture
of a full volume writes them; then SQLite's dbstat gives the bytes of each table
and index. Nothing is read or hashed: only the rows' sizes are measured.

    .venv/bin/python scripts/bench/sizes.py [--entries 1000000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from snapfs.local import open_local_service  # noqa: E402

MiB = 1 << 20
#: Rows per insert transaction.
STEP = 100_000


async def make_store(store: Path) -> None:
    async with open_local_service(store):
        pass


def fill(db: Path, entries: int) -> None:
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA synchronous = OFF")
    per_pack = 1024  # 1 GiB packs of 1 MiB chunks
    conn.executemany("INSERT INTO packs (id, committed) VALUES (?, ?)",
                     [(p, per_pack * MiB) for p in range(1, entries // per_pack + 2)])
    for start in range(0, entries, STEP):
        rows = range(start, min(start + STEP, entries))
        conn.executemany(
            "INSERT INTO chunks (id, hash, pack, offset, length, xxh) VALUES (?, ?, ?, ?, ?, ?)",
            [(i + 1, os.urandom(32), i // per_pack + 1, (i % per_pack) * MiB, MiB,
              os.urandom(16)) for i in rows])
        conn.executemany("INSERT INTO snapshot_chunks (snap, idx, chunk) VALUES (1, ?, ?)",
                         [(i, i + 1) for i in rows])
        conn.commit()
    conn.close()  # not vacuumed: pages as filled by inserts, as in a real store


def sizes(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(db)
    try:
        return {str(name): int(size) for name, size in conn.execute(
            "SELECT name, SUM(pgsize) FROM dbstat GROUP BY name")}
    finally:
        conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: temp)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="snapfs-bench-sizes-", dir=args.dir))
    try:
        store = work / "store"
        trio.run(make_store, store)
        fill(store / "metadata.db", args.entries)
        s = sizes(store / "metadata.db")
        index = s.get("chunks", 0) + s.get("sqlite_autoindex_chunks_1", 0) + \
            s.get("chunks_pack", 0)
        chunk_map = s.get("snapshot_chunks", 0) + s.get("snapshot_chunks_chunk", 0)
        per = 1_000_000 / args.entries
        print(f"{args.entries} chunks, one snapshot mapping all of them; load average "
              "%.2f %.2f %.2f" % os.getloadavg())
        for name in ("chunks", "sqlite_autoindex_chunks_1", "chunks_pack", "snapshot_chunks",
                     "snapshot_chunks_chunk"):
            print(f"  {name:<28} {s.get(name, 0) / MiB:8.1f} MiB")
        print(f"index (chunks + its indexes): {index / MiB * per:.0f} MiB per million chunks")
        print(f"map (snapshot_chunks + its index): {chunk_map / MiB * per:.0f} MiB per "
              f"million entries (a fully allocated 1 TiB snapshot)")
        print(f"metadata.db {os.stat(store / 'metadata.db').st_size / MiB:.0f} MiB")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
