"""The local backend: the snapshot service on an embedded store.

``<store>/metadata.db`` (SQLite, see schema.py), ``<store>/packs/`` (chunk
bytes, see chunks.py), ``<store>/volumes/`` (files made by ``volume create``).
Captures, imports and exports run as tasks in the service's nursery.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from dataclasses import replace
from pathlib import Path

import trio

from ..errors import (CorruptData, InvalidArgument, NotConfigured, PreconditionFailed,
                      SnapfsError, StoreFull, TooLarge, TooManyOpen, VolumeChanged)
from ..model import (DEFAULT_ZONE, ZONES, BaseVolume, FileAccess, Page,
                     Project, Snapshot, Task, Volume, check_name, check_paging, check_readable,
                     check_size, check_tags, check_uuid, check_volume_type, check_zone,
                     export_href, new_id, now)
from ..objects import ObjectStorage, check_object_target
from ..qcow2.format import MAX_VIRTUAL_SIZE
from ..service import ImageReader, SnapshotService
from . import extents, leases
from .chunkindex import ChunkIndex, Location
from .packpool import PackPool
from .chunks import PackFiles
from .image import LocalImageReader, ShadowReader
from .background import BackgroundJobs
from .jobs import NO_OBJECT_STORAGE, SnapshotWork
from .metadata import Metadata
from .adoption import Adoption
from .recovery import DELETING
from ..rlimits import images_allowed
from .reserve import SpaceReserve, on_full_disk
from .shadows import Shadows
from .volumefile import Inspected, VolumeFile, inspected, open_volume
from .volumes import LocalVolumes
from .uploads import LeftUploads
from .storelocks import ReaderLocks, StoreLock

log = logging.getLogger(__name__)

__all__ = ["LocalService", "NO_OBJECT_STORAGE"]

#: Seconds a delete waits for the readers of its snapshot to close before it is
#: refused: one that was just closed lets go only once its mount hears of it.
READER_GRACE = 1.0


class LocalService(SnapshotService):
    """The service over a store's parts. Its background work (captures, imports,
    exports, the halves of deletes, the storing of clones) is ``work``, run as jobs
    of ``jobs``, which owns their nursery and queues (background.py); a service is
    used inside open_local_service() (opening.py), which opens and closes both."""

    def __init__(self, store: Path, objects: ObjectStorage | None,
                 readonly: bool = False) -> None:
        self.store = store
        self.objects = objects
        self.readonly = readonly
        self.md = Metadata(store / "metadata.db", readonly=readonly)
        self.index = ChunkIndex(self.md)
        self.packs = PackFiles(store / "packs", create=not readonly)
        self.pool = PackPool(self.packs, self.index)
        # Both across processes too (storelocks.py): mounts and `serve` share stores.
        self.index_lock = StoreLock(store / "lock")
        self.reader_locks = ReaderLocks(store / "lock")
        self.io_limiter = trio.CapacityLimiter(4)
        self.hash_limiter = trio.CapacityLimiter(2)
        self.jobs = BackgroundJobs()  # the nursery and queues of the work below
        self.left_uploads = LeftUploads(self.md, objects)  # uploads failed exports left
        #: Snapshots whose delete has begun (in this process): no new reader or
        #: export may start on them while it stops their capture.
        self._deleting: set[str] = set()
        self._open_images = 0  # readers open_image gave, not closed yet (rlimits.py)
        self._leases = leases.VolumeLeases()  # read leases on volume files
        self.shadows = Shadows(store / "shadows")  # volume clones on XFS/btrfs
        self.reserve = SpaceReserve(store)  # so that deletes work on a full disk
        self.volumes = LocalVolumes(store, self.md, self._leases, self.shadows)
        self.work = SnapshotWork(self.md, self.index, self.packs, self.pool, objects,
                                 self.index_lock, self.io_limiter, self.hash_limiter, self.jobs,
                                 self.left_uploads, self._leases, self.shadows, self._reader,
                                 self.reserve)
        #: What stopped processes left half done: found, claimed and resumed here.
        self.adoption = Adoption(self.md, self.index, self.packs, objects, self.index_lock,
                                 self.jobs, self.work, self.shadows)

    @property
    def organization(self) -> str:
        return self.md.organization

    # --- hierarchy -------------------------------------------------------------------

    async def list_zones(self) -> list[str]:
        return [DEFAULT_ZONE] + [z for z in ZONES if z != DEFAULT_ZONE]

    async def list_projects(self) -> list[Project]:
        return self.md.projects()

    async def create_project(self, name: str) -> Project:
        return self.md.add_project(check_name(name))

    async def list_volumes(self, zone: str, *, project: str | None = None,
                           name: str | None = None, per_page: int | None = None,
                           page: int | None = None) -> Page[Volume]:
        per_page, page = check_paging(per_page, page)
        return self.md.list_volumes(check_zone(zone), project, name, per_page, page)

    async def get_volume(self, zone: str, volume_id: str) -> Volume:
        return self.md.volume(check_zone(zone), volume_id)

    # The volumes' files and rows: volumes.py.

    async def add_volume(self, name: str, path: str | os.PathLike[str], *,
                         zone: str = DEFAULT_ZONE, project: str | None = None,
                         volume_type: str = "b_ssd") -> Volume:
        return await self.volumes.add(name, path, zone, project, volume_type)

    async def repoint_volume(self, ref: str, path: str | os.PathLike[str],
                             zone: str | None = None) -> Volume:
        return await self.volumes.repoint(ref, path, zone)

    async def create_volume(self, name: str, size: int, *, zone: str = DEFAULT_ZONE,
                            project: str | None = None, volume_type: str = "b_ssd") -> Volume:
        return self.volumes.create(name, size, zone, project, volume_type)

    async def remove_volume(self, ref: str, zone: str | None = None) -> Volume:
        return await self.volumes.remove(ref, zone)

    async def update_volume(self, zone: str, volume_id: str, *, name: str | None = None,
                            tags: list[str] | None = None) -> Volume:
        return self.volumes.update(zone, volume_id, name, tags)

    async def delete_volume(self, zone: str, volume_id: str) -> None:
        await self.volumes.delete(zone, volume_id)

    async def list_all_volumes(self) -> list[Volume]:
        return self.md.all_volumes()

    def store_version(self) -> object:
        # This process's changes (another process's show at the next page 1).
        return self.md.changes

    # --- snapshots -------------------------------------------------------------------

    async def list_snapshots(self, zone: str, *, organization: str | None = None,
                             project: str | None = None, name: str | None = None,
                             tags: list[str] | None = None, base_volume_id: str | None = None,
                             per_page: int | None = None, page: int | None = None
                             ) -> Page[Snapshot]:
        per_page, page = check_paging(per_page, page)
        return self.md.list_snapshots(check_zone(zone), organization, project, name, tags,
                                      base_volume_id, per_page, page)

    async def list_all_snapshots(self, zone: str, *, organization: str | None = None,
                                 project: str | None = None, name: str | None = None,
                                 tags: list[str] | None = None,
                                 base_volume_id: str | None = None,
                                 volume_types: tuple[str, ...] | None = None
                                 ) -> list[Snapshot]:
        return self.md.all_snapshots(check_zone(zone), organization, project, name, tags,
                                     base_volume_id, volume_types)

    async def get_snapshot(self, zone: str, snapshot_id: str) -> Snapshot:
        return self.md.snapshot(check_zone(zone), snapshot_id)

    async def create_snapshot(self, zone: str, *, name: str, volume_id: str | None = None,
                              tags: list[str] | None = None, project: str | None = None,
                              organization: str | None = None, volume_type: str | None = None,
                              bucket: str | None = None, key: str | None = None,
                              size: int | None = None, unique_name: bool = False) -> Snapshot:
        check_zone(zone)
        check_name(name)
        tags = check_tags(tags if tags is not None else [])
        if project is not None and organization is not None:
            raise InvalidArgument("project", "give project or organization, not both")
        if volume_type is not None:
            check_volume_type(volume_type)
        if volume_id is not None and (bucket is not None or key is not None):
            raise InvalidArgument("volume_id", "give a volume or a bucket/key, not both")
        if volume_id is not None and size is not None:  # a capture's size is the volume's
            raise InvalidArgument("size", "only with bucket and key (an import)")
        if volume_id is None:
            return self._create_import(zone, name, tags, project, organization, volume_type,
                                       bucket, key, size, unique_name)
        vol = self.md.volume(zone, check_uuid("volume_id", volume_id))
        proj = self._owner(project, organization, default=vol.project)
        vf = VolumeFile(vol.name, str(vol.path), self.md.volume_identity(vol.id))
        t = now()
        snap = Snapshot(id=new_id(), name=name, organization=proj.organization, project=proj.id,
                        tags=tags, volume_type=volume_type or vol.volume_type, size=vol.size,
                        state="snapshotting", base_volume=BaseVolume(vol.id, vol.name),
                        creation_date=t, modification_date=t, error_reason=None, zone=zone,
                        progress=0)
        try:
            found, cloneable = await trio.to_thread.run_sync(self._probe, vf)
        except VolumeChanged as exc:  # a snapshot in error says why, as a capture's would
            snap = replace(snap, state="error", error_reason=str(exc))
            self.md.insert_snapshot(snap, None, unique_name=unique_name)
            log.warning("snapshot %s (%s) failed: %s", snap.id, name, exc)
            return snap
        if vf.identity is None:  # registered before identities were: trust on first use
            log.info("volume %s (%s): recording the identity of %s (%s)", vol.id, vol.name,
                     vf.path, found.identity)
            self.md.set_volume_file(vol.id, found.identity)
            vf = replace(vf, identity=found.identity)
        nbytes = found.size
        if nbytes != vol.size:
            self.md.set_volume_size(vol.id, nbytes)
        snap = replace(snap, size=nbytes,
                       access=FileAccess(found.uid, found.gid, found.mode))
        # A clone's snapshot is available before Create returns, and that commit syncs
        # this one too; without a clone, _snapshot_by_clone syncs it.
        # Refused before any row when the queue is full.
        ticket = self.jobs.captures.ticket(vol.id)
        try:
            key_ = self.md.insert_snapshot(snap, None, durable=not cloneable,
                                           unique_name=unique_name)
            log.info("snapshot %s (%s): capturing volume %s", snap.id, name, vol.name)
            if cloneable and await self.work.snapshot_by_clone(snap.id, key_, vol.id,
                                                           vf, nbytes):
                self.jobs.captures.give_back(ticket)  # its storing takes a ticket of its own
                return self.md.snapshot(zone, snap.id)
        except BaseException:
            self.jobs.captures.give_back(ticket)
            raise
        self.jobs.start(snap.id, self.work.run_capture, snap.id, key_, vol.id, vf, nbytes,
                        not cloneable, ticket)
        return snap

    def _probe(self, vf: VolumeFile) -> tuple[Inspected, bool]:
        """The volume's file as it is now (refused if it is not the one registered),
        and whether its snapshots can be clones (shadows.py)."""
        fd, st = open_volume(vf)
        try:
            return inspected(vf, fd, st), self.shadows.possible(fd, st)
        finally:
            os.close(fd)

    def _owner(self, project: str | None, organization: str | None,
               default: str | None = None) -> Project:
        if project is not None:
            return self.md.project(check_uuid("project", project))
        if organization is not None and organization != self.organization:
            raise InvalidArgument("organization", f"unknown organization {organization!r}")
        return self.md.project(default or "default")

    def _create_import(self, zone: str, name: str, tags: list[str], project: str | None,
                       organization: str | None, volume_type: str | None,
                       bucket: str | None, key: str | None, size: int | None,
                       unique_name: bool = False) -> Snapshot:
        bucket, key = check_object_target(bucket, key)
        if size is not None:
            check_size(size)
        if self.objects is None:  # refused now, not as a snapshot in error later
            raise NotConfigured(f"cannot import s3://{bucket}/{key}: {NO_OBJECT_STORAGE}")
        proj = self._owner(project, organization)
        t = now()
        snap = Snapshot(id=new_id(), name=name, organization=proj.organization, project=proj.id,
                        tags=tags, volume_type=volume_type or "b_ssd", size=size or 0,
                        state="importing", base_volume=None, creation_date=t,
                        modification_date=t, error_reason=None, zone=zone, progress=0)
        ticket = self.jobs.imports.ticket(None)
        try:
            key_ = self.md.insert_snapshot(snap, {"bucket": bucket, "key": key, "size": size},
                                           unique_name=unique_name)
        except BaseException:
            self.jobs.imports.give_back(ticket)
            raise
        log.info("snapshot %s (%s): importing s3://%s/%s", snap.id, name, bucket, key)
        self.jobs.start(snap.id, self.work.run_import, snap.id, key_, bucket, key, size, ticket)
        return snap

    async def set_snapshot(self, zone: str, snapshot: Snapshot) -> Snapshot:
        cur = await self.get_snapshot(zone, snapshot.id)
        snapshot.check_set(cur)
        # Only what changes is checked against the rules (a name stored before
        # them stays settable alongside new tags).
        return await self.update_snapshot(
            zone, snapshot.id, name=None if snapshot.name == cur.name else snapshot.name,
            tags=None if snapshot.tags == cur.tags else snapshot.tags)

    async def update_snapshot(self, zone: str, snapshot_id: str, *, name: str | None = None,
                              tags: list[str] | None = None,
                              unique_name: bool = False) -> Snapshot:
        self.md.snapshot(check_zone(zone), snapshot_id)
        fields: dict[str, object] = {}
        if name is not None:
            fields["name"] = check_name(name)
        if tags is not None:
            fields["tags"] = check_tags(tags)
        if fields:
            self.md.update_snapshot(snapshot_id, unique_name=unique_name, **fields)
        return self.md.snapshot(zone, snapshot_id)

    async def delete_snapshot(self, zone: str, snapshot_id: str) -> None:
        """Returns once the snapshot is gone from List and Get; its map is released
        and its space punched out in the background, like ``zfs destroy`` (a
        million-chunk map takes ~16 s; schema v4: resumed after a crash)."""
        snap = self.md.snapshot(check_zone(zone), snapshot_id)
        if snap.state == "exporting":
            raise PreconditionFailed(f"snapshot {snap.name!r} is {snap.state}; "
                                     "it can be deleted once that ends")
        if snapshot_id in self._deleting:
            raise PreconditionFailed(f"snapshot {snap.name!r} is already being deleted")
        # Its reader lock, exclusively: no reader of any process has it open, and
        # none can open it until it is marked deleting (storelocks.py).
        held = await self.reader_locks.exclusive(snapshot_id, READER_GRACE)
        if held is None:
            raise PreconditionFailed(f"snapshot {snap.name!r} is open for reading "
                                     "(here or in another process on this store)")
        self._deleting.add(snapshot_id)
        try:
            key = self.md.snap_key(snapshot_id)
            # Durably first: from here on the snapshot is gone to everyone, and a
            # crash while its map is half released leaves nothing that reads as holes.
            # In one transaction with the check of its state: an export another
            # process starts meanwhile either wins or finds it gone.
            async def mark() -> bool:
                return self.md.mark_deleting(snapshot_id, DELETING)
            if not await on_full_disk(self.reserve, mark):
                now_ = self.md.snapshot(None, snapshot_id)  # NotFound: deleted meanwhile
                raise PreconditionFailed(f"snapshot {snap.name!r} is {now_.state}; "
                                         "it can be deleted once that ends")
            # Then a capture or import queued or in flight is stopped: marked first, it
            # sees a deleted snapshot (as if another process deleted it) and leaves
            # its map to the release below; stopped first, it would record the
            # cancellation as the service stopping (state error, INTERRUPTED), which
            # Get showed until the mark.
            await self.jobs.stop(snapshot_id)
        finally:
            self._deleting.discard(snapshot_id)
            os.close(held)
        log.info("snapshot %s (%s) deleted; its space is freed in the background",
                 snapshot_id, snap.name)
        self.jobs.start(snapshot_id, self._release, snapshot_id, key)
        # Its shadow pins the blocks the volume rewrote since (shadows.py).
        await trio.to_thread.run_sync(self.shadows.drop_snapshot, snapshot_id)

    async def _release(self, snapshot_id: str, key: int) -> None:
        """The background half of a delete, which a full disk only delays: it is
        tried again (with the reserve's next step, else after a wait) until done."""
        wait = 1.0
        try:
            while True:
                try:
                    await on_full_disk(self.reserve, lambda: self.work.release(snapshot_id, key))
                    return
                except StoreFull as exc:
                    log.warning("snapshot %s: its space cannot be freed yet (%s); trying "
                                "again in %.0f s", snapshot_id, exc, wait)
                await trio.sleep(wait)
                wait = min(wait * 2, 60.0)
        finally:
            with trio.CancelScope(shield=True):  # given up? topped up again
                await trio.to_thread.run_sync(self.reserve.ensure)

    def storing(self) -> bool:
        """Whether some snapshot is still read from its shadow (chunks being stored)."""
        return bool(self.md.shadow_backed_snapshots())

    # --- export ----------------------------------------------------------------------

    async def export_snapshot(self, zone: str, snapshot_id: str, *, bucket: str,
                              key: str) -> Task:
        snap = self.md.snapshot(check_zone(zone), snapshot_id)
        bucket, key = check_object_target(bucket, key)
        if snap.state != "available":
            raise PreconditionFailed(f"snapshot {snap.name!r} is {snap.state}, not available")
        if snap.size > MAX_VIRTUAL_SIZE:  # an object no import (ours) would take back
            raise TooLarge(f"snapshot {snap.name!r} is {snap.size} bytes: an export holds "
                           f"at most {MAX_VIRTUAL_SIZE} ({MAX_VIRTUAL_SIZE >> 40} TiB), "
                           "what an import takes back")
        if self.objects is None:  # refused now, not as a failed task later
            raise NotConfigured(f"cannot export snapshot {snapshot_id} to s3://{bucket}/{key}"
                                f": {NO_OBJECT_STORAGE}")
        if snapshot_id in self._deleting:
            raise PreconditionFailed(f"snapshot {snap.name!r} is being deleted")
        task = Task(id=new_id(), description="export_snapshot", progress=0, status="pending",
                    zone=zone, started_at=now(), bucket=bucket, key=key,
                    href_from=export_href(snapshot_id))
        with self.md.transaction():
            # Exporting keeps deletes away (in every process): set only if no delete
            # has begun, in one statement (Metadata.mark_deleting).
            if not self.md.start_export(snapshot_id):
                raise PreconditionFailed(f"snapshot {snap.name!r} is no longer available")
            self.md.insert_task(task, snapshot_id)
        log.info("snapshot %s: exporting to s3://%s/%s (task %s)", snapshot_id, bucket, key,
                 task.id)
        self.jobs.start(snapshot_id, self.work.run_export, snapshot_id, task.id, bucket, key)
        return task

    async def get_task(self, zone: str, task_id: str) -> Task:
        return self.md.task(check_zone(zone), task_id)

    async def latest_export(self, zone: str, snapshot_id: str) -> Task | None:
        self.md.snapshot(check_zone(zone), snapshot_id)
        return self.md.latest_task(snapshot_id)

    # --- allocation (extents.py) -------------------------------------------------------

    knows_allocation = True

    async def stored_bytes(self, zone: str, snapshot_id: str) -> int | None:
        return await extents.snapshot_stored_bytes(self.md, zone, snapshot_id)

    async def allocated_extents(self, zone: str, snapshot_id: str
                                ) -> list[tuple[int, int, bool]]:
        return await extents.snapshot_allocation(self.md, zone, snapshot_id)

    async def changed_extents(self, zone: str, snapshot_id: str, other_id: str
                              ) -> list[tuple[int, int, bool]]:
        return await extents.snapshot_changes(self.md, zone, snapshot_id, other_id)

    # --- data ------------------------------------------------------------------------

    async def open_image(self, zone: str, snapshot_id: str) -> ImageReader:
        snap = self.md.snapshot(check_zone(zone), snapshot_id)
        self._check_readable(snap)
        # The reader lock first, then the state again: a delete (of any process)
        # either finished marking it before, or cannot begin until the reader closes.
        allowed = images_allowed(self.packs.open_count())
        if self._open_images >= allowed:
            raise TooManyOpen(f"{self._open_images} snapshot images are open in this "
                              f"process, all its limit on open files allows ({allowed}, "
                              "with room kept for the store's own files): close some")
        held = await self.reader_locks.share(snapshot_id)
        try:
            snap = self.md.snapshot(zone, snapshot_id)
            self._check_readable(snap)
        except BaseException:
            os.close(held)
            raise
        return self._reader(snapshot_id, snap.size, held)

    def _check_readable(self, snap: Snapshot) -> None:
        check_readable(snap)
        if snap.id in self._deleting:
            raise PreconditionFailed(f"snapshot {snap.name!r} is being deleted")

    def _reader(self, snapshot_id: str, size: int, held: int | None = None) -> ImageReader:
        """A reader that keeps the snapshot from being deleted under it: deleting
        punches its chunks out, which a reader would see as corruption. ``held``:
        a descriptor holding the snapshot's reader lock (storelocks.py), closed
        with the reader (an export needs none: its state keeps deletes away). Of
        its shadow while its chunks are being stored (shadows.py)."""
        def closed() -> None:
            if held is not None:
                os.close(held)
                self._open_images -= 1
        if held is not None:
            self._open_images += 1
        try:
            shadow = self.md.shadow_of(snapshot_id)
            if shadow is not None:
                try:
                    return ShadowReader(self.shadows.root / shadow, size, self.io_limiter,
                                        self.jobs.nursery, closed)
                except OSError as exc:
                    # Unless its chunks were stored meanwhile (maybe by another
                    # process) and the clone dropped since: then its map is whole.
                    if self.md.shadow_of(snapshot_id) is not None:
                        raise CorruptData(f"the clone holding this snapshot's data is "
                                          f"gone: {exc.strerror}") from None
            return LocalImageReader(self.md.snap_key(snapshot_id), size, self.index,
                                    self.packs, self.io_limiter, self.jobs.nursery,
                                    on_close=closed,
                                    on_damaged=None if self.readonly else self._damaged)
        except BaseException:
            closed()
            raise

    def _damaged(self, loc: Location) -> None:
        """A reader found a chunk's bytes bad: marked damaged (see
        LocalImageReader._noting), once, with one log line; a store that cannot
        take the mark now (busy, full) leaves it to fsck --repair."""
        try:
            cid = self.index.mark_damaged_at(loc)
        except (SnapfsError, sqlite3.Error) as exc:
            log.warning("chunk in pack %d at %d read bad and could not be marked damaged: %s",
                        loc.pack, loc.offset, exc)
            return
        if cid is not None:
            log.warning("chunk %d (pack %d at %d) read bad: marked damaged; the next "
                        "snapshot or import holding its bytes stores them anew",
                        cid, loc.pack, loc.offset)

    def freeing(self) -> bool:
        """Whether some delete's background half (map, then space) is not done."""
        return self.work.freeing()

    async def aclose(self) -> None:
        await self.jobs.aclose()  # the orphan sweep first, then every job
        self.left_uploads.stop()
        self._leases.close()

