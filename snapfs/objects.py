"""The Object Storage interface the services use for Export and Create-from-QCOW2.

The implementation (boto3 on any S3-compatible endpoint, QCOW2 encoding and
decoding) lives in ``snapfs.s3``; services only see this interface, so a service
without Object Storage configured refuses export/import with a clear reason.
"""

from __future__ import annotations

import abc
from typing import Callable

from .service import ImageReader

#: progress(done_bytes, total_bytes) -- called from the trio thread.
ProgressFn = Callable[[int, int], None]


class ObjectStorage(abc.ABC):
    @abc.abstractmethod
    async def export_qcow2(self, image: ImageReader, bucket: str, key: str,
                           progress: ProgressFn) -> int:
        """Upload ``image`` as a QCOW2 v3 object at bucket/key, streamed; returns the
        object's size. On failure the multipart upload is aborted and a SnapfsError
        naming the cause is raised (NotFound for a missing bucket, PermissionDenied,
        Transient once retries are exhausted)."""

    @abc.abstractmethod
    async def open_qcow2(self, bucket: str, key: str) -> ImageReader:
        """A reader of the guest data of the QCOW2 object at bucket/key; raises
        InvalidData (with the exact reason) for anything that is not a valid,
        supported QCOW2 image, NotFound for a missing bucket or key."""

    async def aclose(self) -> None:
        ...
