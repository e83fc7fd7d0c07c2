#!/usr/bin/env python3
"""changes/ between two 1 TiB snapshots whose chunk maps have a million entries
each: the time `cat snapshots/B/changes/A` takes through the mount (lookup, the
map comparison in SQLite, rendering). Target <= 1 s.

    .venv/bin/python scripts/bench/changes.py [--entries 1000000] [--every 100] [--run 64]

A real snapshot of a small volume is taken through the mount; two more snapshot
rows of the same volume are then written into the store's metadata with maps of
--entries entries over its chunks, as a 1 TiB snapshot's map and its successor's
would be: B differs from A in one run of --run entries out of every --every runs
(a filesystem's writes cluster; --run 1 scatters them, the worst case). Their
window digests are then written as a capture writes them when its map is
complete (snapfs/local/mapdigest.py; timed apart); --no-digests leaves them out,
so that the first changes/ computes them (a store made before they existed).
Prints os.getloadavg().
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from snapfs.local import mapdigest  # noqa: E402

MiB = 1 << 20


def sh(*cmd: object) -> str:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True,
                          text=True).stdout


def snapfs(*args: object) -> str:
    return sh(sys.executable, "-m", "snapfs", *args)


def add_maps(db: Path, entries: int, every: int, run: int) -> list[int]:
    conn = sqlite3.connect(db, isolation_level=None)
    (base,) = conn.execute("SELECT rowid FROM snapshots WHERE name = 'seed'").fetchone()
    chunks = [r[0] for r in conn.execute("SELECT chunk FROM snapshot_chunks WHERE snap = ?",
                                         (base,))]
    assert len(chunks) >= 2, "the seed volume must have two data chunks"
    cols = [r[1] for r in conn.execute("PRAGMA table_info(snapshots)")]
    conn.execute("BEGIN")
    keys = []
    for name in ("A", "B"):
        (key,) = conn.execute("SELECT max(rowid) + 1 FROM snapshots").fetchone()
        values = ", ".join(
            "?" if c in ("id", "name", "size") else c for c in cols)
        conn.execute(f"INSERT INTO snapshots (rowid, {', '.join(cols)}) SELECT ?, {values} "
                     "FROM snapshots WHERE rowid = ?",
                     [key] + [v for c in cols if c in ("id", "name", "size")
                              for v in [{"id": str(uuid.uuid4()), "name": name,
                                         "size": entries * MiB}[c]]] + [base])
        keys.append(key)
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('last_snapshot_key', ?)",
                 (str(keys[-1]),))
    conn.executemany("INSERT INTO snapshot_chunks (snap, idx, chunk) VALUES (?, ?, ?)",
                     ((keys[0], i, chunks[i % 2]) for i in range(entries)))
    conn.executemany("INSERT INTO snapshot_chunks (snap, idx, chunk) VALUES (?, ?, ?)",
                     ((keys[1], i, chunks[(i + ((i // run) % every == 0)) % 2])
                      for i in range(entries)))
    conn.execute("COMMIT")
    conn.close()
    return keys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--run", type=int, default=64)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--no-digests", action="store_true",
                    help="no window digests: the first changes/ computes them")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="snapfs-changes-", dir=args.dir))
    mnt = work / "mnt"
    mnt.mkdir()
    try:
        vol = work / "vol.raw"
        vol.write_bytes(os.urandom(2 * MiB))
        store = work / "store"
        snapfs("volume", "add", "v", vol, "--store", store)
        snapfs("mount", mnt, "--store", store)
        vdir = mnt / "fr-par-1" / "default" / "volumes" / "v"
        (vdir / "seed").mkdir()
        snapfs("wait", vdir / "seed")
        snapfs("umount", mnt)
        t0 = time.perf_counter()
        keys = add_maps(store / "metadata.db", args.entries, args.every, args.run)
        print(f"two maps of {args.entries} entries written in "
              f"{time.perf_counter() - t0:.1f}s")
        if not args.no_digests:
            conn = sqlite3.connect(store / "metadata.db", isolation_level=None)
            for key in keys:
                t0 = time.perf_counter()
                mapdigest.write(conn, key)
                print(f"window digests of map #{key}: {time.perf_counter() - t0:.2f}s "
                      f"(load average {os.getloadavg()[0]:.1f})")
            conn.close()
        snapfs("mount", mnt, "--store", store)
        b = vdir / "B"
        t0 = time.perf_counter()
        out = sh("cat", b / "changes" / "A")
        took = time.perf_counter() - t0
        extents = json.loads(out)
        expected = -(-args.entries // (args.every * args.run))
        print(f"changes/A of B: {len(extents)} extents (expected {expected}) in {took:.2f}s "
              f"(target <= 1 s); load average {os.getloadavg()}")
        t0 = time.perf_counter()
        sh("cat", vdir / "A" / "map.json")
        print(f"map.json of A (one extent over {args.entries} entries): "
              f"{time.perf_counter() - t0:.2f}s")
        t0 = time.perf_counter()
        again = sh("cat", vdir / "A" / "changes" / "B")
        print(f"changes/B of A (a fresh render): {time.perf_counter() - t0:.2f}s, "
              f"{len(json.loads(again))} extents")
        return 0 if len(extents) == expected else 1
    finally:
        if any(line.split()[1] == str(mnt) for line in open("/proc/self/mounts")):
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
