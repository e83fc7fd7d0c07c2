"""Export: a snapshot streamed into a QCOW2 object with one multipart upload.

The image is read in guest order and fed to the streaming encoder; its body
bytes are cut into parts that trio tasks upload in parallel, fed by an
unbuffered memory channel so at most ``concurrency`` parts are in flight and
one more is being filled. Part 1 is the QCOW2 head (header, L1, refcount table:
known only at the end) joined with the first few MiB of body so that it meets
S3's 5 MiB minimum; it is held back and uploaded last. Any failure or
cancellation aborts the upload (with its own, longer retries) so no part is
left behind on the server.

Cost: the data, not the virtual size. Blocks are read only where the
snapshot's allocation (its chunk map, or its shadow's extents) says data may
lie; the encoder jumps over the holes in between (``skip_to``), so a 64 TiB
volume holding 1 GiB reads, encodes and uploads that 1 GiB plus its tables.

Parts: sized from the image's expected size (allocated data plus tables, an
upper bound: ``StreamingEncoder.max_image_size``), not from the virtual size,
so that it fits in ``max_parts`` parts (10 000 for S3, 1 000 for Scaleway
endpoints: see config.py) of at least 5 MiB -- :func:`part_size_for`.

Memory bound: part 1 (<= 5 MiB) + (in flight + 1) reused part buffers + three
read blocks (one being read, one queued, one being encoded); with the defaults
(6 MiB parts, 4 in flight, 2 MiB reads) about 41 MiB. Bigger parts (more than
~60 GiB of data at 10 000 parts, ~6 GiB at 1 000) lower the parts in flight to
keep the buffers within ``BUFFER_BUDGET``, down to one in flight and one being
filled: beyond ~600 GiB of data (60 GiB on Scaleway) two parts are the bound.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import trio

from ..errors import NotFound, SnapfsError
from ..objects import LeftFn, ProgressFn
from ..qcow2.encoder import StreamingEncoder
from ..qcow2.format import CLUSTER_SIZE
from ..service import ImageReader
from ..taskgroups import first_error
from .calls import S3Calls
from .config import S3Settings

log = logging.getLogger(__name__)

MiB = 1 << 20
MIN_PART = 5 * MiB  # S3: every part but the last
READ_BLOCK = 2 * MiB
#: Part buffers' memory the in-flight count is lowered to stay within.
BUFFER_BUDGET = 128 * MiB
#: How long a cancelled export keeps trying to abort its upload.
CANCELLED_ABORT_TIME = 10.0


def _cancelled(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return any(_cancelled(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


def part_size_for(settings: S3Settings, expected_size: int) -> int:
    """The part size for an image of at most ``expected_size`` bytes: the
    configured size, unless that would take more than ``max_parts`` parts; never
    under S3's 5 MiB; whole MiB. Part 1 holds the head and the body's first
    bytes, up to MIN_PART (see _produce); the rest are part_size each."""
    max_parts = max(2, settings.max_parts)
    need = -(-max(0, expected_size - MIN_PART) // (max_parts - 1))
    size = max(settings.part_size, MIN_PART, need)
    return -(-size // MiB) * MiB


def part_count(image_size: int, part_size: int) -> int:
    """How many parts _produce cuts an image of ``image_size`` bytes into."""
    return 1 + max(0, -(-(image_size - MIN_PART) // part_size))


def parts_in_flight(concurrency: int, part_size: int) -> int:
    """Uploads in flight: ``concurrency``, fewer when (in flight + 1) part
    buffers would pass BUFFER_BUDGET; at least one."""
    return max(1, min(concurrency, BUFFER_BUDGET // part_size - 1))


class _Buffers:
    """Part buffers, reused: at most ``limit`` exist, allocated on demand, so
    memory stays bounded and the allocator is not churned by part-sized blocks."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        self.made = 0
        self._send, self._recv = trio.open_memory_channel[bytearray](limit)

    async def get(self) -> bytearray:
        try:
            return self._recv.receive_nowait()
        except trio.WouldBlock:
            if self.made < self.limit:
                self.made += 1
                return bytearray(self.size)
            return await self._recv.receive()

    def put(self, buf: bytearray) -> None:
        self._send.send_nowait(buf)


async def export_qcow2(calls: S3Calls, settings: S3Settings, image: ImageReader,
                       bucket: str, key: str, progress: ProgressFn,
                       cpu_limiter: trio.CapacityLimiter, left: LeftFn | None = None) -> int:
    client = calls.client
    size = image.size
    enc = StreamingEncoder(size)
    allocated = await image.allocated_bytes()
    expected = enc.max_image_size(size if allocated is None else allocated)
    part_size = part_size_for(settings, expected)
    concurrency = parts_in_flight(max(1, settings.concurrency), part_size)
    created = await calls.call(
        "create_multipart_upload", bucket, key,
        lambda: client.create_multipart_upload(
            Bucket=bucket, Key=key, ContentType="application/x-qemu-disk"))
    upload_id = created["UploadId"]
    log.info("export to %s/%s: upload started (%d bytes virtual, %s allocated, "
             "%d MiB parts, %d in flight)", bucket, key, size,
             "?" if allocated is None else allocated, part_size // MiB, concurrency)
    etags: dict[int, str] = {}
    buffers = _Buffers(part_size, concurrency + 1)

    async def upload(recv: trio.MemoryReceiveChannel[tuple[int, Any]]) -> None:
        async with recv:
            async for number, body in recv:
                resp = await calls.call(
                    "upload_part", bucket, key,
                    functools.partial(client.upload_part, Bucket=bucket, Key=key,
                                      UploadId=upload_id, PartNumber=number, Body=body))
                etags[number] = resp["ETag"]
                if isinstance(body, bytearray) and len(body) == part_size:
                    buffers.put(body)

    try:
        try:
            async with trio.open_nursery() as nursery:
                send, recv = trio.open_memory_channel[tuple[int, Any]](0)
                async with recv:
                    for _ in range(concurrency):
                        nursery.start_soon(upload, recv.clone())
                blocks_send, blocks_recv = trio.open_memory_channel[tuple[int, bytes]](1)
                nursery.start_soon(_read_blocks, image, blocks_send)
                async with send, blocks_recv:
                    total = size if allocated is None else max(1, allocated)
                    await _produce(enc, blocks_recv, send, buffers, total, progress,
                                   cpu_limiter)
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        parts = [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
        await calls.call(
            "complete_multipart_upload", bucket, key,
            lambda: client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id,
                MultipartUpload={"Parts": parts}))
    except BaseException as exc:
        # Shielded: a cancelled export (the service stopping) still aborts, but
        # then only briefly, so that shutting down is not held up by a dead server.
        with trio.CancelScope(shield=True):
            aborted = False
            with trio.move_on_after(CANCELLED_ABORT_TIME if _cancelled(exc) else float("inf")):
                aborted = await _abort(calls, settings, bucket, key, upload_id, exc)
            if not aborted and left is not None:
                left(upload_id)  # recorded: aborted once the storage answers again
        raise
    head = await calls.call("head_object", bucket, key,
                            lambda: client.head_object(Bucket=bucket, Key=key))
    if int(head["ContentLength"]) != enc.image_size:
        raise SnapfsError(f"S3 object {bucket}/{key} has {head['ContentLength']} bytes "
                          f"after upload, expected {enc.image_size}")
    log.info("export to %s/%s done: %d bytes in %d parts", bucket, key, enc.image_size,
             len(etags))
    return enc.image_size


async def _read_blocks(image: ImageReader,
                       send: trio.MemorySendChannel[tuple[int, bytes]]) -> None:
    """(guest offset, bytes) of the snapshot's allocation in guest order, one
    block ahead of the encoder; the holes between are never read."""
    size = image.size
    offset = 0
    async with send:
        while offset < size:
            found = await image.next_allocated(offset)
            # Cluster-aligned (offset is: blocks are whole clusters), never backwards.
            offset = max(offset, found - found % CLUSTER_SIZE)
            if offset >= size:
                break
            want = min(READ_BLOCK, size - offset)
            data = await image.read(offset, want)
            if len(data) != want:
                raise SnapfsError(f"snapshot read returned {len(data)} bytes at {offset}, "
                                  f"expected {want}")
            await send.send((offset, data))
            offset += want


async def _produce(enc: StreamingEncoder,
                   blocks: trio.MemoryReceiveChannel[tuple[int, bytes]],
                   send: trio.MemorySendChannel[tuple[int, Any]], buffers: _Buffers,
                   total: int, progress: ProgressFn,
                   cpu_limiter: trio.CapacityLimiter) -> None:
    """Encode and cut into parts; part 1 (head + first body bytes) goes last."""
    part_size = buffers.size
    first = bytearray(max(0, MIN_PART - enc.head_size))  # body bytes joining the head
    first_fill = 0
    cur: bytearray | None = None
    fill = 0
    number = 2
    done = 0
    async for offset, data in blocks:
        enc.skip_to(offset)
        pieces = await trio.to_thread.run_sync(enc.feed_pieces, data, limiter=cpu_limiter)
        done = min(total, done + len(data))  # progress: allocated bytes done
        for piece in pieces:
            view = memoryview(piece)
            while view:
                if first_fill < len(first):
                    n = min(len(view), len(first) - first_fill)
                    first[first_fill:first_fill + n] = view[:n]
                    first_fill += n
                    view = view[n:]
                    continue
                if cur is None:
                    cur, fill = await buffers.get(), 0
                n = min(len(view), part_size - fill)
                cur[fill:fill + n] = view[:n]
                fill += n
                view = view[n:]
                if fill == part_size:
                    await send.send((number, cur))
                    number += 1
                    cur = None
        del pieces, data
        progress(done, total)
    tail, head = await trio.to_thread.run_sync(enc.finish, limiter=cpu_limiter)
    rest = bytes(cur[:fill]) if cur is not None else b""
    if number == 2 and first_fill < len(first):
        # Everything fits in one part (small images): head + body + tail.
        await send.send((1, head + bytes(first[:first_fill]) + rest + tail))
        return
    if rest or tail:
        await send.send((number, rest + tail))
    await send.send((1, head + bytes(first)))


async def _abort(calls: S3Calls, settings: S3Settings, bucket: str, key: str,
                 upload_id: str, cause: BaseException) -> bool:
    """True once the upload is gone (aborted, or not found: gone already)."""
    client = calls.client
    why = str(cause) if isinstance(cause, SnapfsError) else type(cause).__name__
    log.warning("export to %s/%s failed (%s): aborting the upload", bucket, key, why)
    try:
        await calls.call("abort_multipart_upload", bucket, key,
                         lambda: client.abort_multipart_upload(
                             Bucket=bucket, Key=key, UploadId=upload_id),
                         policy=settings.abort_retry)
    except NotFound:  # the upload (or bucket) is gone already: nothing left behind
        return True
    except SnapfsError as exc:
        log.warning("abort of upload to %s/%s failed: %s", bucket, key, exc)
        return False
    return True
