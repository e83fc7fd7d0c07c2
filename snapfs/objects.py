"""The Object Storage interface the services use for Export and Create-from-QCOW2.

The implementation (boto3 on any S3-compatible endpoint, QCOW2 encoding and
decoding) lives in ``snapfs.s3``; services only see this interface, so a service
without Object Storage configured refuses export/import with a clear reason.
"""

from __future__ import annotations

import abc
import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from typing import Callable

import trio

from .errors import InvalidArgument, SnapfsError
from .service import ImageReader

#: progress(done_bytes, total_bytes) -- called from the trio thread.
ProgressFn = Callable[[int, int], None]
#: left(upload_id) -- an export's multipart upload that could not be aborted (the
#: storage did not answer): the caller records it to abort later (trio thread).
LeftFn = Callable[[str], None]

# S3 bucket naming rules: 3-63 characters of lower-case letters, digits, dots and
# hyphens, starting and ending with a letter or digit, no "..", not an IP address.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
#: S3's limit on an object key, in UTF-8 bytes.
MAX_KEY_BYTES = 1024


def check_object_target(bucket: object, key: object) -> tuple[str, str]:
    """``(bucket, key)`` if S3 would accept them, else InvalidArgument naming the
    one that is not: checked when an export or import is asked for, so that a bad
    name is refused then, not as a failure in the background later. Pure: used by
    every place a target comes in (the API, the mount's export/imports files)."""
    if not isinstance(bucket, str) or not _BUCKET.fullmatch(bucket) or ".." in bucket \
            or _is_ip(bucket):
        raise InvalidArgument("bucket", f"{bucket!r} is not a valid bucket name (3-63 "
                              "characters: a-z, 0-9, '.', '-'; see the S3 naming rules)")
    if not isinstance(key, str) or not key:
        raise InvalidArgument("key", "must be a non-empty string")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate, as JSON's "\ud800" gives
        raise InvalidArgument("key", "is not valid UTF-8 text") from None
    if size > MAX_KEY_BYTES:
        raise InvalidArgument("key", f"longer than {MAX_KEY_BYTES} bytes in UTF-8")
    if "\0" in key:
        raise InvalidArgument("key", "must not contain a NUL character")
    return bucket, key


def _is_ip(name: str) -> bool:
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class ObjectInfo:
    """What a HEAD of an object says: its size in bytes and when it was written
    (timezone-aware; S3 gives whole seconds)."""

    size: int
    last_modified: dt.datetime


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

    async def head_object(self, bucket: str, key: str, zone: str | None = None) -> ObjectInfo:
        """Size and date of bucket/key; NotFound when it is absent. Raises a
        SnapfsError when the storage cannot be asked."""
        raise SnapfsError(f"this Object Storage cannot look at {bucket}/{key}")

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
