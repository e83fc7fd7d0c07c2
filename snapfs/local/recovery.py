"""What an open does about work a killed process left half done, so that every
existing snapshot reads as before and nothing leaks. Any open fails the captures,
imports and exports whose owner process died (owner.py); an open that finds no
other process on the store also repairs the files (pack tails, queued punches).
Each step is idempotent (a crash during recovery is recovered by the next open)."""

from __future__ import annotations

import logging

import trio

from ..errors import SnapfsError
from ..model import PRODUCING_STATES
from ..objects import ObjectStorage
from .capture import GROUP_BYTES
from .chunkindex import ChunkIndex
from .chunks import PackFiles
from .metadata import Metadata
from .owner import alive
from .uploads import abort_left

log = logging.getLogger(__name__)

INTERRUPTED = "capture interrupted: the service stopped before it finished"
EXPORT_INTERRUPTED = "export interrupted: the service stopped"
#: The reason a snapshot carries while its map is released after a Delete (the row
#: is invisible by then: schema v4); anything still holding its key reads an error.
DELETING = "being deleted"
#: The most an interrupted capture leaves past a pack's committed length (one commit
#: group and the batch that tops it, with room to spare). A longer tail is not cut at
#: open: it says the metadata is older than the pack (a metadata.db restored from a
#: backup), and those bytes may be all that is left of newer snapshots; fsck reports
#: it, `fsck --repair` cuts it after saying so.
TAIL_LIMIT = 2 * GROUP_BYTES
#: How long an open may spend aborting the uploads of interrupted exports, in all
#: (a dead Object Storage must not keep the store closed for long).
ABORT_TIME = 30.0


async def recover(md: Metadata, index: ChunkIndex, packs: PackFiles,
                  objects: ObjectStorage | None = None, exclusive: bool = True,
                  repairing: bool = False) -> None:
    """``exclusive``: no other process has the store open, so every unfinished job
    is orphaned and the files may be repaired; otherwise only the jobs whose
    owner process is gone are failed. ``repairing``: called by fsck --repair,
    whose own steps deal with what is left in place (no advice to run it)."""
    leftover = log.debug if repairing else log.warning
    def orphaned(owner: str | None) -> bool:
        return exclusive or (owner is not None and not alive(owner))

    # 1. Captures and imports that never finished: error, partial map released.
    for snap, owner in md.snapshots_in_states(PRODUCING_STATES):
        if not orphaned(owner):
            continue
        log.warning("snapshot %s (%s) was %s when the service stopped: marking it error",
                    snap.id, snap.name, snap.state)
        index.release(md.snap_key(snap.id))
        md.update_snapshot(snap.id, state="error", error_reason=INTERRUPTED)
    # 2. Exports that never finished: the snapshot's data was never touched, but
    #    the multipart upload the killed process started is still on the server
    #    (its parts are billed): abort it first, so that a crash now retries it.
    tasks = [t for t, owner in md.unfinished_tasks() if orphaned(owner)]
    deadline = trio.current_time() + ABORT_TIME
    for task in tasks:
        await _abort_upload(objects, task.bucket, task.key, task.zone, deadline)
    # 2b. Uploads that failed exports could not abort (Object Storage was down).
    with trio.move_on_at(deadline):
        await abort_left(md, objects)
    for task in tasks:
        with md.transaction():
            md.update_task(task.id, status="failure", terminated_at=task.started_at,
                           error=EXPORT_INTERRUPTED)
            snapshot_id = md.task_snapshot(task.id)
            md.conn.execute("UPDATE snapshots SET state = 'available' "
                            "WHERE id = ? AND state = 'exporting'", (snapshot_id,))
    # 3. Pack bytes past the committed length, extents queued for punching, packs
    #    whose row records no live chunk: only with the store to ourselves, as other
    #    processes may be appending to their packs. Only what the metadata records
    #    as freed goes: a pack file no row knows is left in place (the metadata may
    #    be the thing that is wrong); fsck reports it, `fsck --repair` moves it to
    #    lost+found.
    if not exclusive:
        return
    # 3b. Map rows of snapshots whose row is gone: what a capture in one process
    #     committed after another deleted its snapshot, before commits checked for
    #     that (ChunkIndex.commit_batch); their delete was accepted, so release them.
    for key, entries in index.orphan_maps():
        log.warning("releasing %d chunk map rows of deleted snapshot #%d", entries, key)
        index.release(key)
    committed = index.packs()

    def fix_files() -> None:
        for pack, length in committed.items():
            size = packs.size(pack)
            if size is not None and size - length > TAIL_LIMIT:
                leftover("pack %d: %d bytes past its committed length, more than an "
                            "interrupted write leaves (is metadata.db older than the "
                            "packs?): left in place; 'snapfs fsck --repair' cuts them",
                            pack, size - length)
            elif size is not None and size > length:
                packs.truncate(pack, length)
        packs.punch([(pack, offset, length) for _, pack, offset, length in index.free_extents()])
        unknown = sorted(packs.existing() - set(committed))
        if unknown:
            leftover("%d pack file(s) without metadata (%s...) left in place: "
                        "'snapfs fsck --repair' moves them to lost+found", len(unknown),
                        packs.path(unknown[0]).name)
    await trio.to_thread.run_sync(fix_files)
    index.extents_done([e[0] for e in index.free_extents()])
    for pack in index.empty_packs(exclude=set()):
        size = await trio.to_thread.run_sync(packs.size, pack)
        if size is not None and size > index.packs().get(pack, 0):
            continue  # bytes its row does not record (a tail left above): kept
        await trio.to_thread.run_sync(packs.remove, pack)
        index.drop_pack(pack)


async def _abort_upload(objects: ObjectStorage | None, bucket: str, key: str, zone: str,
                        deadline: float) -> None:
    """Best effort: any failure is one log line, never a failed open."""
    where = f"{bucket}/{key}"
    if objects is None:
        log.warning("interrupted export to %s: no Object Storage configured, its "
                    "unfinished upload (if any) is not aborted", where)
        return
    with trio.move_on_at(deadline) as scope:
        try:
            n = await objects.abort_uploads(bucket, key, zone=zone)
        except SnapfsError as exc:
            log.warning("interrupted export to %s: could not abort its upload: %s", where, exc)
            return
        except Exception as exc:  # unexpected: still no reason to refuse the store
            log.warning("interrupted export to %s: could not abort its upload: %r", where, exc)
            return
        log.info("interrupted export to %s: %d unfinished upload(s) aborted", where, n)
    if scope.cancelled_caught:
        log.warning("interrupted export to %s: no answer from Object Storage within %.0fs, "
                    "its upload is not aborted", where, ABORT_TIME)
