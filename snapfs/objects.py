"""The Object Storage interface the services use for Export and Create-from-QCOW2.

The implementation (boto3 on any S3-compatible endpoint, QCOW2 encoding and
decoding) lives in ``snapfs.s3``; services only see this interface, so a service
without Object Storage configured refuses export/import with a clear reason.
"""

from __future__ import annotations

import abc
from typing import Callable

import trio

from .errors import SnapfsError
from .service import ImageReader

#: progress(done_bytes, total_bytes) -- called from the trio thread.
ProgressFn = Callable[[int, int], None]
#: left(upload_id) -- an export's multipart upload that could not be aborted (the
#: storage did not answer): the caller records it to abort later (trio thread).
LeftFn = Callable[[str], None]


class ObjectStorage(abc.ABC):
    @abc.abstractmethod
    async def export_qcow2(self, image: ImageReader, bucket: str, key: str,
                           progress: ProgressFn, *, zone: str | None = None,
                           left: LeftFn | None = None) -> int:
        """Upload ``image`` as a QCOW2 v3 object at bucket/key, streamed; returns the
        object's size. On failure the multipart upload is aborted and a SnapfsError
        naming the cause is raised (NotFound for a missing bucket, PermissionDenied,
        Transient once retries are exhausted); an upload whose abort failed too is
        passed to ``left`` first. ``zone`` is the snapshot's zone: an
        implementation without a configured endpoint may use it to pick the
        Object Storage of that zone's region."""

    @abc.abstractmethod
    async def open_qcow2(self, bucket: str, key: str, *, zone: str | None = None,
                         nursery: trio.Nursery | None = None) -> ImageReader:
        """A reader of the guest data of the QCOW2 object at bucket/key; raises
        InvalidData (with the exact reason) for anything that is not a valid,
        supported QCOW2 image, NotFound for a missing bucket or key. ``zone`` as
        for export_qcow2. ``nursery``: the caller's long-lived nursery, where the
        reader's read-ahead runs (None: no read-ahead)."""

    async def delete_object(self, bucket: str, key: str, zone: str | None = None) -> None:
        """Remove bucket/key (absent already: fine). Raises a SnapfsError when the
        storage cannot."""
        raise SnapfsError(f"this Object Storage cannot delete {bucket}/{key}")

    async def abort_uploads(self, bucket: str, key: str, zone: str | None = None) -> int:
        """Abort every unfinished multipart upload to exactly bucket/key (what a
        killed export left behind); returns how many were aborted. Raises a
        SnapfsError when the storage cannot be asked. Storage without multipart
        uploads has nothing to abort."""
        return 0

    async def abort_upload(self, bucket: str, key: str, upload_id: str,
                           zone: str | None = None) -> None:
        """Abort one multipart upload (one that ``export_qcow2`` passed to
        ``left``); gone already is fine. Raises a SnapfsError when the storage
        cannot be asked."""

    async def aclose(self) -> None:
        ...
