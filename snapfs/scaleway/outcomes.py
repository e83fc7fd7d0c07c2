"""What the Block Storage API leaves unsaid about exports and imports, found out
from Object Storage.

A Block export has no task: the ``export`` file's status is derived from the
snapshot's (``exporting`` -> started, back to available -> done). The snapshot
goes back to available whether the export wrote its object or not, so "done"
is only ``success`` once the object has landed: it exists, its size is one a
QCOW2 image of the snapshot can have, it was written since this export began
(not left by an earlier one at the same key) and it is an image of the
snapshot's size. Anything else is ``failure`` with what was found.

An Instance export has a task, whose ``success`` says the job ended, not that
the object is there: it is checked the same way before it is shown as
``success`` (InstanceExports).

A failed Block import is a snapshot in ``error`` with no reason (Block
snapshots carry none): for an import made through this process, the reason is
looked up in Object Storage (the object missing, not a QCOW2 image, of another
size than asked) once, and shown as its ``error_reason``.

Everything here is bounded (LRUDict): a mount that runs for months forgets the
oldest exports and imports, which then show what the API says and no more.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from .. import block_model
from ..errors import InvalidAnswer, InvalidData, NotFound, SnapfsError
from ..lru import LRUDict
from ..model import FAILED_STATES, Snapshot, Task
from ..objects import ObjectStorage

#: S3's Last-Modified has whole seconds and the storage's clock is not ours: an
#: object this export wrote may be dated up to this much before the export began.
WRITTEN_SLACK = 2.0
#: The smallest QCOW2 file: a header cluster, L1 and refcount tables and a
#: refcount block, with 512-byte clusters (the smallest); less is no image.
MIN_QCOW2 = 4 * 512
#: Exports and imports remembered (see the module docstring).
REMEMBERED = 4096


def max_qcow2(virtual_size: int) -> int:
    """The most a QCOW2 image of ``virtual_size`` bytes can take: every cluster
    allocated, plus L2 tables (8 bytes per 512-byte cluster at worst, 1/64) and
    refcounts (2 bytes per cluster, 1/256), with room to spare."""
    return virtual_size + virtual_size // 16 + (4 << 20)


async def export_landed(objects: ObjectStorage, bucket: str, key: str, zone: str,
                        size: int, started: dt.datetime | None) -> str | None:
    """None when s3://bucket/key is what an export of a ``size``-byte snapshot
    begun at ``started`` (None: unknown) writes; else why it is not."""
    where = f"s3://{bucket}/{key}"
    try:
        info = await objects.head_object(bucket, key, zone=zone)
    except NotFound:
        return f"{where} is missing after the export"
    except SnapfsError as exc:
        return f"{where} could not be checked after the export: {exc}"
    if info.size < MIN_QCOW2:
        return f"{where} has {info.size} bytes: too small to be a QCOW2 image"
    if size and info.size > max_qcow2(size):
        return (f"{where} has {info.size} bytes: too large for a QCOW2 image of the "
                f"snapshot's {size} bytes")
    if started is not None and \
            info.last_modified < started - dt.timedelta(seconds=WRITTEN_SLACK):
        return (f"{where} was last written at {info.last_modified.isoformat()}, before "
                f"this export began at {started.isoformat()}: the export did not write it")
    try:
        reader = await objects.open_qcow2(bucket, key, zone=zone)
    except SnapfsError as exc:
        return f"{where} after the export: {exc}"
    virtual = reader.size
    await reader.aclose()
    if size and virtual != size:
        return f"{where} holds an image of {virtual} bytes, the snapshot has {size}"
    return None


async def import_failure(objects: ObjectStorage | None, bucket: str, key: str, zone: str,
                         size: int | None) -> str:
    """Why an import of s3://bucket/key (``size``: the size asked, if any) failed,
    as far as Object Storage can tell."""
    where = f"s3://{bucket}/{key}"
    if objects is None:
        return f"the import of {where} failed (the Block API does not say why)"
    try:
        reader = await objects.open_qcow2(bucket, key, zone=zone)
    except NotFound as exc:
        if getattr(exc, "resource", "") == "bucket":
            return f"the import of {where} failed: bucket {bucket} does not exist"
        return f"the import of {where} failed: the object does not exist"
    except InvalidAnswer as exc:  # one answer of the server, not the object's bytes
        return f"the import of {where} failed: the object could not be read: {exc}"
    except InvalidData as exc:
        return f"the import of {where} failed: the object is not a QCOW2 image: {exc}"
    except SnapfsError as exc:
        return (f"the import of {where} failed (the Block API does not say why; the "
                f"object could not be read: {exc})")
    virtual = reader.size
    await reader.aclose()
    if size is not None and virtual != size:
        return (f"the import of {where} failed: the object holds an image of {virtual} "
                f"bytes, not the {size} asked")
    return (f"the import of {where} failed (the Block API does not say why; the object "
            f"is a QCOW2 image of {virtual} bytes)")


class BlockOutcomes:
    """Block exports (made-up tasks) and Block imports of this process."""

    def __init__(self, objects: ObjectStorage | None) -> None:
        self.objects = objects
        #: task id -> (zone, snapshot id, bucket, key, started)
        self.exports: LRUDict[str, tuple[str, str, str, str, dt.datetime]] = \
            LRUDict(REMEMBERED)
        self.last_export: LRUDict[str, str] = LRUDict(REMEMBERED)  # snapshot -> task
        self.verdicts: LRUDict[str, Task] = LRUDict(REMEMBERED)  # task id -> final
        #: snapshot id -> (bucket, key, size asked) of an import
        self.imports: LRUDict[str, tuple[str, str, int | None]] = LRUDict(REMEMBERED)
        self.import_reasons: LRUDict[str, str] = LRUDict(REMEMBERED)

    def export_started(self, task_id: str, zone: str, snapshot_id: str, bucket: str,
                       key: str, started: dt.datetime) -> None:
        self.exports[task_id] = (zone, snapshot_id, bucket, key, started)
        self.last_export[snapshot_id] = task_id

    def forget(self, snapshot_id: str) -> None:
        """A deleted snapshot's bookkeeping goes with it."""
        task = self.last_export.pop(snapshot_id, None)
        if task is not None:
            self.exports.pop(task, None)
            self.verdicts.pop(task, None)
        self.imports.pop(snapshot_id, None)
        self.import_reasons.pop(snapshot_id, None)

    async def task(self, task_id: str, zone: str, snap: Snapshot, bucket: str,
                   key: str) -> Task:
        """The export's status derived from the snapshot's: exporting -> started;
        back to available -> success once the object has landed (checked when
        there is Object Storage to ask; else taken on the API's word), failure
        with what was found otherwise; any other state -> failure."""
        done = self.verdicts.get(task_id)
        if done is not None:
            return done
        known = self.exports.get(task_id)
        started = known[4] if known is not None else None
        status = block_model.export_status(dict(snap.api_xattrs).get("status", ""), True)
        error = f"the snapshot is in state {snap.state}" if status == "failure" else None
        if status == "success" and self.objects is not None and bucket:
            error = await export_landed(self.objects, bucket, key, zone, snap.size, started)
            if error is not None:
                status = "failure"
        task = Task(id=task_id, description="export_snapshot_to_object_storage",
                    progress=100 if status == "success" else 0, status=status, zone=zone,
                    started_at=started.isoformat() if started else None, bucket=bucket,
                    key=key, error=error,
                    terminated_at=snap.modification_date if status != "started" else None)
        if status in ("success", "failure") and known is not None:
            self.verdicts[task_id] = task
        return task

    async def explained(self, snap: Snapshot) -> Snapshot:
        """``snap`` with the reason its import failed, when it is an import of this
        process that failed without one (looked up once)."""
        target = self.imports.get(snap.id)
        if target is None or snap.state not in FAILED_STATES or snap.error_reason:
            return snap
        reason = self.import_reasons.get(snap.id)
        if reason is None:
            bucket, key, size = target
            reason = await import_failure(self.objects, bucket, key, snap.zone, size)
            self.import_reasons[snap.id] = reason
        return dataclasses.replace(snap, error_reason=reason)


class InstanceExports:
    """Instance export tasks of this process: where each writes, and its final
    status once checked against Object Storage (as a Block export's is). A
    task older than the REMEMBERED last shows no bucket and key."""

    def __init__(self, objects: ObjectStorage | None) -> None:
        self.objects = objects
        #: task id -> (bucket, key, snapshot size, started)
        self.targets: LRUDict[str, tuple[str, str, int, dt.datetime]] = LRUDict(REMEMBERED)
        self.verdicts: LRUDict[str, Task] = LRUDict(REMEMBERED)

    def started(self, task_id: str, bucket: str, key: str, size: int,
                started: dt.datetime) -> None:
        self.targets[task_id] = (bucket, key, size, started)

    async def checked(self, task: Task) -> Task:
        """``task`` with where it writes and why it failed; a ``success`` whose
        object has not landed (missing, not an image of the snapshot's size,
        older than the export) is a ``failure`` saying what was found."""
        done = self.verdicts.get(task.id)
        if done is not None:
            return done
        target = self.targets.get(task.id)
        bucket, key = (target[0], target[1]) if target is not None else ("", "")
        status, progress, error = task.status, task.progress, None
        if status == "failure":
            error = "the export failed (the API does not say why)"
        elif status == "success" and target is not None and self.objects is not None:
            error = await export_landed(self.objects, bucket, key, task.zone, target[2],
                                        target[3])
            if error is not None:
                status, progress = "failure", 0
        out = dataclasses.replace(task, bucket=bucket, key=key, error=error,
                                  status=status, progress=progress)
        if status in ("success", "failure") and target is not None:
            self.verdicts[task.id] = out
        return out
