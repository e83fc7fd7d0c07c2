"""``snapfs fsck``: verify every chunk against its hash and every reference.
A compressed chunk is checked twice: its stored bytes against the read check,
its decompressed bytes against the content address (compression.py).

Reads every stored chunk once, pack by pack in offset order (sequential I/O),
hashing in worker threads. Reports problems; fixes nothing and changes no file
(the CLI opens the store read-only); ``snapfs fsck --repair`` (run_repair) does
the safe repairs of repair.py first. What any exclusive open tidies by itself
(pack tails, queued punches, empty packs) is listed as "to tidy", not as a problem.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import trio

from ..errors import CorruptData
from ..logtext import esc
from . import mapdigest
from .chunkindex import wrong_refs
from .chunks import CHUNK_SIZE, PackFiles
from .chunks import digest as blake3_digest
from .compression import decompress
from .repair import (exclusive_lock, pending_tidying, repair, store_idle, suspicious_tails,
                     unaccounted_packs, unaccounted_shadows)
from .service import LocalService
from .store import open_store


@dataclass
class FsckReport:
    chunks: int = 0
    bytes: int = 0
    snapshots: int = 0
    problems: list[str] = field(default_factory=list)
    #: Leftovers the next exclusive open (or --repair) tidies: not problems.
    tidy: list[str] = field(default_factory=list)
    #: Chunks whose bytes read wrong or not at all (--repair marks them damaged).
    damaged: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


async def fsck(svc: LocalService) -> FsckReport:
    rep = FsckReport()
    conn = svc.md.conn
    # Each listing before what it is checked against, so that work going on beside
    # fsck (a capture in the mount) cannot look like a problem: a pack's row is
    # committed before its file is made, and committed lengths only grow.
    if store_idle(svc.store):  # else pack tails and queued punches are work in flight
        rep.tidy = pending_tidying(svc)
        rep.problems += suspicious_tails(svc)
    orphans = unaccounted_packs(svc)
    shadows = unaccounted_shadows(svc)
    packs = svc.index.packs()
    rep.snapshots = conn.execute("SELECT count(*) FROM snapshots").fetchone()[0]

    # References: every map entry names an existing chunk, of an existing snapshot.
    for snap, idx, chunk in conn.execute(
            "SELECT snap, idx, chunk FROM snapshot_chunks m WHERE NOT EXISTS "
            "(SELECT 1 FROM chunks c WHERE c.id = m.chunk)"):
        rep.problems.append(f"snapshot #{snap} chunk {idx} refers to missing chunk {chunk}")
    for (snap,) in conn.execute("SELECT DISTINCT snap FROM snapshot_chunks m WHERE NOT EXISTS "
                                "(SELECT 1 FROM snapshots s WHERE s.rowid = m.snap)"):
        rep.problems.append(f"chunk map rows of a deleted snapshot #{snap}")
    for sid, name, size, n in conn.execute(
            "SELECT s.id, s.name, s.size, max(m.idx) FROM snapshots s "
            "JOIN snapshot_chunks m ON m.snap = s.rowid GROUP BY s.rowid"):
        if n * CHUNK_SIZE >= size:
            rep.problems.append(f"snapshot {sid} ({esc(name)}) maps chunk {n} beyond its "
                                f"size {size}")
    for cid, refs, n in wrong_refs(conn):
        if n == 0:
            rep.problems.append(f"chunk {cid} is not referenced by any snapshot (leaked)")
        if refs != n:
            rep.problems.append(f"chunk {cid} counts {refs} reference(s), the maps hold {n} "
                                "(fsck --repair counts them again)")
    rep.problems += [what + " (fsck --repair drops them; they are computed again when "
                     "needed)" for _, what in mapdigest.wrong(conn)]
    for (cid, pack) in conn.execute("SELECT id, pack FROM chunks c WHERE NOT EXISTS "
                                    "(SELECT 1 FROM packs p WHERE p.id = c.pack)"):
        rep.problems.append(f"chunk {cid} lies in unknown pack {pack}")
    for path in orphans:
        rep.problems.append(f"pack file {esc(path.name, limit=None)} has no metadata "
                            "(left in place; fsck --repair moves it to lost+found)")
    for path in shadows:
        if not path.exists():  # dropped meanwhile, after its snapshot's row
            continue
        # Whatever name a stray file has: escaped, or a newline forges report lines.
        stray = esc(str(path.relative_to(svc.store)), limit=None)
        rep.problems.append(f"{stray}: no snapshot of the metadata is its (fsck --repair "
                            "moves it to lost+found)")
    for sid, _, shadow, _, _, size in svc.md.shadow_backed_snapshots():
        # Its data until its chunks are stored (shadows.py).
        path = svc.shadows.root / shadow
        if not path.is_file() or path.stat().st_size < size:
            rep.problems.append(f"snapshot {sid}: the clone holding its data ({shadow}) "
                                "is missing or short")

    # Data: every chunk's bytes against its hash, pack by pack in offset order: one
    # pack's rows in memory at a time (a 1 TiB store has a million chunks).
    for pack in sorted(packs):
        rows = conn.execute("SELECT id, offset, length, hash, xxh, raw_length FROM chunks "
                            "WHERE pack = ? ORDER BY offset", (pack,)).fetchall()
        row = conn.execute("SELECT committed FROM packs WHERE id = ?", (pack,)).fetchone()
        if row is None:  # dropped since (an exclusive open elsewhere): nothing to read
            continue
        committed = row[0]  # read after the rows: it only grows
        for cid, offset, length, digest, xxh, raw_length in rows:
            if offset + length > committed:
                rep.problems.append(f"chunk {cid} ends past pack {pack}'s committed length")
                continue
            problem = await _verify(svc, pack, offset, length, bytes(digest),
                                    xxh and bytes(xxh), raw_length)
            if problem and _still_there(conn, cid, pack, offset):
                rep.problems.append(f"chunk {cid}: {problem}{_DAMAGED_HINT}")
                rep.damaged.append(cid)
            rep.chunks += 1
            rep.bytes += length
    return rep


_DAMAGED_HINT = (" (fsck --repair marks it damaged: the next snapshot or import holding "
                 "these bytes stores them anew, which heals every snapshot sharing it)")


def print_report(rep: FsckReport, say: Callable[[str], None]) -> int:
    """The report as the CLI prints it; the exit status."""
    for p in rep.problems:
        say(f"problem: {p}")
    for t in rep.tidy:
        say(f"to tidy: {t}")
    say(f"{rep.snapshots} snapshots, {rep.chunks} chunks ({rep.bytes} bytes) checked: "
        + ("clean" if rep.ok else f"{len(rep.problems)} problem(s)"))
    return 0 if rep.ok else 1


def _read_raw(packs: PackFiles, pack: int, offset: int, length: int, digest: bytes,
              xxh: bytes | None, raw_length: int | None) -> None:
    """A chunk checked end to end: a raw chunk's bytes against its blake3 digest; a
    compressed one's stored bytes against their xxh3 check (as every read does),
    then its decompressed bytes' length and blake3 digest (the content address)."""
    if raw_length is None:
        packs.read(pack, offset, length, digest)
        return
    what = f"chunk {digest.hex()[:16]} in pack {pack} at offset {offset}"
    if xxh is None:
        raise CorruptData(f"{what} is compressed but has no read check")
    raw = decompress(packs.read(pack, offset, length, digest, xxh), raw_length, what)
    if blake3_digest(raw) != digest:
        raise CorruptData(f"{what} decompresses to bytes that do not match its hash")


async def _verify(svc: LocalService, pack: int, offset: int, length: int,
                  digest: bytes, xxh: bytes | None, raw_length: int | None) -> str | None:
    """What is wrong with a chunk's bytes, or None."""
    try:
        await trio.to_thread.run_sync(_read_raw, svc.packs, pack, offset, length, digest,
                                      xxh, raw_length, limiter=svc.io_limiter)
    except CorruptData as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read pack {pack}: {os.strerror(exc.errno or 0)}"
    return None


def _still_there(conn: sqlite3.Connection, cid: int, pack: int, offset: int) -> bool:
    """Whether a chunk that read wrong is still stored: a delete (in the background
    of this process, or in another) may have freed it since the list was taken. Its
    row goes before its space is punched, so a punched chunk shows as gone here."""
    return conn.execute("SELECT 1 FROM chunks WHERE id = ? AND pack = ? AND offset = ?",
                        (cid, pack, offset)).fetchone() is not None


async def run_repair(store: Path, say: Callable[[str], None]) -> int:
    """``snapfs fsck --repair``: with the store to ourselves, repair, then check;
    the fsck exit status."""
    if not store.is_dir() or not any(store.iterdir()):
        open_store(store, writing=False)  # refuses: no store there (repair makes none)
    open_store(store, writing=True)
    fd = exclusive_lock(store)
    try:
        svc = LocalService(store, None)
        try:
            await repair(svc, say)
            rep = await fsck(svc)
            marked = set(svc.index.damaged())
            newly = [cid for cid in rep.damaged if cid not in marked]
            if newly:
                svc.index.mark_damaged(newly)
                say(f"repair: marked {len(newly)} chunk(s) damaged (not reused from now "
                    "on; a snapshot holding their bytes stores them anew): "
                    + ", ".join(map(str, newly)))
        finally:
            svc.pool.close()
            svc.packs.close()
            svc.md.close()
    finally:
        os.close(fd)
    return print_report(rep, say)
