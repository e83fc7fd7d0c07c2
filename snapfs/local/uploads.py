"""Multipart uploads that exports left behind on Object Storage, aborted later.

An export that fails aborts its upload (s3/export.py); when Object Storage is
down, that abort fails too and the parts stay billed on the server. Such an
upload is recorded (schema: ``left_uploads``) the moment its abort fails, and
aborted once Object Storage answers again: by a task of the running service,
woken by each new record and retrying with backoff, and by every open
(recovery.py). Aborting an upload twice is harmless (the second finds it gone),
so processes sharing the store need no coordination for this.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from ..errors import SnapfsError
from ..model import now
from ..objects import ObjectStorage
from .metadata import Metadata

log = logging.getLogger(__name__)

#: Seconds before a failed round of aborts is tried again; doubled each time, up
#: to RETRY_MAX (Object Storage may stay down for hours).
RETRY_FIRST = 5.0
RETRY_MAX = 600.0


@dataclass(frozen=True)
class LeftUpload:
    upload_id: str
    bucket: str
    key: str
    zone: str


def left_uploads(md: Metadata) -> list[LeftUpload]:
    return [LeftUpload(*r) for r in md.conn.execute(
        "SELECT upload_id, bucket, key, zone FROM left_uploads ORDER BY left_at")]


async def abort_left(md: Metadata, objects: ObjectStorage | None) -> bool:
    """One try at every recorded upload; True when none is left."""
    if objects is None:
        return not left_uploads(md)
    remaining = 0
    for up in left_uploads(md):
        where = f"{up.bucket}/{up.key}"
        try:
            await objects.abort_upload(up.bucket, up.key, up.upload_id, zone=up.zone)
        except SnapfsError as exc:
            remaining += 1
            log.info("upload %s to %s left by a failed export: still not aborted (%s)",
                     up.upload_id, where, exc)
            continue
        md.conn.execute("DELETE FROM left_uploads WHERE upload_id = ?", (up.upload_id,))
        log.info("upload %s to %s left by a failed export: aborted", up.upload_id, where)
    return remaining == 0


class LeftUploads:
    """The running service's side: ``record`` (an export's abort failed) and
    ``run`` (the task aborting them), stopped by ``stop``."""

    def __init__(self, md: Metadata, objects: ObjectStorage | None) -> None:
        self.md = md
        self.objects = objects
        self.retry_first = RETRY_FIRST
        self._wake = trio.Event()
        self._scope = trio.CancelScope()

    def record(self, bucket: str, key: str, zone: str, upload_id: str) -> None:
        self.md.conn.execute(
            "INSERT OR IGNORE INTO left_uploads (upload_id, bucket, key, zone, left_at) "
            "VALUES (?, ?, ?, ?, ?)", (upload_id, bucket, key, zone, now()))
        log.warning("upload %s to %s/%s could not be aborted: recorded, aborted once "
                    "Object Storage answers again", upload_id, bucket, key)
        self._wake.set()

    async def run(self) -> None:
        if self.objects is None:
            return
        with self._scope:
            delay = self.retry_first
            while True:
                self._wake = trio.Event()
                if not left_uploads(self.md):
                    await self._wake.wait()  # the next record
                    delay = self.retry_first
                    continue
                if await abort_left(self.md, self.objects):
                    delay = self.retry_first
                    continue
                await trio.sleep(delay)
                delay = min(2 * delay, RETRY_MAX)

    def stop(self) -> None:
        self._scope.cancel()
