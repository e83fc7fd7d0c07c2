"""Import: a QCOW2 object read with ranged GETs, as an ImageReader of its guest data.

Opening fetches the header, the L1 table and every L2 table and validates them
(so a truncated or corrupt mapping is refused before anything is stored). Reads map the
guest range through cached L2 tables (LRU, a bounded number of bytes), fetch the
host bytes they need with ranged GETs -- neighbouring ranges merged (compressed
clusters are packed back to back), large ones split into ``max_get`` pieces, all
in parallel under the S3 limiter -- and assemble (decompress) off the trio
thread. Sequential reads (the capture reads in order) grow a read-ahead window
up to ``readahead`` bytes, so each window costs one round of parallel GETs.
"""

from __future__ import annotations

import bisect
import logging
from array import array
from collections import OrderedDict

import trio

from ..errors import InvalidData, NotFound, SnapfsError
from ..qcow2.decoder import (COMPRESSED, DATA, HEADER_PROBE, Qcow2Map, assemble,
                             parse_header)
from ..qcow2.format import OFFSET_MASK
from ..service import ImageReader
from ..taskgroups import first_error
from .calls import S3Calls
from .config import S3Settings

log = logging.getLogger(__name__)

L2_CACHE_BYTES = 32 << 20
MERGE_GAP = 64 << 10  # fetch small gaps rather than issue another request
SEQ_SLACK = 1 << 20  # a read this close to the last one continues the stream


async def _get_range(calls: S3Calls, bucket: str, key: str, offset: int,
                     length: int) -> bytearray:
    client = calls.client
    # Allocated here, filled by the worker thread with readinto: big buffers made
    # in worker threads land in per-thread malloc arenas and fragment the heap
    # (a 512 MiB import measured 191 MiB peak RSS with read(), 170 with readinto).
    buf = bytearray(length)

    def fetch() -> int:
        resp = client.get_object(Bucket=bucket, Key=key,
                                 Range=f"bytes={offset}-{offset + length - 1}")
        body = resp["Body"]
        view = memoryview(buf)
        got = 0
        try:
            while got < length:
                n = body.readinto(view[got:])
                if not n:
                    break
                got += n
            if got == length and body.read(1):
                got += 1  # more than asked for: reported below
            return got
        finally:
            view.release()
            body.close()
    got = await calls.call("get_object", bucket, key, fetch)
    if got != length:
        raise InvalidData(f"object {bucket}/{key} returned {got} bytes at offset "
                          f"{offset}, expected {length} (changed during import?)")
    return buf


async def open_reader(calls: S3Calls, settings: S3Settings, bucket: str, key: str,
                      cpu_limiter: trio.CapacityLimiter) -> "S3Qcow2Reader":
    client = calls.client
    try:
        head = await calls.call("head_object", bucket, key,
                                lambda: client.head_object(Bucket=bucket, Key=key))
    except NotFound as missing:
        # A HEAD's 404 has no body: ask whether it is the bucket that is missing
        # (a NotFound from head_bucket says so; anything else -- e.g. no right
        # to list the bucket -- leaves the object's NotFound standing).
        try:
            await calls.call("head_bucket", bucket, None,
                             lambda: client.head_bucket(Bucket=bucket))
        except NotFound:
            raise
        except SnapfsError:
            pass
        raise missing from None
    size = int(head["ContentLength"])
    if size == 0:
        raise InvalidData(f"object {bucket}/{key} is empty, not a QCOW2 image")
    probe = await _get_range(calls, bucket, key, 0, min(HEADER_PROBE, size))
    header = parse_header(probe, size)
    l1_len = header.l1_size * 8
    l1 = await _get_range(calls, bucket, key, header.l1_table_offset, l1_len) \
        if l1_len else b""
    qmap = Qcow2Map(header, l1, size)
    reader = S3Qcow2Reader(calls, settings, bucket, key, qmap, cpu_limiter)
    await reader.validate_tables()
    log.info("import from %s/%s: QCOW2 v%d, %d bytes virtual, %d-byte clusters%s",
             bucket, key, header.version, header.size, header.cluster_size,
             ", zstd" if header.compression_type else "")
    return reader


class S3Qcow2Reader(ImageReader):
    def __init__(self, calls: S3Calls, settings: S3Settings, bucket: str, key: str,
                 qmap: Qcow2Map, cpu_limiter: trio.CapacityLimiter) -> None:
        self.calls = calls
        self.settings = settings
        self.bucket = bucket
        self.key = key
        self.map = qmap
        self.header = qmap.header
        self.size = qmap.size
        self.cpu_limiter = cpu_limiter
        self._l2: OrderedDict[int, array] = OrderedDict()
        self._l2_max = max(4, L2_CACHE_BYTES // self.header.cluster_size)
        #: Recently fetched guest windows, start -> bytes (LRU, a few read-aheads).
        self._windows: OrderedDict[int, bytes] = OrderedDict()
        self._window_bytes = 0
        #: Windows being fetched, done -> (start, end): readers inside wait for them.
        self._inflight: dict[trio.Event, tuple[int, int]] = {}
        self._next = 0  # where a sequential read would start
        self._ra = 0

    async def validate_tables(self) -> None:
        """Fetch and check every allocated L2 table once (8 bytes per guest
        cluster: 1/8192 of the virtual size with 64 KiB clusters; in parallel
        batches), so truncated or corrupt mappings are refused before the import
        stores anything. The last ones stay in the (32 MiB) L2 cache."""
        tables = [(i, e & OFFSET_MASK) for i, e in enumerate(self.map.l1) if e & OFFSET_MASK]
        step = max(1, 4 * self.settings.concurrency)
        for b in range(0, len(tables), step):
            batch = tables[b:b + step]
            got = await self._parallel([(off, self.header.cluster_size) for _, off in batch])
            for i, off in batch:
                table = self.map.parse_l2(got[off])
                await trio.to_thread.run_sync(self.map.check_l2, i, table,
                                              limiter=self.cpu_limiter)
                self._remember_l2(off, table)

    async def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        end = min(offset + length, self.size)
        while True:
            hit = self._cached(offset, end)
            if hit is not None:
                self._next = max(self._next, end)
                return hit
            pending = next((ev for ev, (o, e) in self._inflight.items()
                            if o <= offset and end <= e), None)
            if pending is None:
                break
            await pending.wait()  # FUSE's parallel reads of one stream share a fetch
        # Sequential (the capture; FUSE reads in order, several in flight): grow
        # the read-ahead window; anything else fetches just what it asks for.
        # "In order" allows some slack: concurrent reads reach us shuffled.
        slack = max(self._ra, SEQ_SLACK)
        if self._next - slack <= offset <= self._next + slack:
            self._ra = min(self.settings.readahead, max(2 * self._ra, end - offset))
        else:
            self._ra = 0
        want = min(max(end - offset, self._ra), self.size - offset)
        # Before the await: the next read is sequential too.
        self._next = max(self._next, offset + want) if self._ra else offset + want
        done = trio.Event()
        self._inflight[done] = (offset, offset + want)
        try:
            data = await self._fetch(offset, want)
        finally:
            del self._inflight[done]
            done.set()
        if len(data) == end - offset:
            return data  # all of it goes to the caller (the capture): nothing to keep
        self._remember_window(offset, data)
        return data[:end - offset]

    def _cached(self, offset: int, end: int) -> bytes | None:
        for start, data in self._windows.items():
            if start <= offset and end <= start + len(data):
                self._windows.move_to_end(start)
                return data[offset - start:end - start]
        return None

    def _remember_window(self, offset: int, data: bytes) -> None:
        old = self._windows.pop(offset, None)
        if old is not None:
            self._window_bytes -= len(old)
        self._windows[offset] = data
        self._window_bytes += len(data)
        while self._window_bytes > 2 * self.settings.readahead and len(self._windows) > 1:
            _, dropped = self._windows.popitem(last=False)
            self._window_bytes -= len(dropped)

    async def _fetch(self, offset: int, length: int) -> bytes:
        """Guest bytes offset..+length, from one round of parallel GETs."""
        # The tables this range needs, held locally: concurrent reads may evict
        # them from the shared LRU while this one awaits.
        tables: dict[int, array] = {}
        missing = []
        for o in dict.fromkeys(self.map.l2_offsets(offset, length)):
            cached = self._l2.get(o)
            if cached is None:
                missing.append(o)
            else:
                self._l2.move_to_end(o)
                tables[o] = cached
        if missing:
            got_tables = await self._parallel([(o, self.header.cluster_size)
                                               for o in missing])
            for o in missing:
                tables[o] = self.map.parse_l2(got_tables[o])
                self._remember_l2(o, tables[o])
        extents = self.map.extents(offset, length, tables.__getitem__)
        wanted: list[tuple[int, int]] = []
        for e in extents:
            if e.kind == DATA:
                wanted.append((e.host_offset, e.length))
            elif e.kind == COMPRESSED:
                wanted.append((e.host_offset, e.host_length))
        got = await self._parallel(self._plan(wanted)) if wanted else {}
        starts = sorted(got)

        views = {base: memoryview(data) for base, data in got.items()}

        def host_bytes(off: int, n: int) -> bytes | memoryview:
            # A wanted range lies in one merged range, maybe across its pieces;
            # views, not copies: assemble() copies once into the result.
            i = bisect.bisect_right(starts, off) - 1
            pieces: list[memoryview] = []
            while n > 0 and 0 <= i < len(starts):
                base = starts[i]
                piece = views[base][off - base:off - base + n]
                if not piece:
                    break
                pieces.append(piece)
                off += len(piece)
                n -= len(piece)
                i += 1
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)
        return await trio.to_thread.run_sync(assemble, extents, self.header, host_bytes,
                                             limiter=self.cpu_limiter)

    def _remember_l2(self, off: int, table: array) -> None:
        self._l2[off] = table
        while len(self._l2) > self._l2_max:
            self._l2.popitem(last=False)

    def _plan(self, wanted: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Merge neighbouring host ranges (compressed clusters sit back to back),
        then cut the merged ranges into ``max_get`` pieces fetched in parallel."""
        merged: list[list[int]] = []
        for off, n in sorted(wanted):
            if merged and off <= merged[-1][1] + MERGE_GAP:
                merged[-1][1] = max(merged[-1][1], off + n)
            else:
                merged.append([off, off + n])
        cap = self.settings.max_get
        return [(o, min(cap, hi - o)) for lo, hi in merged for o in range(lo, hi, cap)]

    async def _parallel(self, ranges: list[tuple[int, int]]) -> dict[int, bytes]:
        got: dict[int, bytes] = {}

        async def one(off: int, n: int) -> None:
            got[off] = await _get_range(self.calls, self.bucket, self.key, off, n)
        try:
            async with trio.open_nursery() as nursery:
                for off, n in ranges:
                    nursery.start_soon(one, off, n)
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        return got

    async def aclose(self) -> None:
        self._windows.clear()
        self._window_bytes = 0
        self._l2.clear()
