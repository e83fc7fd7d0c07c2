"""What the local service's background jobs do: captures (a full read, or the
previous map reused under a read lease), imports, exports, the storing of
clone-backed snapshots and the background half of deletes, each a job of the
service's BackgroundJobs (background.py) that leaves its snapshot or task in a
final state whatever happens.

``key`` is a snapshot's map key (its rowid, see schema.py) throughout; an Object
Storage object is ``bucket``/``obj``."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from functools import partial
from typing import Awaitable, Callable

import trio

from ..errors import InvalidAnswer, InvalidData, PreconditionFailed, SnapfsError, StoreFull
from ..memory import CAPTURE_BYTES, READERS
from ..model import PRODUCING_STATES, now
from ..objects import ObjectStorage
from ..service import ImageReader
from .background import BackgroundJobs
from .capture import CaptureSource, FileSource, capture
from .capturequeue import Ticket
from .chunkindex import ChunkIndex
from .chunks import CHUNK_SIZE, PackFiles
from .leases import VolumeLeases
from .mapdigest import write_completed
from .importsource import import_source
from .metadata import Metadata
from .packpool import PackPool
from .reserve import SpaceReserve, on_full_disk
from .recovery import EXPORT_INTERRUPTED, INTERRUPTED
from .shadows import Ranges, Shadow, Shadows, complement
from .volumefile import VolumeFile
from .uploads import LeftUploads
from .storelocks import StoreLock

log = logging.getLogger(__name__)

#: Seconds before storing a shadow-backed snapshot is tried again after a failure;
#: doubled each time, up to STORE_RETRY_MAX.
STORE_RETRY_FIRST = 30.0
STORE_RETRY_MAX = 3600.0

WRITTEN_WHILE_READ = (
    "the volume was written while it was read (its size or times changed): this "
    "snapshot may not hold the volume of one instant. Snapshot a volume nobody writes "
    "(stop its VM, or fsfreeze the filesystem on it), or keep the volumes and the "
    "store on one XFS or btrfs filesystem: snapshots are clones of one instant there")

NO_OBJECT_STORAGE = ("Object Storage is not configured (set AWS_ENDPOINT_URL or "
                     "snapfs mount --s3-endpoint, and credentials)")


@dataclass(eq=False)
class SnapshotWork:
    """The bodies of the local service's jobs, over the store's parts (given by the
    service that holds this). Each job runs in ``jobs``; ``reader`` opens a
    snapshot for an export (LocalService._reader)."""

    md: Metadata
    index: ChunkIndex
    packs: PackFiles
    pool: PackPool
    objects: ObjectStorage | None
    index_lock: StoreLock
    io_limiter: trio.CapacityLimiter
    hash_limiter: trio.CapacityLimiter
    jobs: BackgroundJobs
    left_uploads: LeftUploads
    leases: VolumeLeases
    shadows: Shadows
    reader: Callable[[str, int], ImageReader]
    reserve: SpaceReserve

    def __post_init__(self) -> None:
        self._freeing: set[str] = set()  # snapshots whose delete's background half runs

    async def _reclaim(self) -> None:
        """Punch out the space of deleted chunks (queued in free_extents)."""
        await trio.to_thread.run_sync(self.index.reclaim_in_steps, self.packs.punch,
                                      limiter=self.io_limiter)

    async def release(self, snapshot_id: str, key: int) -> None:
        """The background half of a delete: the map in steps, then the space."""
        stop, ended = threading.Event(), trio.Event()
        token = trio.lowlevel.current_trio_token()

        def release() -> None:
            try:
                self.index.release_in_steps(key, snapshot_id, stop)
            finally:
                try:  # the thread's end, signalled to a cancelled caller waiting for it
                    trio.from_thread.run_sync(ended.set, trio_token=token)
                except trio.RunFinishedError:
                    pass
        self._freeing.add(snapshot_id)
        try:
            async with self.index_lock:
                try:
                    await trio.to_thread.run_sync(release, limiter=self.io_limiter,
                                                  abandon_on_cancel=True)
                except trio.Cancelled:
                    # The thread ends after its current step (the next open resumes
                    # the rest); the index stays locked until then, as another
                    # process's capture may not look up chunks that step frees.
                    stop.set()
                    with trio.CancelScope(shield=True):
                        await ended.wait()
                    raise
            await self._reclaim()
            # The packs a capture stopped by this delete cut (it left its map to us).
            await self._drop_cut_packs()
        finally:
            self._freeing.discard(snapshot_id)
        log.info("snapshot %s: its space is freed", snapshot_id)

    def freeing(self) -> bool:
        """Whether some delete's background half (map, then space) is not done."""
        return bool(self._freeing) or bool(self.md.deleting())

    async def _produce_map(self, snapshot_id: str, key: int,
                           work: Callable[[], Awaitable[int | None]]) -> bool:
        """Run ``work`` (which stores the snapshot's map); on any failure or
        cancellation, leave the snapshot in ``error`` (or ``invalid_data``) with the
        reason and its partial map released. True once the snapshot is available."""
        failed_state, reason = "error", INTERRUPTED
        try:
            same_as = await work()  # the map this one copied whole, if any
            await trio.to_thread.run_sync(write_completed, self.md, key, same_as,
                                          limiter=self.io_limiter)
            self.md.update_snapshot(snapshot_id, state="available", progress=100)
            log.info("snapshot %s available", snapshot_id)
            return True
        except trio.Cancelled:
            raise
        except SnapfsError as exc:
            # invalid_data says the image is bad; an InvalidAnswer only that one answer
            # of the server was (the object replaced mid-read): an error, to retry.
            failed_state = "invalid_data" if isinstance(exc, InvalidData) \
                and not isinstance(exc, InvalidAnswer) else "error"
            reason = str(exc)
        except OSError as exc:
            reason = f"reading the source failed: {exc.strerror or exc}"
        except Exception as exc:  # a bug or an unexpected failure: say what it was
            log.exception("capture of %s failed", snapshot_id)
            reason = f"internal error: {exc!r}"
        finally:
            state = self.md.live_state(snapshot_id)
            if state is None:  # deleted by another process: its delete frees the map
                log.info("snapshot %s was deleted while it was made", snapshot_id)
            elif state in PRODUCING_STATES:
                log.warning("snapshot %s failed: %s", snapshot_id, reason)
                await self._record_failure(snapshot_id, key, failed_state, reason)
        return False

    async def _record_failure(self, snapshot_id: str, key: int, state: str,
                              reason: str) -> None:
        """The failed snapshot's state, then its partial map given back (both with
        the space reserve: this frees space, like a delete)."""
        if not await self._recorded(
                f"snapshot {snapshot_id}: its failure",
                partial(self.md.update_snapshot, snapshot_id, state=state,
                        error_reason=reason),
                lambda: self.md.live_state(snapshot_id) in PRODUCING_STATES):
            return  # deleted meanwhile: its delete frees the map
        with trio.CancelScope(shield=True):
            try:
                async def release() -> None:
                    async with self.index_lock:
                        await trio.to_thread.run_sync(self.index.release_in_steps, key,
                                                      limiter=self.io_limiter)
                await on_full_disk(self.reserve, release)
                await self._reclaim()
                await self._drop_cut_packs()
            except StoreFull as exc:  # its rows stay the failed snapshot's: its delete
                log.warning("snapshot %s: its partial map is kept until it is deleted "
                            "(%s)", snapshot_id, exc)
            finally:
                await trio.to_thread.run_sync(self.reserve.ensure)

    async def _recorded(self, what: str, write: Callable[[], None],
                        wanted: Callable[[], bool] = lambda: True) -> bool:
        """``write()``, which ends a job's state, on a disk the job may have filled:
        with the space reserve, else tried again after a wait. Left unwritten, the
        state (``snapshotting``, ``exporting``) held for the process's life and kept
        the snapshot from deletion or its volume from removal. Shielded on the first
        try only: the next open records what a stopping service could not
        (recovery.py). True once written, False if no longer ``wanted()``."""
        async def call() -> None:
            write()
        wait, shield = 1.0, True
        while True:
            try:
                with trio.CancelScope(shield=shield):
                    if not wanted():
                        return False
                    await on_full_disk(self.reserve, call)
                    return True
            except StoreFull as exc:
                log.warning("%s cannot be recorded yet (%s); trying again in %.0f s",
                            what, exc, wait)
            shield = False
            await trio.sleep(wait)
            wait = min(wait * 2, 60.0)

    async def _drop_cut_packs(self) -> None:
        """The packs that failed captures retired, once no chunk lives in them
        (theirs were just released and punched): the file, then its row, so that
        all a failed capture wrote is given back without a remount. Only packs
        this process created: no other process ever appends to them."""
        if not self.pool.cut:
            return
        empty = set(self.index.empty_packs(exclude=self.pool.ours())) & self.pool.cut
        for pack in sorted(empty):
            await trio.to_thread.run_sync(self.packs.remove, pack, limiter=self.io_limiter)
            self.index.drop_pack(pack)
            self.pool.cut.discard(pack)
            log.info("pack %d removed: the failed capture that wrote it left no chunk "
                     "there", pack)

    async def _store(self, source: CaptureSource, snapshot_id: str, key: int) -> None:
        try:
            # Its buffers come out of the readers' share: the process's total stays
            # the budget's however captures and reads overlap (memory.py).
            with READERS.set_aside(CAPTURE_BYTES):
                await capture(source, snapshot_id, key, self.index, self.pool,
                              self.index_lock, self.hash_limiter)
        finally:
            await source.aclose()

    async def snapshot_by_clone(self, snapshot_id: str, key: int, volume_id: str,
                                 volume: VolumeFile, size: int) -> bool:
        """On XFS/btrfs (shadows.py): a durable clone of the volume makes its snapshot
        available before Create returns (as `zfs snapshot` or `btrfs subvolume
        snapshot` are done when they return); its chunks are then stored in the
        background, only those changed since the previous clone read. False: no
        clone (out of space?); the snapshot's row is made durable and the caller
        starts a capture that reads the volume."""
        with trio.CancelScope(shield=True):  # the row must not be left without its job
            try:
                shadow = await trio.to_thread.run_sync(self.shadows.clone, volume_id, key,
                                                       snapshot_id, volume, size,
                                                       limiter=self.io_limiter)
            except Exception:  # a bug: the capture can still read the volume
                log.exception("cloning the volume for snapshot %s failed", snapshot_id)
                shadow = None
            if shadow is None:
                self.md.sync()
                return False
            self.md.shadow_backed(snapshot_id, self.shadows.name(shadow))
        log.info("snapshot %s available (a clone of the volume); its chunks are "
                 "stored in the background", snapshot_id)
        self.jobs.start(snapshot_id, self._store_shadow, snapshot_id, key, volume_id, shadow,
                        size)
        return True

    async def run_capture(self, snapshot_id: str, key: int, volume_id: str,
                           volume: VolumeFile, size: int, lease: bool, ticket: Ticket) -> None:
        """A volume's snapshot read from the volume: a copy of the previous
        snapshot's map when the volume's read lease proves the file unchanged since
        that capture began (leases.py), else a capture of the volume under a lease
        taken first. No lease (``lease`` False) on XFS/btrfs, where a clone failed:
        it would cost writers that open with O_NONBLOCK (truncate(1)) an EAGAIN.
        Waits its turn in the capture queue first (capturequeue.py): the volume's
        earlier captures are done by then, so the lease can show it unchanged."""
        async with self.jobs.captures.turn(ticket):
            await self._capture_volume(snapshot_id, key, volume_id, volume, size, lease)

    async def _capture_volume(self, snapshot_id: str, key: int, volume_id: str,
                              volume: VolumeFile, size: int, lease: bool) -> None:
        held, base = None, None
        if lease:
            held, base = await self.leases.before_capture(volume_id, volume, size)

        async def work() -> int | None:
            if base is not None and await self._copy_map(snapshot_id, key, base):
                return base
            before = await trio.to_thread.run_sync(_written_stamp, volume.path)
            source = await trio.to_thread.run_sync(FileSource, volume, self.hash_limiter, size)
            await self._store(source, snapshot_id, key)
            log.info("snapshot %s: %d bytes read from the volume", snapshot_id,
                     source.bytes_read)
            if await trio.to_thread.run_sync(_written_stamp, volume.path) != before:
                log.warning("snapshot %s: %s", snapshot_id, WRITTEN_WHILE_READ)
                self.md.update_snapshot(snapshot_id, warning=WRITTEN_WHILE_READ)
            return None
        if await self._produce_map(snapshot_id, key, work) and held is not None:
            held.base = key

    async def _store_shadow(self, snapshot_id: str, key: int, volume_id: str,
                            shadow: Shadow, size: int) -> None:
        """Store a shadow-backed snapshot's chunks (cloned into packs, not written).
        The snapshot stays available throughout, read from its shadow. Failed (out
        of space, an I/O error), storing is tried again after STORE_RETRY_FIRST
        seconds, then twice as long each time: meanwhile the shadow pins the blocks
        the volume rewrites. Cancelled (a close, a delete), the next open starts
        over."""
        delay = STORE_RETRY_FIRST
        while not await self._try_storing(snapshot_id, key, volume_id, shadow, size, delay):
            if self.md.live_state(snapshot_id) is None:
                return  # deleted (by another process): its delete frees what was stored
            await trio.sleep(delay)
            delay = min(2 * delay, STORE_RETRY_MAX)
            await self._release_partial(key)
        # The earlier clones first: once the snapshot shows stored, its storing is
        # over (and a crash in between only means a full read next time).
        backing = self.md.needing_shadows()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.shadows.drop_older, volume_id, key, backing,
                                          self.md.snapshot_keys(), limiter=self.io_limiter)
            await trio.to_thread.run_sync(write_completed, self.md, key,
                                          limiter=self.io_limiter)
        self.md.stored(snapshot_id)
        log.info("snapshot %s: chunks stored", snapshot_id)

    async def _try_storing(self, snapshot_id: str, key: int, volume_id: str, shadow: Shadow,
                           size: int, retry: float) -> bool:
        try:
            captures = self.jobs.captures
            async with captures.turn(captures.ticket(volume_id, bounded=False)):
                only = await self._unchanged_copied(snapshot_id, key, volume_id, shadow, size)
                source = await trio.to_thread.run_sync(partial(
                    FileSource, str(shadow.path), self.hash_limiter, size, only=only,
                    clone=True))
                await self._store(source, snapshot_id, key)
            return True
        except (SnapfsError, OSError) as exc:
            if self.md.live_state(snapshot_id) is None:
                log.info("snapshot %s was deleted while its chunks were stored", snapshot_id)
                return False
            log.error("snapshot %s: storing its chunks failed (%s); it is read from its "
                      "clone meanwhile, and storing is tried again in %.0f s",
                      snapshot_id, exc, retry)
            return False

    async def _release_partial(self, key: int) -> None:
        """Whatever an earlier attempt (or a stopped process) stored of map ``key``."""
        async with self.index_lock:
            await trio.to_thread.run_sync(self.index.release_in_steps, key,
                                          limiter=self.io_limiter)
        await self._reclaim()
        await self._drop_cut_packs()

    async def resume_storing(self, snapshot_id: str, key: int, volume_id: str,
                              shadow: Shadow, size: int) -> None:
        await self._release_partial(key)
        await self._store_shadow(snapshot_id, key, volume_id, shadow, size)

    async def _unchanged_copied(self, snapshot_id: str, key: int, volume_id: str,
                                shadow: Shadow, size: int) -> Ranges | None:
        """With the volume's previous shadow (whose snapshot is still there): copy
        the map entries of the chunks both shadows share and return the chunks left
        to read. None: read them all."""
        prev = None
        for s in await trio.to_thread.run_sync(self.shadows.of_volume, volume_id):
            if s.key < key and self.md.map_usable(s.key, volume_id, size):
                prev = s
        if prev is None:
            return None
        changed = await trio.to_thread.run_sync(self.shadows.changed, prev, shadow, size,
                                                CHUNK_SIZE, limiter=self.io_limiter)
        if changed is None:
            return None
        count = (size + CHUNK_SIZE - 1) // CHUNK_SIZE
        if not await self._copy_map(snapshot_id, key, prev.key, complement(changed, count)):
            return None
        read = sum(last - first + 1 for first, last in changed)
        log.info("snapshot %s: %d of %d chunks changed since the volume's previous "
                 "clone; the rest reused", snapshot_id, read, count)
        return changed

    async def _copy_map(self, snapshot_id: str, key: int, base: int,
                        ranges: Ranges | None = None) -> bool:
        async with self.index_lock:
            if await trio.to_thread.run_sync(self.index.copy_map_in_steps, base, key,
                                             snapshot_id, ranges, limiter=self.io_limiter):
                if ranges is None:
                    log.info("snapshot %s: volume unchanged since the last snapshot's "
                             "capture began (lease held): its map reused", snapshot_id)
                return True
            await trio.to_thread.run_sync(self.index.release_in_steps, key,
                                          limiter=self.io_limiter)
        return False

    async def run_import(self, snapshot_id: str, key: int, bucket: str, obj: str,
                          size: int | None, ticket: Ticket) -> None:
        async def work() -> None:
            async with self.jobs.imports.turn(ticket):
                await read_object()

        async def read_object() -> None:
            if self.objects is None:
                raise PreconditionFailed(NO_OBJECT_STORAGE)
            zone = self.md.snapshot(None, snapshot_id).zone
            reader = await self.objects.open_qcow2(bucket, obj, zone=zone,
                                                   nursery=self.jobs.nursery)
            if size is not None and reader.size != size:
                await reader.aclose()
                raise InvalidData(f"size {size} does not match the image's virtual size "
                                  f"{reader.size}")
            self.md.update_snapshot(snapshot_id, size=reader.size)
            async with import_source(reader, self.hash_limiter) as source:
                await self._store(source, snapshot_id, key)
        await self._produce_map(snapshot_id, key, work)

    async def run_export(self, snapshot_id: str, task_id: str, bucket: str, obj: str) -> None:
        status, nbytes = "failure", 0
        error: str | None = EXPORT_INTERRUPTED
        shown = -1

        def progress(done: int, total: int) -> None:
            # One short commit per percent, not per part: each commit is a sync.
            nonlocal shown
            pct = min(99, done * 100 // max(total, 1))
            if pct != shown:
                shown = pct
                try:
                    self.md.update_task(task_id, progress=pct, bytes=done)
                except StoreFull:  # the store's disk, not the upload: progress can wait
                    shown = -1
        try:
            self.md.update_task(task_id, status="started")
            if self.objects is None:
                raise PreconditionFailed(NO_OBJECT_STORAGE)
            snap = self.md.snapshot(None, snapshot_id)
            reader = self.reader(snapshot_id, snap.size)
            try:
                nbytes = await self.objects.export_qcow2(
                    reader, bucket, obj, progress, zone=snap.zone,
                    left=partial(self.left_uploads.record, bucket, obj, snap.zone))
            finally:
                await reader.aclose()
            status, error = "success", None
        except SnapfsError as exc:
            error = str(exc)
        except Exception as exc:  # a bug or an unexpected failure: say what it was
            log.exception("export of %s failed", snapshot_id)
            error = f"internal error: {exc!r}"
        finally:
            fields: dict[str, object] = dict(status=status, error=error, terminated_at=now())
            if status == "success":
                fields.update(progress=100, bytes=nbytes)
            if error:
                log.warning("export of %s failed: %s", snapshot_id, error)
            else:
                log.info("export of %s done: %d bytes", snapshot_id, nbytes)

            def end() -> None:
                with self.md.transaction():
                    self.md.update_task(task_id, **fields)
                    self.md.update_snapshot(snapshot_id, state="available")
            await self._recorded(f"export of {snapshot_id}: its end", end)


def _written_stamp(path: str) -> tuple[int, int, int, int]:
    """What writes to a file change: its size, modification and change times (and
    its inode, should the path be replaced).
    write(2), O_DIRECT and loop devices update them; a shared mapping does on its
    first write to each clean page. A block device's node keeps its times: no
    stamp shows writes there."""
    st = os.stat(path, follow_symlinks=False)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
