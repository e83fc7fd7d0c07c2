"""Export: a snapshot streamed into a QCOW2 object with one multipart upload.

The image is read in guest order and fed to the streaming encoder; its body
bytes are cut into parts that trio tasks upload in parallel, fed by an
unbuffered memory channel so at most ``concurrency`` parts are in flight and
one more is being filled. Part 1 is the QCOW2 head (header, L1, refcount table:
known only at the end) joined with the first few MiB of body so that it meets
S3's 5 MiB minimum; it is held back and uploaded last. Any failure or
cancellation aborts the upload (with its own, longer retries) so no part is
left behind on the server.

Memory bound: part 1 (<= 5 MiB) + (concurrency + 1) x part_size + one read
block; with the defaults (8 MiB parts, 4 in flight, 4 MiB reads) about 50 MiB,
whatever the image's size up to 80 GB; beyond that part_size grows as
size / 9000 to stay under S3's 10 000 parts.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from ..errors import SnapfsError
from ..objects import ProgressFn
from ..qcow2.encoder import StreamingEncoder
from ..service import ImageReader
from .calls import S3Calls
from .config import S3Settings

log = logging.getLogger(__name__)

MiB = 1 << 20
MIN_PART = 5 * MiB  # S3: every part but the last
MAX_PARTS = 10_000
READ_BLOCK = 4 * MiB


def part_size_for(settings: S3Settings, virtual_size: int) -> int:
    """Parts big enough that even an image with every cluster allocated fits
    in 10 000 parts (with a margin for metadata)."""
    need = -(-virtual_size // (MAX_PARTS - 1000))
    size = max(settings.part_size, MIN_PART, need)
    return -(-size // MiB) * MiB


async def export_qcow2(calls: S3Calls, settings: S3Settings, image: ImageReader,
                       bucket: str, key: str, progress: ProgressFn,
                       cpu_limiter: trio.CapacityLimiter) -> int:
    client = calls.client
    size = image.size
    part_size = part_size_for(settings, size)
    enc = StreamingEncoder(size)
    created = await calls.call(
        "create_multipart_upload", bucket, key,
        lambda: client.create_multipart_upload(
            Bucket=bucket, Key=key, ContentType="application/x-qemu-disk"))
    upload_id = created["UploadId"]
    log.info("export to %s/%s: upload started (%d bytes virtual, %d MiB parts)",
             bucket, key, size, part_size // MiB)
    etags: dict[int, str] = {}

    async def upload(recv: trio.MemoryReceiveChannel[tuple[int, bytes]]) -> None:
        async with recv:
            async for number, body in recv:
                resp = await calls.call(
                    "upload_part", bucket, key,
                    lambda n=number, b=body: client.upload_part(
                        Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=b))
                etags[number] = resp["ETag"]

    try:
        try:
            async with trio.open_nursery() as nursery:
                send, recv = trio.open_memory_channel[tuple[int, bytes]](0)
                async with recv:
                    for _ in range(max(1, settings.concurrency)):
                        nursery.start_soon(upload, recv.clone())
                async with send:
                    await _produce(image, enc, send, part_size, progress, cpu_limiter)
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        parts = [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
        await calls.call(
            "complete_multipart_upload", bucket, key,
            lambda: client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id,
                MultipartUpload={"Parts": parts}))
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await _abort(calls, settings, bucket, key, upload_id, exc)
        raise
    head = await calls.call("head_object", bucket, key,
                            lambda: client.head_object(Bucket=bucket, Key=key))
    if int(head["ContentLength"]) != enc.image_size:
        raise SnapfsError(f"S3 object {bucket}/{key} has {head['ContentLength']} bytes "
                          f"after upload, expected {enc.image_size}")
    log.info("export to %s/%s done: %d bytes in %d parts", bucket, key, enc.image_size,
             len(etags))
    return enc.image_size


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The domain error that made a task group fail (siblings only add Cancelled),
    so callers see one SnapfsError, not a group."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)
    walk(group)
    for e in leaves:
        if isinstance(e, SnapfsError):
            return e
    for e in leaves:
        if not isinstance(e, trio.Cancelled):
            return e
    return group


async def _produce(image: ImageReader, enc: StreamingEncoder,
                   send: trio.MemorySendChannel[tuple[int, bytes]], part_size: int,
                   progress: ProgressFn, cpu_limiter: trio.CapacityLimiter) -> None:
    """Read, encode and cut into parts; part 1 (head + first body bytes) last."""
    size = image.size
    first_body = max(0, MIN_PART - enc.head_size)  # body bytes that join the head
    first: list[bytes] = []
    first_len = 0
    pending: list[bytes] = []  # body bytes of the part being filled
    pending_len = 0
    number = 2
    offset = 0
    while offset < size:
        want = min(READ_BLOCK, size - offset)
        data = await image.read(offset, want)
        if len(data) != want:
            raise SnapfsError(f"snapshot read returned {len(data)} bytes at {offset}, "
                              f"expected {want}")
        out = await trio.to_thread.run_sync(enc.feed, data, limiter=cpu_limiter)
        del data
        offset += want
        progress(offset, size)
        if first_len < first_body and out:
            take = out[:first_body - first_len]
            first.append(take)
            first_len += len(take)
            out = out[len(take):]
        if out:
            pending.append(out)
            pending_len += len(out)
        while pending_len >= part_size:
            blob = b"".join(pending)
            await send.send((number, blob[:part_size]))
            number += 1
            rest = blob[part_size:]
            pending, pending_len = ([rest] if rest else []), len(rest)
    tail, head = await trio.to_thread.run_sync(enc.finish, limiter=cpu_limiter)
    if number == 2 and first_len < first_body:
        # Everything fits in one part (small images): head + body + tail.
        await send.send((1, head + b"".join(first) + b"".join(pending) + tail))
        return
    last = b"".join(pending) + tail
    if last:
        await send.send((number, last))
    await send.send((1, head + b"".join(first)))


async def _abort(calls: S3Calls, settings: S3Settings, bucket: str, key: str,
                 upload_id: str, cause: BaseException) -> None:
    client = calls.client
    why = str(cause) if isinstance(cause, SnapfsError) else type(cause).__name__
    log.warning("export to %s/%s failed (%s): aborting the upload", bucket, key, why)
    try:
        await calls.call("abort_multipart_upload", bucket, key,
                         lambda: client.abort_multipart_upload(
                             Bucket=bucket, Key=key, UploadId=upload_id),
                         policy=settings.abort_retry)
    except SnapfsError as exc:
        # NotFound: the upload (or bucket) is gone already -- nothing left behind.
        log.warning("abort of upload to %s/%s failed: %s", bucket, key, exc)
