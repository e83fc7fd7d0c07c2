"""What fsck finds that is not data corruption, and ``snapfs fsck --repair``.

Nothing here deletes a file because no row knows it: a pack file or a shadow the
metadata does not account for is moved into ``<store>/lost+found/`` (the metadata
may be what is wrong: a restored backup, a bug), never unlinked. What the metadata
positively records as freed -- a pack's bytes past its committed length, extents
queued for punching, a pack row without a live chunk, the map rows of a deleted
snapshot -- is what repair frees. Repair needs the store to itself (the lock:
no mount, no serve) and prints each step before doing any.
"""

from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import trio

from ..errors import PreconditionFailed
from ..logtext import esc
from . import mapdigest
from .chunkindex import set_refs, wrong_refs
from .recovery import TAIL_LIMIT, recover
from .store import LOST_FOUND, open_lock

if TYPE_CHECKING:
    from .service import LocalService

log = logging.getLogger(__name__)


def store_idle(store: Path) -> bool:
    """Whether no process has the store open (probed with the lock, creating
    nothing): only then are pack tails and queued extents leftovers rather than
    work in flight."""
    try:
        fd = os.open(store / "lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # releases the probe's lock
    return True


def pack_tails(svc: "LocalService") -> list[tuple[int, int, int]]:
    """(pack, committed length, file size) of the pack files longer than their
    committed length."""
    out = []
    for pack, committed in sorted(svc.index.packs().items()):
        size = svc.packs.size(pack)
        if size is not None and size > committed:
            out.append((pack, committed, size))
    return out


def _tail_line(svc: "LocalService", pack: int, committed: int, size: int) -> str:
    why = ("of an interrupted write" if size - committed <= TAIL_LIMIT else
           "more than an interrupted write leaves: is metadata.db older than the packs?")
    return (f"truncate pack file {svc.packs.path(pack).name} to {committed} bytes "
            f"({size - committed} uncommitted bytes {why})")


def suspicious_tails(svc: "LocalService") -> list[str]:
    """Tails longer than an interrupted write leaves: the next open keeps them."""
    return [f"pack file {svc.packs.path(p).name} has {s - c} bytes past its committed "
            "length, more than an interrupted write leaves (is metadata.db older than "
            "the packs?): left in place; fsck --repair cuts them"
            for p, c, s in pack_tails(svc) if s - c > TAIL_LIMIT]


def pending_tidying(svc: "LocalService") -> list[str]:
    """What any exclusive open (and ``--repair``) tidies: uncommitted pack tails,
    extents queued for punching, pack rows without a live chunk. Only meaningful
    on an idle store."""
    return [_tail_line(svc, *t) for t in pack_tails(svc) if t[2] - t[1] <= TAIL_LIMIT] + \
        _other_tidying(svc)


def _other_tidying(svc: "LocalService") -> list[str]:
    out = []
    extents = svc.index.free_extents()
    if extents:
        out.append(f"punch {len(extents)} freed extent(s) ({sum(e[3] for e in extents)} "
                   "bytes of deleted chunks)")
    for pack in svc.index.empty_packs(exclude=set()):
        out.append(f"remove pack {pack}: its metadata records no live chunk in it")
    return out


def unaccounted_packs(svc: "LocalService") -> list[Path]:
    """Pack files no pack row knows (listed before the rows: a row is committed
    before its file is made)."""
    files = svc.packs.existing()
    return [svc.packs.path(p) for p in sorted(files - set(svc.index.packs()))] + \
        svc.packs.strays()


def unaccounted_shadows(svc: "LocalService") -> list[Path]:
    """Files under shadows/ that are not the shadow of a snapshot the metadata
    knows (its map key and ID)."""
    root = svc.shadows.root
    if not root.is_dir():
        return []
    files = sorted(p for p in [*root.glob("*"), *root.glob("*/*")] if not p.is_dir())
    known = svc.md.snapshot_keys()
    out = []
    for p in files:
        parts = p.name.split(".")
        if not (len(parts) == 3 and parts[0].isascii() and parts[0].isdigit()
                and (int(parts[0]), parts[1]) in known):
            out.append(p)
    return out


def deleted_maps(svc: "LocalService") -> list[tuple[int, int]]:
    """(map key, rows) of chunk map rows whose snapshot row is gone."""
    return [(int(k), int(n)) for k, n in svc.md.conn.execute(
        "SELECT snap, count(*) FROM snapshot_chunks m WHERE NOT EXISTS "
        "(SELECT 1 FROM snapshots s WHERE s.rowid = m.snap) GROUP BY snap")]


@dataclass
class Step:
    what: str
    do: Callable[[], None] | None = None  # None: done by the recovery pass
    #: Done before the recovery pass: a count too low would let a release there
    #: free a chunk another snapshot still maps.
    first: bool = False


def plan(svc: "LocalService") -> list[Step]:
    md = svc.md
    steps: list[Step] = []
    for snap, _ in md.snapshots_in_states(("snapshotting", "importing")):
        steps.append(Step(f"mark snapshot {snap.id} ({esc(snap.name)}) error: it was "
                          f"{snap.state} when its process stopped (its partial map is "
                          "released)"))
    for task, _ in md.unfinished_tasks():
        steps.append(Step(f"mark export task {task.id} failed: it was interrupted"))
    steps += [Step(_tail_line(svc, *t), _truncate(svc, t[0], t[1])) for t in pack_tails(svc)]
    steps += [Step(line) for line in _other_tidying(svc)]
    for snapshot_id, key, _ in md.deleting():
        steps.append(Step(f"finish the delete of snapshot {snapshot_id}: release its map "
                          "(and drop its clone, if any)", _finish_delete(svc, snapshot_id, key)))
    for key, rows in deleted_maps(svc):
        steps.append(Step(f"release the {rows} chunk map row(s) of deleted snapshot #{key}",
                          _release(svc, key)))
    off = [(cid, n) for cid, refs, n in wrong_refs(md.conn) if refs != n]
    if off:
        steps.append(Step(f"count the references of {len(off)} chunk(s) again",
                          _recount(svc, off), first=True))
    for key, what in mapdigest.wrong(md.conn):
        steps.append(Step(f"drop the window digests of map #{key} ({what}); they are "
                          "computed again when needed", _drop_digests(svc, key)))
    lost = svc.store / LOST_FOUND
    for path in unaccounted_packs(svc):
        steps.append(Step(f"move pack file {esc(path.name, limit=None)} (no metadata knows it) "
                          "into "
                          f"{esc(str(lost), limit=None)}/",
                          _to_lost_found(lost, path, path.name)))
    for path in unaccounted_shadows(svc):
        name = "-".join(["shadow", *path.relative_to(svc.shadows.root).parts])
        # Whatever name a stray file has: escaped, or a newline forges report lines.
        stray = esc(str(path.relative_to(svc.store)), limit=None)
        steps.append(Step(f"move {stray} (no snapshot of the metadata is its) into "
                          f"{esc(str(lost / name), limit=None)}",
                          _to_lost_found(lost, path, name)))
    return steps


def _truncate(svc: "LocalService", pack: int, committed: int) -> Callable[[], None]:
    def do() -> None:
        svc.packs.truncate(pack, committed)
    return do


def _finish_delete(svc: "LocalService", snapshot_id: str, key: int) -> Callable[[], None]:
    def do() -> None:
        svc.index.release_in_steps(key, snapshot_id)
        svc.shadows.drop_snapshot(snapshot_id)  # deleted: its clone only pins blocks
    return do


def _release(svc: "LocalService", key: int) -> Callable[[], None]:
    def do() -> None:
        svc.index.release_in_steps(key)
    return do


def _recount(svc: "LocalService", counts: list[tuple[int, int]]) -> Callable[[], None]:
    def do() -> None:  # in a worker thread: a connection of its own
        conn = svc.md.worker_connection()
        try:
            set_refs(conn, counts)
        finally:
            conn.close()
    return do


def _drop_digests(svc: "LocalService", key: int) -> Callable[[], None]:
    def do() -> None:  # in a worker thread: a connection of its own
        conn = svc.md.worker_connection()
        try:
            mapdigest.drop(conn, key)
        finally:
            conn.close()
    return do


def _to_lost_found(lost: Path, path: Path, name: str) -> Callable[[], None]:
    def do() -> None:
        lost.mkdir(mode=0o700, exist_ok=True)
        target, n = lost / name, 0
        while os.path.lexists(target):
            n += 1
            target = lost / f"{name}.{n}"
        os.rename(path, target)
        log.info("moved %s into %s", path, target)
    return do


async def repair(svc: "LocalService", say: Callable[[str], None]) -> int:
    """Print the plan, then carry it out; the number of steps. ``svc`` must be
    opened (writing) by a caller holding the store's lock exclusively."""
    steps = plan(svc)
    if not steps:
        say("repair: nothing to do")
        return 0
    for step in steps:
        say(f"repair: will {step.what}")
    for step in steps:
        if step.first and step.do is not None:
            await trio.to_thread.run_sync(step.do)
    # Interrupted jobs, pack tails, queued punches, empty packs: the recovery of an
    # exclusive open does exactly these.
    await recover(svc.md, svc.index, svc.packs, None, exclusive=True,
                  repairing=True)
    for step in steps:
        if not step.first and step.do is not None:
            await trio.to_thread.run_sync(step.do)
    # What the releases above freed: punched, and packs left empty dropped.
    await recover(svc.md, svc.index, svc.packs, None, exclusive=True,
                  repairing=True)
    say(f"repair: {len(steps)} step(s) done")
    return len(steps)


def exclusive_lock(store: Path) -> int:
    """The store's lock, held exclusively, or PreconditionFailed when another
    process (a mount, serve) has the store open."""
    fd = open_lock(store)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PreconditionFailed(f"store {store} is open in another process (a mount or "
                                 "'snapfs serve'): stop it, then run fsck --repair") from None
    return fd
