"""Adopting the work that stopped processes left half done on a store.

Every job records its owner process (owner.py). When that process is gone — a
crash, an OOM kill, a mount stopped mid-delete — the next opener of the store,
or a process that has it open (every ORPHAN_SWEEP seconds), recovers it: captures
and imports of the dead fail, exports end, deletes and the storing of
clone-backed snapshots resume. Each is taken over by one compare-and-set of its
owner, so two live processes never both resume it.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

import trio

from ..model import PRODUCING_STATES
from ..objects import ObjectStorage
from .background import BackgroundJobs
from .chunkindex import ChunkIndex
from .chunks import PackFiles
from .jobs import SnapshotWork
from .metadata import Metadata
from .owner import alive
from .recovery import recover
from .shadows import Shadows
from .storelocks import StoreLock

log = logging.getLogger(__name__)

#: Seconds between two looks for the work of processes that died (sweep).
ORPHAN_SWEEP = 10.0

Work = list[tuple[str, Callable[..., Awaitable[None]], tuple[object, ...]]]


class Adoption:
    """Finds, claims and resumes the unfinished work of stopped processes."""

    def __init__(self, md: Metadata, index: ChunkIndex, packs: PackFiles,
                 objects: ObjectStorage | None, index_lock: StoreLock,
                 jobs: BackgroundJobs, work: SnapshotWork, shadows: Shadows) -> None:
        self.md, self.index, self.packs, self.objects = md, index, packs, objects
        self.index_lock, self.jobs, self.work, self.shadows = index_lock, jobs, work, shadows

    def claim(self, exclusive: bool) -> Work:
        """The deletes and the storing of clone-backed snapshots that stopped
        processes left half done (any, when ``exclusive``: no other process has
        the store open -- decided under the open lock, before another may start
        work of its own), each taken over by one compare-and-set of its owner;
        ``resume`` starts them."""
        work: Work = []
        for snapshot_id, key, owner in self.md.deleting():
            if self._claim(snapshot_id, owner, exclusive):
                log.info("snapshot %s: resuming its delete", snapshot_id)
                work.append((snapshot_id, self.work.release, (snapshot_id, key)))
        for snapshot_id, key, shadow, owner, volume_id, size in \
                self.md.shadow_backed_snapshots():
            if self._claim(snapshot_id, owner, exclusive):
                log.info("snapshot %s: storing its chunks again", snapshot_id)
                work.append((snapshot_id, self.work.resume_storing,
                             (snapshot_id, key, volume_id,
                              self.shadows.named(shadow, key, snapshot_id), size)))
        return work

    def _claim(self, snapshot_id: str, owner: str | None, exclusive: bool) -> bool:
        return snapshot_id not in self.jobs and \
            (exclusive or owner is None or not alive(owner)) and \
            self.md.take_over(snapshot_id, owner)

    def resume(self, work: Work) -> None:
        for snapshot_id, fn, args in work:
            self.jobs.start(snapshot_id, fn, *args)

    async def sweep(self) -> None:
        """While this process runs: every ORPHAN_SWEEP seconds, the work of
        processes that died meanwhile (a server OOM-killed beside this mount) is
        recovered as an open would, instead of waiting for the next open."""
        while True:
            await trio.sleep(ORPHAN_SWEEP)
            try:
                if not self._orphaned_work():
                    continue
                async with self.index_lock:
                    await recover(self.md, self.index, self.packs, self.objects,
                                  exclusive=False)
                self.resume(self.claim(False))
            except Exception:  # a bug here must not take the service down
                log.exception("recovering the work of stopped processes failed")

    def dead_jobs(self) -> bool:
        """Whether a capture, import or export of a dead process is unfinished
        (what recover() fails when the store is not to itself)."""
        md = self.md
        return any(_dead(o) for _, o in md.snapshots_in_states(tuple(PRODUCING_STATES))) \
            or any(_dead(o) for _, o in md.unfinished_tasks())

    def _orphaned_work(self) -> bool:
        md = self.md
        return self.dead_jobs() \
            or any((o is None or _dead(o)) and i not in self.jobs
                   for i, _, o in md.deleting()) \
            or any((r[3] is None or _dead(r[3])) and r[0] not in self.jobs
                   for r in md.shadow_backed_snapshots())


def _dead(owner: str | None) -> bool:
    """A job's owner that is gone (None: no owner recorded, nothing to say)."""
    return owner is not None and not alive(owner)
