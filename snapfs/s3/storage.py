"""ObjectStorage on any S3-compatible endpoint through boto3 (Scaleway Object
Storage in production, SeaweedFS in tests)."""

from __future__ import annotations

import datetime as dt
import functools
import logging
from typing import Any

import trio

from ..errors import InvalidArgument, NotFound, SnapfsError
from ..objects import LeftFn, ObjectInfo, ObjectStorage, ProgressFn
from ..service import ImageReader
from .calls import S3Calls
from .config import S3Settings, make_client, region_of_zone, resolve_settings
from .export import export_qcow2
from .reader import open_reader

log = logging.getLogger(__name__)


class S3ObjectStorage(ObjectStorage):
    """boto3 clients (created on first use, in a thread: they read config files)
    shared by all exports and imports; every call runs in a worker thread under
    one CapacityLimiter sized for ``concurrency`` parallel requests per transfer.

    With an endpoint (explicit or boto3's own) there is one client and the zone
    is ignored. In the Scaleway fallback (``settings.scw_fallback``: Scaleway keys
    and no endpoint) each zone's region has its own client, for
    ``https://s3.<region>.scw.cloud``; calls without a zone use the settings'
    default region."""

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self._clients: dict[str | None, Any] = {}  # region (None: the default) -> client
        self._client_lock = trio.Lock()
        # Room for two transfers at full parallelism before they queue.
        self.limiter = trio.CapacityLimiter(max(2, 2 * settings.concurrency))
        # Encoding/decompression: CPU work, at most one thread per transfer step.
        self.cpu_limiter = trio.CapacityLimiter(2)

    def __repr__(self) -> str:
        return f"S3ObjectStorage({self.settings!r})"

    def settings_for(self, zone: str | None) -> S3Settings:
        """The settings of the client that serves ``zone``."""
        if zone is None or not self.settings.scw_fallback:
            return self.settings
        return self.settings.for_region(region_of_zone(zone))

    async def calls_for(self, zone: str | None = None) -> S3Calls:
        settings = self.settings_for(zone)
        region = settings.region if self.settings.scw_fallback else None
        async with self._client_lock:
            client = self._clients.get(region)
            if client is None:
                client = await trio.to_thread.run_sync(make_client, settings)
                self._clients[region] = client
        return S3Calls(client, self.limiter, settings.retry)

    async def export_qcow2(self, image: ImageReader, bucket: str, key: str,
                           progress: ProgressFn, *, zone: str | None = None,
                           left: LeftFn | None = None) -> int:
        _check(bucket, key)
        calls = await self.calls_for(zone)
        return await export_qcow2(calls, self.settings, image, bucket, key, progress,
                                  self.cpu_limiter, left)

    async def abort_upload(self, bucket: str, key: str, upload_id: str,
                           zone: str | None = None) -> None:
        _check(bucket, key)
        calls = await self.calls_for(zone)
        try:
            await calls.call("abort_multipart_upload", bucket, key,
                             functools.partial(calls.client.abort_multipart_upload,
                                               Bucket=bucket, Key=key, UploadId=upload_id),
                             policy=self.settings.abort_retry)
        except NotFound:  # NoSuchUpload: aborted (or completed) already
            return
        log.info("aborted unfinished upload %s to %s/%s", upload_id, bucket, key)

    async def open_qcow2(self, bucket: str, key: str, *, zone: str | None = None,
                         nursery: trio.Nursery | None = None) -> ImageReader:
        _check(bucket, key)
        calls = await self.calls_for(zone)
        return await open_reader(calls, self.settings, bucket, key, self.cpu_limiter, nursery)

    async def head_object(self, bucket: str, key: str, zone: str | None = None) -> ObjectInfo:
        _check(bucket, key)
        calls = await self.calls_for(zone)
        res = await calls.call("head_object", bucket, key,
                               functools.partial(calls.client.head_object, Bucket=bucket,
                                                 Key=key))
        size, modified = res.get("ContentLength"), res.get("LastModified")
        if not isinstance(size, int) or not isinstance(modified, dt.datetime):
            raise SnapfsError(f"S3 head_object on {bucket}/{key}: no size or date in the "
                              "answer")
        if modified.tzinfo is None:  # botocore parses the HTTP date as UTC
            modified = modified.replace(tzinfo=dt.timezone.utc)
        return ObjectInfo(size=size, last_modified=modified)

    async def delete_object(self, bucket: str, key: str, zone: str | None = None) -> None:
        _check(bucket, key)
        calls = await self.calls_for(zone)
        await calls.call("delete_object", bucket, key,
                         functools.partial(calls.client.delete_object, Bucket=bucket, Key=key))

    async def abort_uploads(self, bucket: str, key: str, zone: str | None = None) -> int:
        _check(bucket, key)
        calls = await self.calls_for(zone)
        client = calls.client
        # Prefix=key also lists longer keys (key + "x"): only exactly ``key`` is ours.
        found: list[str] = []
        markers: dict[str, str] = {}
        while True:
            page = await calls.call(
                "list_multipart_uploads", bucket, key,
                functools.partial(client.list_multipart_uploads, Bucket=bucket, Prefix=key,
                                  **markers))
            found += [u["UploadId"] for u in page.get("Uploads") or () if u["Key"] == key]
            if not page.get("IsTruncated"):
                break
            markers = {"KeyMarker": page.get("NextKeyMarker") or "",
                       "UploadIdMarker": page.get("NextUploadIdMarker") or ""}
        for upload_id in found:
            await calls.call("abort_multipart_upload", bucket, key,
                             functools.partial(client.abort_multipart_upload,
                                               Bucket=bucket, Key=key, UploadId=upload_id),
                             policy=self.settings.abort_retry)
            log.info("aborted unfinished upload %s to %s/%s", upload_id, bucket, key)
        return len(found)

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            if hasattr(client, "close"):
                await trio.to_thread.run_sync(client.close)


def object_storage_from_config(endpoint: str | None = None, region: str | None = None
                               ) -> ObjectStorage | None:
    """The ObjectStorage the daemon uses, or None when nothing is configured.
    ``endpoint`` is ``snapfs mount --s3-endpoint``; ``region`` the zone's region
    (used for the Scaleway endpoint and as the signing region)."""
    settings = resolve_settings(endpoint, region)
    if settings is None:
        return None
    return S3ObjectStorage(settings)


def _check(bucket: str, key: str) -> None:
    if not bucket:
        raise InvalidArgument("bucket", "must be non-empty")
    if not key:
        raise InvalidArgument("key", "must be non-empty")
