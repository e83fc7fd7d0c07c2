"""Export memory at any volume size (issue #16): parts too big for memory are
spilled to temporary files as they are encoded, so a part of 512 MiB costs the
read blocks, not 512 MiB; a spilled part is re-read from its start when its
upload is retried; an image needing parts over S3's 5 GiB is refused."""

from __future__ import annotations

import errno
import hashlib
import os
import tracemalloc
from pathlib import Path
from typing import Any

import botocore.exceptions as bex
import pytest
import trio

from fixtures_s3 import SeaweedServer, qemu_img_judges
from fixtures_store import MiB, ZONE, random_bytes, snapshot_of, write_volume
from snapfs.errors import TooLarge, errno_for
from snapfs.qcow2.encoder import StreamingEncoder
from snapfs.s3 import export
from snapfs.s3.export import (BUFFER_BUDGET, MIN_PART, _Buffers, _produce, export_qcow2,
                              part_plan)
from snapfs.service import ImageReader
from snapfs.local import open_local_service
from test_s3_service import wait_task

GiB, TiB = 1 << 30, 1 << 40


def test_part_plan_spills_what_memory_cannot_hold() -> None:
    assert part_plan(4, 6 * MiB) == (4, False)
    in_flight, spilled = part_plan(4, 512 * MiB)
    assert spilled and in_flight >= 1
    # Memory parts never pass the budget, whatever the part size.
    for size in (5 * MiB, 25 * MiB, 26 * MiB, 200 * MiB, 5 * GiB):
        n, spill = part_plan(4, size)
        assert spill or (n + 1) * size <= BUFFER_BUDGET
        assert n >= 1


class _Cut:
    """sha256 of each part of a stream cut as the export cuts it: part 1 is the
    first MIN_PART bytes, then ``part_size`` each."""

    def __init__(self, part_size: int) -> None:
        self.part_size = part_size
        self.digests: dict[int, str] = {}
        self.number, self.left, self.h = 1, MIN_PART, hashlib.sha256()

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = min(len(view), self.left)
            self.h.update(view[:n])
            view, self.left = view[n:], self.left - n
            if not self.left:
                self._next()

    def _next(self) -> None:
        self.digests[self.number] = self.h.hexdigest()
        self.number, self.left, self.h = self.number + 1, self.part_size, hashlib.sha256()

    def close(self) -> dict[int, str]:
        if self.left != (MIN_PART if self.number == 1 else self.part_size):
            self._next()
        return self.digests


async def test_parts_in_memory_are_sent_without_copies() -> None:
    """Part 1 (head + first body bytes) and the short last part are sent from
    the buffers they were filled in, not copied into new ``bytes`` first (which
    cost ~9 MiB of traced peak here, 6-20 MB of an export's peak RSS); the
    parts' bytes are the encoder's image, cut alike."""
    part_size, blocks, block = 8 * MiB, 14, 2 * MiB  # parts: 1, 2 and 3 full, 4 ~7 MiB
    base = os.urandom(block)

    def data(i: int) -> bytes:
        return i.to_bytes(8, "little") + base[8:]

    size = 2 * GiB
    got: dict[int, str] = {}
    sizes: dict[int, int] = {}
    buffers = _Buffers(part_size, 2)

    async def consume(recv: trio.MemoryReceiveChannel[tuple[int, Any, int, Any]]) -> None:
        async for number, body, length, part in recv:
            assert isinstance(body, bytearray) and len(body) == length
            assert part is None or body is part.buf  # the buffer itself, cut in place
            got[number], sizes[number] = hashlib.sha256(body).hexdigest(), length
            if part is not None:
                await buffers.put(part)

    async def feed(send: trio.MemorySendChannel[tuple[int, bytes]]) -> None:
        async with send:
            for i in range(blocks):
                await send.send((i * block, data(i)))

    enc = StreamingEncoder(size)
    async with trio.open_nursery() as nursery:
        send, recv = trio.open_memory_channel[tuple[int, Any, int, Any]](0)
        bsend, brecv = trio.open_memory_channel[tuple[int, bytes]](1)
        nursery.start_soon(consume, recv)
        nursery.start_soon(feed, bsend)
        async with send, brecv:
            await _produce(enc, brecv, send, buffers, blocks * block, lambda d, t: None,
                           trio.CapacityLimiter(2))
    assert sorted(got) == [1, 2, 3, 4] and sizes[1] == MIN_PART
    assert sizes[2] == sizes[3] == part_size and 6 * MiB < sizes[4] < part_size
    assert sum(sizes.values()) == enc.image_size
    assert buffers.made <= 2  # full parts reuse at most the two buffers

    ref = StreamingEncoder(size)  # the head first: known only at the end
    for i in range(blocks):
        ref.feed_pieces(data(i))
    cut = _Cut(part_size)
    cut.feed(ref.finish_pieces()[1])
    ref = StreamingEncoder(size)
    for i in range(blocks):
        for piece in ref.feed_pieces(data(i)):
            cut.feed(piece)
    for piece in ref.finish_pieces()[0]:
        cut.feed(piece)
    assert cut.close() == got


async def test_a_spilled_part_of_512_mib_costs_the_read_blocks(tmp_path: Path) -> None:
    part_size, blocks, block = 512 * MiB, 264, 2 * MiB  # 528 MiB: parts 1, 2 (full), 3
    base = os.urandom(block)

    def data(i: int) -> bytes:
        return i.to_bytes(8, "little") + base[8:]

    size = 4 * GiB
    spill = tmp_path / "spill"
    spill.mkdir()
    got: dict[int, str] = {}
    sizes: dict[int, int] = {}

    async def consume(recv: trio.MemoryReceiveChannel[tuple[int, Any, int, Any]],
                      buffers: _Buffers) -> None:
        async for number, body, length, part in recv:
            h = hashlib.sha256()
            if hasattr(body, "read"):  # spilled: read back as boto3 would
                body.seek(0)
                while chunk := await trio.to_thread.run_sync(body.read, MiB):
                    h.update(chunk)
                    del chunk
            else:
                h.update(body)
            got[number], sizes[number] = h.hexdigest(), length
            if part is not None:
                await buffers.put(part)

    async def feed(send: trio.MemorySendChannel[tuple[int, bytes]]) -> None:
        async with send:
            for i in range(blocks):
                await send.send((i * block, data(i)))

    enc = StreamingEncoder(size)
    buffers = _Buffers(part_size, 2, str(spill))
    tracemalloc.start()
    try:
        async with trio.open_nursery() as nursery:
            send, recv = trio.open_memory_channel[tuple[int, Any, int, Any]](0)
            bsend, brecv = trio.open_memory_channel[tuple[int, bytes]](1)
            nursery.start_soon(consume, recv, buffers)
            nursery.start_soon(feed, bsend)
            async with send, brecv:
                await _produce(enc, brecv, send, buffers, blocks * block, lambda d, t: None,
                               trio.CapacityLimiter(2))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sizes[2] == part_size and sorted(got) == [1, 2, 3]
    assert sum(sizes.values()) == enc.image_size
    assert peak < 24 * MiB, f"{peak / MiB:.1f} MiB traced for a {part_size // MiB} MiB part"
    assert list(spill.iterdir()) == []  # spilled parts leave nothing behind

    # The same bytes as the encoder's image, cut alike: a first pass for the
    # head (known only at the end), a second streaming head, body and tail.
    ref = StreamingEncoder(size)
    for i in range(blocks):
        ref.feed_pieces(data(i))
    head = ref.finish_pieces()[1]
    cut = _Cut(part_size)
    cut.feed(head)
    ref = StreamingEncoder(size)
    for i in range(blocks):
        for piece in ref.feed_pieces(data(i)):
            cut.feed(piece)
    for piece in ref.finish_pieces()[0]:
        cut.feed(piece)
    assert cut.close() == got


class _SpillFailsOnce:
    """A boto3 client whose first upload of a spilled part reads half the body
    and drops the connection (as a reset mid-body would)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.failed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def upload_part(self, **kw: Any) -> Any:
        body = kw["Body"]
        if hasattr(body, "read") and not self.failed:
            self.failed += 1
            body.read(kw["ContentLength"] // 2)
            raise bex.ConnectionClosedError(endpoint_url="http://test")
        return self._client.upload_part(**kw)


async def test_spilled_parts_round_trip_and_are_reread_on_retry(
        s3_server: SeaweedServer, bucket: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "BUFFER_BUDGET", 8 * MiB)  # 6 MiB parts: spilled
    size = 64 * MiB
    runs = [(0, random_bytes(9 * MiB, 3)), (30 * MiB, random_bytes(12 * MiB + 4096, 4))]
    vol = write_volume(tmp_path / "vol.raw", size, runs)
    objects = s3_server.objects(spill_dir=str(tmp_path))
    calls = await objects.calls_for()
    flaky = _SpillFailsOnce(calls.client)
    calls.client = flaky
    objects.calls_for = lambda zone=None: _ready(calls)  # type: ignore[method-assign]
    try:
        async with open_local_service(tmp_path / "store", objects=objects) as svc:
            snap = await snapshot_of(svc, vol)
            task = await svc.export_snapshot(ZONE, snap.id, bucket=bucket, key="spill.qcow2")
            t = await wait_task(svc, task.id, timeout=60)
            assert t.status == "success", t.error
    finally:
        await objects.aclose()
    assert flaky.failed == 1
    out = tmp_path / "spill.qcow2"
    s3_server.client().download_file(bucket, "spill.qcow2", str(out))
    qemu_img_judges(out, vol)


async def _ready(value: Any) -> Any:
    return value


class _Huge(ImageReader):
    """A snapshot claiming more data than 1,000 parts of 5 GiB hold; never read."""

    size = 64 * TiB

    async def read(self, offset: int, length: int) -> bytes:
        raise AssertionError("a refused export reads nothing")

    async def allocated_bytes(self) -> int | None:
        return 6 * TiB

    async def aclose(self) -> None:
        pass


async def test_an_image_needing_parts_over_5_gib_is_refused(
        s3_server: SeaweedServer, bucket: str) -> None:
    objects = s3_server.objects(max_parts=1000)
    try:
        calls = await objects.calls_for()
        with pytest.raises(TooLarge) as err:
            await export_qcow2(calls, objects.settings, _Huge(), bucket, "huge.qcow2",
                               lambda d, t: None, objects.cpu_limiter)
        assert errno_for(err.value) == errno.EFBIG
        client = s3_server.client()
        assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")
        assert not client.list_objects_v2(Bucket=bucket, Prefix="huge").get("Contents")
    finally:
        await objects.aclose()
