"""image.raw for cloud snapshots.

The Instance API has no block read. The first open of a snapshot's image
exports it (Export snapshot -> a QCOW2 object) to the staging bucket, and reads
are then served from that object by the Object Storage layer's QCOW2 reader
(``ObjectStorage.open_qcow2``: ranged GETs, L1/L2 tables cached, read-ahead,
parallel ranges -- never a whole download).

Snapshot data is immutable, so an export is named by the snapshot's id and
creation date: any later open -- from this process or another one -- that finds
the object reuses it. An export only appears once complete (multipart upload),
so an object that opens is a whole image; one of the wrong size is stale and
replaced. An open exports at most once: concurrent opens of one snapshot share
one export and its outcome, and an export whose object is missing or of another
size than the snapshot's fails the open (and those sharing it), saying which.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import trio

from ..errors import NotFound, NotPermitted, PreconditionFailed, SnapfsError
from ..model import Snapshot, Task, check_readable
from ..objects import ObjectStorage
from ..service import ImageReader, SnapshotService


log = logging.getLogger("snapfs.scaleway")

#: Object key prefix of staging exports inside the staging bucket.
STAGING_PREFIX = "snapfs-staging/"
#: Polling an export: first interval, growth, cap (seconds); and how long to wait
#: for a snapshot busy with someone else's export before trying again.
POLL_FIRST, POLL_GROWTH, POLL_CAP = 0.1, 1.5, 5.0
EXPORT_TIMEOUT = 6 * 3600.0


def staging_key(snap: Snapshot) -> str:
    """The staging object of one snapshot's data (id + creation date: immutable)."""
    token = hashlib.sha256(f"{snap.id}\0{snap.creation_date}".encode()).hexdigest()[:16]
    return f"{STAGING_PREFIX}{snap.zone}/{snap.id}-{token}.qcow2"


@dataclass
class _Export:
    """One export under way, shared by the opens that wait for it."""

    done: trio.Event = field(default_factory=trio.Event)
    exported: bool = False  # the export finished (its open was not interrupted)
    error: SnapfsError | None = None


class CloudImages:
    def __init__(self, service: SnapshotService, bucket: str | None,
                 objects: ObjectStorage | None, nursery: trio.Nursery | None = None,
                 export: Callable[..., Awaitable[Task]] | None = None) -> None:
        self.service = service
        #: How a staging export is made: the service's own, which may write under
        #: STAGING_PREFIX (its users' exports may not).
        self.export = export or service.export_snapshot
        self.nursery = nursery  # the service's: readers' read-ahead runs there
        self.bucket = bucket
        self.objects = objects
        self._exports: dict[str, _Export] = {}
        self.exports_started = 0  # tests and the benchmark read it

    async def open(self, zone: str, snapshot_id: str) -> ImageReader:
        if not self.bucket or self.objects is None:
            raise NotPermitted("image.raw of a cloud snapshot needs --staging-bucket (and "
                               "Object Storage credentials) to export it to")
        snap = await self.service.get_snapshot(zone, snapshot_id)
        check_readable(snap)
        key = staging_key(snap)
        with trio.fail_after(EXPORT_TIMEOUT):
            while True:
                reader = await self._open_existing(snap, key)
                if reader is not None:
                    return reader
                shared = self._exports.get(key)
                if shared is None:
                    break
                await shared.done.wait()  # another open is exporting it: share that
                if shared.error is not None:
                    raise shared.error.with_traceback(None)
                if shared.exported:
                    return await self._open_exported(snap, key)
                # The open that exported was cancelled midway: look again.
            shared = self._exports[key] = _Export()
            try:
                await self._export(snap, key)
                shared.exported = True
                return await self._open_exported(snap, key)
            except SnapfsError as exc:
                shared.error = exc
                raise
            finally:
                del self._exports[key]
                shared.done.set()

    async def _open_exported(self, snap: Snapshot, key: str) -> ImageReader:
        """The object the export just wrote, or why it is not the snapshot's image
        (no second export: one that wrote the wrong thing would do it again)."""
        assert self.objects is not None and self.bucket is not None
        where = f"s3://{self.bucket}/{key}"
        try:
            reader = await self.objects.open_qcow2(self.bucket, key, zone=snap.zone,
                                                   nursery=self.nursery)
        except NotFound:
            raise SnapfsError(f"export of snapshot {snap.name!r} reported success but "
                              f"{where} is missing") from None
        if reader.size != snap.size:
            await reader.aclose()
            raise SnapfsError(f"export of snapshot {snap.name!r}: {where} holds an image of "
                              f"{reader.size} bytes, the snapshot has {snap.size}")
        return reader

    async def _open_existing(self, snap: Snapshot, key: str) -> ImageReader | None:
        assert self.objects is not None and self.bucket is not None
        try:
            reader = await self.objects.open_qcow2(self.bucket, key, zone=snap.zone,
                                                   nursery=self.nursery)
        except NotFound as exc:
            if getattr(exc, "resource", "") == "bucket":
                raise  # the staging bucket itself is missing: say so, do not export
            return None
        if reader.size != snap.size:
            log.info("staging export %s has %d bytes, snapshot %s has %d: exporting again",
                     key, reader.size, snap.id, snap.size)
            await reader.aclose()
            return None
        return reader

    async def forget(self, snap: Snapshot) -> None:
        """The snapshot is deleted: so is its staging export, if any (best effort:
        a failure is one warning, the snapshot is gone either way)."""
        if not self.bucket or self.objects is None:
            return
        key = staging_key(snap)
        try:
            await self.objects.delete_object(self.bucket, key, zone=snap.zone)
        except SnapfsError as exc:
            log.warning("snapshot %s deleted, but not its staging export s3://%s/%s: %s",
                        snap.id, self.bucket, key, exc)

    async def _export(self, snap: Snapshot, key: str) -> None:
        """Export ``snap`` to the staging key and wait for it to finish."""
        svc = self.service
        delay = POLL_FIRST
        while True:
            try:
                task = await self.export(snap.zone, snap.id, bucket=self.bucket or "",
                                         key=key)
                break
            except PreconditionFailed:
                # Busy (someone else's export): wait for it to become available again.
                current = await svc.get_snapshot(snap.zone, snap.id)
                check_readable(current)
                await trio.sleep(delay)
                delay = min(delay * POLL_GROWTH, POLL_CAP)
        self.exports_started += 1
        log.info("snapshot %s: exporting to s3://%s/%s for image.raw (task %s)", snap.id,
                 self.bucket, key, task.id)
        use_task = True
        delay = POLL_FIRST
        while True:
            await trio.sleep(delay)
            delay = min(delay * POLL_GROWTH, POLL_CAP)
            if use_task:
                try:
                    task = await svc.get_task(snap.zone, task.id)
                except NotFound:
                    use_task = False  # an API without Get task: follow the snapshot state
                else:
                    if task.status == "success":
                        return
                    if task.status == "failure":
                        raise SnapfsError(f"export of snapshot {snap.name!r} to "
                                          f"s3://{self.bucket}/{key} failed: "
                                          f"{task.error or 'the API does not say why'}")
                    continue
            current = await svc.get_snapshot(snap.zone, snap.id)
            if current.state != "exporting":
                check_readable(current)
                return  # the caller opens the object: missing means it failed

    async def aclose(self) -> None:
        pass


