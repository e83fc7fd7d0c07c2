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

Memory bound, for any volume size: part 1 (<= 5 MiB) + (in flight + 1) reused
part buffers + three read blocks (one being read, one queued, one being
encoded); with the defaults (8 MiB parts, 4 in flight, 2 MiB reads) about
51 MiB, and never over BUFFER_BUDGET of part buffers. Parts are sent from
those buffers without a copy (part 1 is filled behind room left for the head,
the last part is cut in place): measured with export_ab.py, the copies cost
6-10 MB of peak RSS at 8 MiB parts and ~20 MB at 16 MiB ones. Parts too big for that
(over ~25 MiB: more than ~250 GiB of data at 10 000 parts, ~25 GiB at 1 000)
are spilled: each is appended to a temporary file as it is encoded and uploaded
from there (re-read from its start on a retry, which a pipe could not do), so
memory stays the read blocks whatever the part size; their disk stays within
SPILL_BUDGET ((in flight + 1) parts, at least two). The tail's refcount blocks
(64 KiB per 2 GiB of data) are pieces sharing one full block, cut like the body.
An image that would need parts over S3's 5 GiB (~48 TiB of data at 10 000
parts, ~4.8 TiB at 1 000) is refused (TooLarge) before anything is uploaded.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from typing import IO, Any, Sequence

import trio

from ..errors import NotFound, SnapfsError, TooLarge
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
#: S3's largest part: an image needing bigger parts is refused.
MAX_PART = 5 << 30
#: Part buffers in memory at most; bigger parts are spilled to temporary files.
BUFFER_BUDGET = 128 * MiB
#: Spilled parts' disk at most (in flight + 1 files), but always two parts.
SPILL_BUDGET = 4 << 30
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


def part_plan(concurrency: int, part_size: int) -> tuple[int, bool]:
    """(uploads in flight, spilled): parts are held in memory while (in flight
    + 1) of them fit in BUFFER_BUDGET; bigger ones are spilled to temporary
    files, (in flight + 1) of them within SPILL_BUDGET, at least one in flight."""
    concurrency = max(1, concurrency)
    if (concurrency + 1) * part_size <= BUFFER_BUDGET:
        return concurrency, False
    return max(1, min(concurrency, SPILL_BUDGET // part_size - 1)), True


def spill_dir(settings: S3Settings) -> str:
    """Where spilled parts go: disk, not RAM (/tmp is often a tmpfs)."""
    return settings.spill_dir or os.environ.get("TMPDIR") or "/var/tmp"


class _Part:
    """One part being filled: views are added (``add``) and written out
    (``flush``, before the views' block is reused) -- copied into a reused
    buffer in memory, or, for a spilled part, appended to a temporary file in a
    thread, so that a part of any size costs only the block being encoded."""

    def __init__(self, buf: bytearray | None, file: IO[bytes] | None) -> None:
        self.buf = buf
        self.file = file
        self.fill = 0
        self._pending: list[memoryview | bytes] = []

    def add(self, view: memoryview) -> None:
        if self.buf is not None:
            self.buf[self.fill:self.fill + len(view)] = view
        else:
            self._pending.append(view)
        self.fill += len(view)

    async def flush(self, limiter: trio.CapacityLimiter) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        await trio.to_thread.run_sync(_write_all, self.file, pending, limiter=limiter)

    def body(self) -> bytearray | IO[bytes]:
        if self.file is not None:
            return self.file
        assert self.buf is not None
        if self.fill < len(self.buf):  # the last part: cut in place, not copied
            del self.buf[self.fill:]   # (_Buffers.put then drops it: not full size)
        return self.buf


def _write_all(file: IO[bytes] | None, pieces: list[memoryview | bytes]) -> None:
    assert file is not None
    for piece in pieces:
        file.write(piece)  # a BufferedWriter writes it all (or raises)
    file.flush()


def _spill_file(where: str) -> IO[bytes]:
    return tempfile.TemporaryFile("w+b", dir=where)  # O_TMPFILE: unlinked from the start


class _Buffers:
    """Where parts are filled, at most ``limit`` at once: reused part buffers
    (allocated on demand, so memory stays bounded and the allocator is not
    churned by part-sized blocks), or temporary files for spilled parts (created
    per part, unlinked at once: nothing is left behind, even by a crash)."""

    def __init__(self, size: int, limit: int, spill_to: str | None = None) -> None:
        self.size = size
        self.limit = limit
        self.spill_to = spill_to
        self.made = 0
        self._send, self._recv = trio.open_memory_channel[bytearray](limit)
        self._files = trio.Semaphore(limit)

    async def get(self) -> _Part:
        if self.spill_to is not None:
            await self._files.acquire()
            try:
                file = await trio.to_thread.run_sync(_spill_file, self.spill_to)
            except BaseException:
                self._files.release()
                raise
            return _Part(None, file)
        try:
            return _Part(self._recv.receive_nowait(), None)
        except trio.WouldBlock:
            if self.made < self.limit:
                self.made += 1
                return _Part(bytearray(self.size), None)
            return _Part(await self._recv.receive(), None)

    async def put(self, part: _Part) -> None:
        """The part is uploaded (or given up): its buffer or file is free."""
        if part.file is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(part.file.close)
            self._files.release()
        elif part.buf is not None and len(part.buf) == self.size:
            self._send.send_nowait(part.buf)


async def export_qcow2(calls: S3Calls, settings: S3Settings, image: ImageReader,
                       bucket: str, key: str, progress: ProgressFn,
                       cpu_limiter: trio.CapacityLimiter, left: LeftFn | None = None) -> int:
    client = calls.client
    size = image.size
    enc = StreamingEncoder(size)
    allocated = await image.allocated_bytes()
    expected = enc.max_image_size(size if allocated is None else allocated)
    part_size = part_size_for(settings, expected)
    if part_size > MAX_PART:
        log.warning("export to %s/%s refused: %d bytes of image take %d MiB parts, over "
                    "Object Storage's 5 GiB part limit at %d parts", bucket, key, expected,
                    part_size // MiB, settings.max_parts)
        raise TooLarge(f"a {expected}-byte image does not fit in {settings.max_parts} "
                       "parts of at most 5 GiB")
    concurrency, spilled = part_plan(settings.concurrency, part_size)
    created = await calls.call(
        "create_multipart_upload", bucket, key,
        lambda: client.create_multipart_upload(
            Bucket=bucket, Key=key, ContentType="application/x-qemu-disk"))
    upload_id = created["UploadId"]
    log.info("export to %s/%s: upload started (%d bytes virtual, %s allocated, "
             "%d MiB parts%s, %d in flight)", bucket, key, size,
             "?" if allocated is None else allocated, part_size // MiB,
             " spilled to " + spill_dir(settings) if spilled else "", concurrency)
    etags: dict[int, str] = {}
    buffers = _Buffers(part_size, concurrency + 1, spill_dir(settings) if spilled else None)

    def send_part(number: int, body: Any, length: int) -> Any:
        if hasattr(body, "seek"):  # a spilled part: from its start on every attempt
            body.seek(0)
        return client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id,
                                  PartNumber=number, Body=body, ContentLength=length)

    async def upload(recv: trio.MemoryReceiveChannel[tuple[int, Any, int, _Part | None]]
                     ) -> None:
        async with recv:
            async for number, body, length, part in recv:
                try:
                    resp = await calls.call(
                        "upload_part", bucket, key,
                        functools.partial(send_part, number, body, length))
                finally:
                    if part is not None:
                        await buffers.put(part)
                etags[number] = resp["ETag"]

    try:
        try:
            async with trio.open_nursery() as nursery:
                send, recv = trio.open_memory_channel[tuple[int, Any, int, _Part | None]](0)
                async with recv:
                    for _ in range(concurrency):
                        nursery.start_soon(upload, recv.clone())
                blocks_send, blocks_recv = trio.open_memory_channel[
                    tuple[int, bytes | bytearray]](1)
                free: list[bytearray] = []
                nursery.start_soon(_read_blocks, image, blocks_send, free)
                async with send, blocks_recv:
                    total = size if allocated is None else max(1, allocated)
                    await _produce(enc, blocks_recv, send, buffers, total, progress,
                                   cpu_limiter, free)
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
                       send: trio.MemorySendChannel[tuple[int, bytes | bytearray]],
                       free: list[bytearray]) -> None:
    """(guest offset, bytes) of the snapshot's allocation in guest order, one
    block ahead of the encoder; the holes between are never read. Blocks are
    reused (``free``: given back by _produce once encoded and cut), not
    allocated per block, and filled by ``read_into``: the local store reads a
    cached chunk straight into the block and checks it there (xxh3), without
    the copy out of its own chunk buffer."""
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
            block = free.pop() if free else bytearray(READ_BLOCK)
            pos = 0
            while pos < want:
                # Up to the next MiB: within one window of the reader (whole MiB).
                n = min(want - pos, MiB - (offset + pos) % MiB)
                await image.read_into(offset + pos, memoryview(block)[pos:pos + n])
                pos += n
            if want == READ_BLOCK:
                await send.send((offset, block))
            else:  # the image's last bytes: a block of their own size
                data = bytes(memoryview(block)[:want])
                free.append(block)
                await send.send((offset, data))
            offset += want


class _Cutter:
    """Cuts the image's stream after the head (body, then tail) into parts:
    part 1's share first (its first MIN_PART - head_size bytes, held back and
    sent last, with the head), then parts of ``buffers.size`` bytes, sent as
    they fill; the last one holds what remains."""

    def __init__(self, head_size: int, buffers: _Buffers,
                 send: trio.MemorySendChannel[tuple[int, Any, int, _Part | None]],
                 io_limiter: trio.CapacityLimiter) -> None:
        # Part 1: room for the head (written at the end) and the body bytes
        # joining it, so that it is sent without being copied again.
        self.head_size = head_size
        self.first = bytearray(max(MIN_PART, head_size))
        self.first_fill = head_size
        self.buffers = buffers
        self.send = send
        self.io_limiter = io_limiter
        self.cur: _Part | None = None
        self.number = 2

    async def add(self, pieces: Sequence[bytes | memoryview]) -> None:
        """Take ``pieces`` (views that are not used after this returns)."""
        part_size = self.buffers.size
        for piece in pieces:
            view = memoryview(piece)
            while view:
                if self.first_fill < len(self.first):
                    n = min(len(view), len(self.first) - self.first_fill)
                    self.first[self.first_fill:self.first_fill + n] = view[:n]
                    self.first_fill += n
                    view = view[n:]
                    continue
                if self.cur is None:
                    self.cur = await self.buffers.get()
                n = min(len(view), part_size - self.cur.fill)
                self.cur.add(view[:n])
                view = view[n:]
                if self.cur.fill == part_size:
                    await self._send_cur()
        if self.cur is not None:
            await self.cur.flush(self.io_limiter)

    async def _send_cur(self) -> None:
        part, self.cur = self.cur, None
        assert part is not None
        try:
            await part.flush(self.io_limiter)
            await self.send.send((self.number, part.body(), part.fill, part))
        except BaseException:
            await self.buffers.put(part)
            raise
        self.number += 1

    async def finish(self, head: bytes) -> None:
        """The last part (if any), then part 1: the head and its share."""
        if self.cur is not None:
            await self._send_cur()
        body, self.first = self.first, bytearray()
        body[:self.head_size] = head  # same size: nothing moves
        del body[self.first_fill:]
        await self.send.send((1, body, len(body), None))

    async def aclose(self) -> None:
        if self.cur is not None:  # failed or cancelled mid-part: its file is closed
            part, self.cur = self.cur, None
            await self.buffers.put(part)


async def _produce(enc: StreamingEncoder,
                   blocks: trio.MemoryReceiveChannel[tuple[int, bytes | bytearray]],
                   send: trio.MemorySendChannel[tuple[int, Any, int, _Part | None]],
                   buffers: _Buffers, total: int, progress: ProgressFn,
                   cpu_limiter: trio.CapacityLimiter,
                   free: list[bytearray] | None = None) -> None:
    """Encode and cut into parts; part 1 (head + first body bytes) goes last.
    Blocks (bytearrays) are given back to ``free`` for _read_blocks to refill."""
    cutter = _Cutter(enc.head_size, buffers, send, cpu_limiter)
    try:
        done = 0
        async for offset, data in blocks:
            enc.skip_to(offset)
            # On this thread: feeding a block is a memcmp per cluster that stops at
            # its first non-zero byte (~20 us per 2 MiB of data; a 2 MiB block of
            # zero clusters ~0.1 ms, as an inline chunk read), while the hop to a
            # worker thread and back cost ~4x the encoding (py-spy, bench/encode.py).
            pieces = enc.feed_pieces(data)
            done = min(total, done + len(data))  # progress: allocated bytes done
            await cutter.add(pieces)
            del pieces  # the views into data: it can be refilled now
            if free is not None and isinstance(data, bytearray):
                free.append(data)
            del data
            progress(done, total)
        tail, head = await trio.to_thread.run_sync(enc.finish_pieces, limiter=cpu_limiter)
        await cutter.add(tail)
        del tail
        await cutter.finish(head)
    finally:
        await cutter.aclose()


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
