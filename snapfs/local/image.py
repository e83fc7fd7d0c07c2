"""The readers of a local snapshot's bytes: its chunks in the store
(LocalImageReader) or, while they are being stored, its shadow (ShadowReader).
Both are a fetch under the one read-ahead engine (snapfs/readahead.py), in the
service's nursery.

LocalImageReader: the chunk map is looked up a window at a time (one query per
LOC_WINDOW chunks, not per read). A chunk whose bytes are all in the page cache
is read and checked right on the trio thread (RWF_NOWAIT: it never waits for
the disk), which costs less than a round trip through a worker thread. Any
other chunk is read and checked in a worker thread, as is every compressed
chunk (checked, then decompressed into a pooled chunk buffer: compression.py);
while a sequential reader is being served from the disk or decompressed, the
next chunks are fetched in the background, and a
request for a chunk already being fetched waits for that fetch instead of
reading it again. On two cores the per-request cost on the trio thread bounds
throughput, so these are the costs cut.

Every window either reader caches or reads ahead is charged to the process's
one budget (snapfs.memory.READERS), and the chunk buffers released are kept in
its spare pool, shared by all readers: memory does not grow with the number of
open images (a reader past the budget reads without caching, more slowly).
"""

from __future__ import annotations

import logging
import mmap
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import trio

from ..errors import CorruptData
from ..memory import READERS, BufferBudget
from ..readahead import ReadAhead
from ..service import Buffer, ImageReader
from .allocation import data_bytes, seek_data, seek_hole
from .chunkindex import ChunkIndex, Location
from .chunks import CHUNK_SIZE, ZERO_CHUNK, PackFiles, chunk_buffer
from .compression import decompress_into

ZERO_VIEW = memoryview(ZERO_CHUNK)

log = logging.getLogger(__name__)

#: Verified chunks kept per reader at most (a sequential reader's read-ahead lands
#: here), while the process's budget has room for them.
CACHED_CHUNKS = 12
#: Chunks a sequential reader served from the disk has fetched ahead of it.
READ_AHEAD = 6
#: Chunk-map entries looked up per query.
LOC_WINDOW = 256
#: ShadowReader reads this much at a time, and this many windows ahead of a
#: sequential reader.
WINDOW = 4 << 20
AHEAD = 2


def chunk_cost(data: Buffer) -> int:
    """What a cached chunk costs the budget: its whole buffer (a short chunk's
    too); the shared chunk of zeros (a hole) nothing."""
    if data is ZERO_VIEW:
        return 0
    obj = data.obj if isinstance(data, memoryview) else None
    return len(obj) if isinstance(obj, mmap.mmap) else len(data)


class LocalImageReader(ImageReader):
    """Chunks as the engine's windows: chunk buffers are pooled (no allocation,
    no zeroing per MiB) and lent to FUSE replies without a copy (see
    ReadAhead.read_transient)."""

    def __init__(self, snap: int, size: int, index: ChunkIndex, packs: PackFiles,
                 limiter: trio.CapacityLimiter, nursery: trio.Nursery | None,
                 on_close: Callable[[], None] | None = None,
                 on_damaged: Callable[[Location], None] | None = None,
                 budget: BufferBudget = READERS) -> None:
        self.snap = snap
        self.size = size
        self.index = index
        self.packs = packs
        self.limiter = limiter
        self._on_close = on_close
        self._on_damaged = on_damaged
        self._chunks = (size + CHUNK_SIZE - 1) // CHUNK_SIZE
        self.budget = budget  # its spare pool: chunk buffers to reuse, of every reader
        self._locs: dict[int, Location] = {}
        self._loc_window = (-1, -1)  # [start, end) of chunk indices in _locs
        #: [start, end) chunk indices the last SEEK_HOLE found mapped, end not: the
        #: map cannot change while a reader is open (deletes wait), so a tool that
        #: asks again from further in the run is answered without a scan.
        self._run = (-1, -1)
        #: chunks read on the trio thread / by workers: logged at close (tuning aid)
        self.stats = {"inline": 0, "worker": 0, "zstd": 0}
        # A request within a chunk or the next one continues the stream; a chunk
        # it has read to the end goes back to the pool at once: its buffer is the
        # next one filled, still warm in the CPU cache.
        self.ra = ReadAhead(self._fetch, size, nursery, window=CHUNK_SIZE, ahead=READ_AHEAD,
                            cached=CACHED_CHUNKS, slack=CHUNK_SIZE, behind=0,
                            fast=self._read_if_cached, on_drop=self._release,
                            name=f"snapshot {snap}", budget=budget, cost=chunk_cost)

    def _location(self, idx: int) -> Location | None:
        start, end = self._loc_window
        if not start <= idx < end:
            start, end = idx, min(idx + LOC_WINDOW, self._chunks)
            self._locs = self.index.locate(self.snap, start, end - 1)
            self._loc_window = (start, end)
        return self._locs.get(idx)

    async def read(self, offset: int, length: int) -> bytes:
        return await self.ra.read(offset, length)

    async def read_transient(self, offset: int, length: int) -> Buffer:
        return await self.ra.read_transient(offset, length)

    async def read_into(self, offset: int, into: memoryview) -> None:
        """A whole stored chunk whose bytes are in the page cache is read straight
        into ``into`` and checked there (a streaming export saves the copy out
        of a chunk buffer); anything else -- a hole, a compressed chunk, a part
        of a chunk, a chunk on the disk, one the engine holds (read ahead, or
        failed: its error is this read's) -- goes through the read-ahead engine
        as read_transient does (a cold stream keeps its read-ahead)."""
        n = len(into)
        loc = (self._location(offset // CHUNK_SIZE)
               if offset % CHUNK_SIZE == 0 and not self.ra.holds(offset) else None)
        if loc is not None and loc.raw_length is None and loc.length == n:
            with self._noting(loc):
                cached = self.packs.read_if_cached(loc.pack, loc.offset, n, loc.hash, loc.xxh,
                                                   into)
            if cached:
                self.stats["inline"] += 1
                return
        await super().read_into(offset, into)

    @staticmethod
    def _zeros(n: int) -> memoryview:
        return ZERO_VIEW if n == CHUNK_SIZE else memoryview(bytes(n))

    async def _read_if_cached(self, start: int, n: int) -> Buffer | None:
        """The chunk at ``start`` read on this thread if the page cache holds all
        of it (a hole: zeros); None if not."""
        loc = self._location(start // CHUNK_SIZE)
        if loc is None:
            return self._zeros(n)
        if loc.raw_length is not None:  # decompressing is a worker's job
            return None
        if not self.packs.is_open(loc.pack):
            try:
                await trio.to_thread.run_sync(self.packs.open, loc.pack, limiter=self.limiter)
            except FileNotFoundError:
                return None  # the worker's read reports the missing pack
        buf = self.budget.take_spare(CHUNK_SIZE) or chunk_buffer()
        view = memoryview(buf)[:loc.length]
        try:
            with self._noting(loc):
                cached = self.packs.read_if_cached(loc.pack, loc.offset, loc.length, loc.hash,
                                                   loc.xxh, view)
        except BaseException:
            self.budget.give_spare(buf)
            raise
        if cached:
            self.stats["inline"] += 1
            return view.toreadonly()
        self.budget.give_spare(buf)
        return None

    @contextmanager
    def _noting(self, loc: Location) -> Iterator[None]:
        """Bytes that read wrong (CorruptData) are reported to the store, which
        marks the chunk damaged: deduplication then skips it and the next
        snapshot holding those bytes heals it (chunkindex._heal), as
        ``fsck --repair`` would have. The error stays the reader's."""
        try:
            yield
        except CorruptData:
            if self._on_damaged is not None:
                self._on_damaged(loc)
            raise

    async def _fetch(self, start: int, n: int) -> Buffer:
        """The chunk at ``start``, read and checked in a worker thread."""
        loc = self._location(start // CHUNK_SIZE)
        if loc is None:
            return self._zeros(n)
        compressed = loc.raw_length is not None
        buf = self.budget.take_spare(CHUNK_SIZE)
        try:
            with self._noting(loc):
                got = await trio.to_thread.run_sync(
                    self._read_compressed if compressed else self._read_chunk, loc, buf,
                    limiter=self.limiter)
        except BaseException:
            if buf is not None:
                self.budget.give_spare(buf)
            raise
        self.stats["zstd" if compressed else "worker"] += 1
        return memoryview(got)[:loc.raw_length if compressed else loc.length].toreadonly()

    def _read_chunk(self, loc: Location, buf: mmap.mmap | None) -> mmap.mmap:
        """In a worker: the chunk into ``buf`` (a new one if None), checked."""
        if buf is None:
            buf = chunk_buffer()
        view = memoryview(buf)[:loc.length]
        if not self.packs.read_if_cached(loc.pack, loc.offset, loc.length, loc.hash, loc.xxh,
                                         view):
            self.packs.read_into(loc.pack, loc.offset, loc.length, loc.hash, loc.xxh, view)
        return buf

    def _read_compressed(self, loc: Location, buf: mmap.mmap | None) -> mmap.mmap:
        """In a worker: a zstd chunk's stored bytes, checked (xxh3 of the stored
        bytes: corruption is CorruptData, never fed to the decompressor), then
        decompressed into ``buf`` (a new one if None) and its length checked."""
        assert loc.raw_length is not None
        if buf is None:
            buf = chunk_buffer()
        stored = self.packs.read(loc.pack, loc.offset, loc.length, loc.hash, loc.xxh)
        decompress_into(stored, memoryview(buf)[:loc.raw_length],
                        f"chunk {loc.hash.hex()[:16]} in pack {loc.pack} at {loc.offset}")
        return buf

    def _release(self, data: Buffer) -> None:
        """A chunk left the cache: a pooled buffer goes back to the pool (last in,
        first out)."""
        if (isinstance(data, memoryview) and isinstance(data.obj, mmap.mmap)
                and len(data.obj) == CHUNK_SIZE):
            self.budget.give_spare(data.obj)

    async def next_allocated(self, offset: int) -> int:
        idx = self.index.next_mapped(self.snap, offset // CHUNK_SIZE)
        return self.size if idx is None else min(self.size, max(offset, idx * CHUNK_SIZE))

    async def next_hole(self, offset: int) -> int:
        first = offset // CHUNK_SIZE
        start, end = self._run
        if not start <= first < end:
            end = await trio.to_thread.run_sync(self.index.next_unmapped, self.snap, first,
                                                limiter=self.limiter)
            if end > first:
                self._run = (first, end)
        return min(self.size, max(offset, end * CHUNK_SIZE))

    async def allocated_bytes(self) -> int | None:
        count = await trio.to_thread.run_sync(self.index.mapped_count, self.snap,
                                              limiter=self.limiter)
        return min(self.size, count * CHUNK_SIZE)

    async def aclose(self) -> None:
        log.debug("image reader closed: %s", self.stats)
        try:
            await self.ra.aclose()
        finally:
            if self._on_close is not None:
                self._on_close()
                self._on_close = None


class ShadowReader(ImageReader):
    """A snapshot's bytes while its chunks are still being stored: its shadow
    (shadows.py), which nothing writes, read as it is -- WINDOW bytes per
    worker-thread pread, kept for the requests that follow (FUSE's are far
    smaller), and for a sequential reader the next AHEAD windows read ahead."""

    def __init__(self, path: Path, size: int, limiter: trio.CapacityLimiter,
                 nursery: trio.Nursery | None, on_close: Callable[[], None],
                 budget: BufferBudget = READERS) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.path = path
        self.size = size
        self.limiter = limiter
        self._on_close: Callable[[], None] | None = on_close
        self.ra = ReadAhead(self._pread, size, nursery, window=WINDOW, ahead=AHEAD,
                            cached=AHEAD + 2, name=str(path), budget=budget)

    async def read(self, offset: int, length: int) -> bytes:
        return await self.ra.read(offset, length)

    async def read_transient(self, offset: int, length: int) -> Buffer:
        return await self.ra.read_transient(offset, length)

    async def next_allocated(self, offset: int) -> int:
        return await trio.to_thread.run_sync(seek_data, self.fd, offset, self.size,
                                             limiter=self.limiter)

    async def next_hole(self, offset: int) -> int:
        return await trio.to_thread.run_sync(seek_hole, self.fd, offset, self.size,
                                             limiter=self.limiter)

    async def allocated_bytes(self) -> int | None:
        return await trio.to_thread.run_sync(data_bytes, self.fd, self.size,
                                             limiter=self.limiter)

    async def _pread(self, offset: int, n: int) -> bytes:
        data = await trio.to_thread.run_sync(os.pread, self.fd, n, offset,
                                             limiter=self.limiter)
        if len(data) != n:
            raise CorruptData(f"{self.path} ends before the snapshot's size")
        return data

    async def aclose(self) -> None:
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            try:
                await self.ra.aclose()  # a read-ahead still uses the descriptor
            finally:
                os.close(self.fd)
                on_close()
