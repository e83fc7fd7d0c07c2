"""ObjectStorage on any S3-compatible endpoint through boto3 (Scaleway Object
Storage in production, SeaweedFS in tests)."""

from __future__ import annotations

import logging
from typing import Any

import trio

from ..errors import InvalidArgument
from ..objects import ObjectStorage, ProgressFn
from ..service import ImageReader
from .calls import S3Calls
from .config import S3Settings, make_client
from .export import export_qcow2
from .reader import open_reader

log = logging.getLogger(__name__)


class S3ObjectStorage(ObjectStorage):
    """One boto3 client (created on first use, in a thread: it reads config files)
    shared by all exports and imports; every call runs in a worker thread under
    one CapacityLimiter sized for ``concurrency`` parallel requests per transfer."""

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self._client: Any = None
        self._client_lock = trio.Lock()
        # Room for two transfers at full parallelism before they queue.
        self.limiter = trio.CapacityLimiter(max(2, 2 * settings.concurrency))
        # Encoding/decompression: CPU work, at most one thread per transfer step.
        self.cpu_limiter = trio.CapacityLimiter(2)

    def __repr__(self) -> str:
        return f"S3ObjectStorage({self.settings!r})"

    async def _calls(self) -> S3Calls:
        async with self._client_lock:
            if self._client is None:
                self._client = await trio.to_thread.run_sync(make_client, self.settings)
        return S3Calls(self._client, self.limiter, self.settings.retry)

    async def export_qcow2(self, image: ImageReader, bucket: str, key: str,
                           progress: ProgressFn) -> int:
        _check(bucket, key)
        calls = await self._calls()
        return await export_qcow2(calls, self.settings, image, bucket, key, progress,
                                  self.cpu_limiter)

    async def open_qcow2(self, bucket: str, key: str) -> ImageReader:
        _check(bucket, key)
        calls = await self._calls()
        return await open_reader(calls, self.settings, bucket, key, self.cpu_limiter)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None and hasattr(client, "close"):
            await trio.to_thread.run_sync(client.close)


def _check(bucket: str, key: str) -> None:
    if not bucket:
        raise InvalidArgument("bucket", "must be non-empty")
    if not key:
        raise InvalidArgument("key", "must be non-empty")
