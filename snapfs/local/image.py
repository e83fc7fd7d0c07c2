"""Random-access reads of a stored snapshot.

The chunk map is looked up a window at a time (one query per LOC_WINDOW chunks,
not per read). A chunk whose bytes are all in the page cache is read and checked
right on the trio thread (RWF_NOWAIT: it never waits for the disk), which costs
less than a round trip through a worker thread. Any other chunk is read and
checked in worker threads, several per hand-off; while a sequential reader is
being served from the disk, the next chunks are fetched in batches in the
background, and a request for a chunk already being fetched waits for that fetch
instead of reading it again. On two cores the per-request cost on the trio
thread bounds throughput, so these are the costs cut.
"""

from __future__ import annotations

import logging
import mmap
from collections import OrderedDict
from typing import Awaitable, Callable

import trio

from ..service import Buffer, ImageReader
from .chunkindex import ChunkIndex, Location
from .chunks import CHUNK_SIZE, ZERO_CHUNK, PackFiles, chunk_buffer

ZERO_VIEW = memoryview(ZERO_CHUNK)

log = logging.getLogger(__name__)

#: Verified chunks kept per reader (a sequential reader's read-ahead lands here).
CACHED_CHUNKS = 12
#: Chunks one request may span (well within CACHED_CHUNKS; see read()).
MAX_REQUEST_CHUNKS = 4
#: A sequential reader served from the disk gets its next READ_AHEAD chunks
#: fetched in one thread hand-off once fewer than AHEAD_LOW are ready ahead of it.
READ_AHEAD = 6
AHEAD_LOW = 2
#: Released chunk buffers kept for reuse (a streaming reader needs one or two;
#: the rest are unmapped, so many open images do not pin their peak memory).
SPARE_BUFFERS = 4
#: Chunk-map entries looked up per query.
LOC_WINDOW = 256


class LocalImageReader(ImageReader):
    def __init__(self, snap: int, size: int, index: ChunkIndex, packs: PackFiles,
                 limiter: trio.CapacityLimiter,
                 on_close: Callable[[], None] | None = None,
                 spawn: Callable[[Callable[[], Awaitable[None]]], None] | None = None) -> None:
        self.snap = snap
        self._spawn = spawn  # starts a background task (the service's nursery)
        self.size = size
        self.index = index
        self.packs = packs
        self.limiter = limiter
        self._on_close = on_close
        self._chunks = (size + CHUNK_SIZE - 1) // CHUNK_SIZE
        self._cache: OrderedDict[int, memoryview] = OrderedDict()  # read-only views
        self._free: list[mmap.mmap] = []  # chunk buffers to reuse
        self._inflight: dict[int, trio.Event] = {}
        self._failed: dict[int, Exception] = {}
        self._locs: dict[int, Location] = {}
        self._loc_window = (-1, -1)  # [start, end) of chunk indices in _locs
        self._next = 0  # the chunk a sequential reader asks for next
        self._ahead = 0  # read-ahead has been started up to (not including) this chunk
        self._cold = True  # the last chunk read had to come from the disk
        self._closed = False
        #: chunks read on the trio thread / by workers: logged at close (tuning aid)
        self.stats = {"inline": 0, "worker": 0}

    def _location(self, idx: int) -> Location | None:
        start, end = self._loc_window
        if not start <= idx < end:
            start, end = idx, min(idx + LOC_WINDOW, self._chunks)
            self._locs = self.index.locate(self.snap, start, end - 1)
            self._loc_window = (start, end)
        return self._locs.get(idx)

    async def read(self, offset: int, length: int) -> bytes:
        # A request must fit in the chunk cache (it holds all its chunks at once,
        # or fetches them again forever): longer ones are read in parts.
        span = MAX_REQUEST_CHUNKS * CHUNK_SIZE
        if length <= span:
            return bytes(await self.read_transient(offset, length))
        parts = []
        for start in range(offset, min(offset + length, self.size), span):
            parts.append(bytes(await self.read_transient(
                start, min(span, offset + length - start))))
        return b"".join(parts)

    async def read_transient(self, offset: int, length: int) -> Buffer:
        """As read(), but the bytes may be a view of one of the reader's pooled
        chunk buffers: valid until the caller next awaits. Chunk buffers are
        reused (no allocation, no zeroing per MiB), which is safe because every
        buffer of a request is taken after its last await (see _get)."""
        if offset >= self.size or length <= 0:
            return b""
        if length > MAX_REQUEST_CHUNKS * CHUNK_SIZE:
            return await self.read(offset, length)
        end = min(offset + length, self.size)
        first, last = offset // CHUNK_SIZE, (end - 1) // CHUNK_SIZE
        sequential = first in (self._next, self._next - 1)
        self._next = last + 1
        if not sequential:
            self._ahead = last + 1
        got = await self._get(first, last)
        # No await from here on: the views below must reach the caller intact.
        if sequential and self._cold and self._spawn is not None:
            self._read_ahead_from(last + 1)
        if sequential and end == min((last + 1) * CHUNK_SIZE, self.size):
            # A streaming reader is done with its last chunk: its buffer is the
            # next one filled, still warm in the CPU cache (a ring of buffers
            # would make every copy miss it).
            self._release(last)
        if first == last:
            base = first * CHUNK_SIZE
            data = got[0]
            if offset == base and end - base == len(data):
                return data
            return data[offset - base:end - base]  # a view: slicing bytes would copy
        parts = []
        for idx, data in zip(range(first, last + 1), got):
            base = idx * CHUNK_SIZE
            parts.append(data[max(offset, base) - base:min(end, base + CHUNK_SIZE) - base])
        return b"".join(parts)

    def _read_ahead_from(self, nxt: int) -> None:
        if self._ahead - nxt >= AHEAD_LOW or nxt >= self._chunks:
            return
        start = max(self._ahead, nxt)
        stop = min(start + READ_AHEAD, self._chunks)
        self._ahead = stop
        assert self._spawn is not None
        self._spawn(lambda: self._read_ahead(start, stop - 1))

    async def _read_ahead(self, first: int, last: int) -> None:
        if self._closed:  # started for a reader closed since
            return
        try:  # chunks the reader went past meanwhile are not wanted any more
            await self._fetch_missing(max(first, self._next), last)
        except Exception:  # chunk errors are kept for their readers: this is a bug
            log.exception("read-ahead of chunks %d-%d failed", first, last)

    async def _fetch_missing(self, first: int, last: int) -> None:
        """Fetch the chunks of first..last that are neither cached nor being
        fetched, in one thread hand-off."""
        todo: list[tuple[int, Location, mmap.mmap | None]] = []
        for idx in range(first, last + 1):
            if idx in self._cache or idx in self._inflight:
                continue
            loc = self._location(idx)
            if loc is not None:
                todo.append((idx, loc, self._free.pop() if self._free else None))
        if not todo:
            return
        done = trio.Event()
        for idx, _, _ in todo:
            self._inflight[idx] = done
        try:
            fetched = await trio.to_thread.run_sync(self._fetch, todo, limiter=self.limiter)
        finally:
            for idx, _, _ in todo:
                self._inflight.pop(idx, None)
            done.set()
        if self._closed:
            return
        self.stats["worker"] += len(fetched)
        cached = True
        for idx, (buf, length, result) in fetched.items():
            if isinstance(result, Exception):
                self._failed[idx] = result
                self._free.append(buf)
            else:
                cached = cached and result
                self._remember(idx, memoryview(buf)[:length].toreadonly())
        # Chunks the page cache held after all: back to reading on this thread.
        self._cold = not cached

    async def _get(self, first: int, last: int) -> list[Buffer]:
        """Chunks first..last, verified (or zeros for holes), as read-only views.
        They are collected with no await in between and after the last one, so
        that no pooled buffer among them is reused before the caller is done."""
        while True:
            for idx in range(first, last + 1):
                if idx not in self._cache and idx not in self._inflight:
                    await self._read_if_cached(idx)
            await self._fetch_missing(first, last)
            for idx in range(first, last + 1):
                while idx in self._inflight:  # another request is fetching it
                    await self._inflight[idx].wait()
                if idx in self._failed:
                    raise self._failed.pop(idx)
            out: list[Buffer] = []
            for idx in range(first, last + 1):
                data = self._cache.get(idx)
                if data is None:
                    if self._location(idx) is not None:
                        break  # evicted while this request waited: fetch again
                    n = min(CHUNK_SIZE, self.size - idx * CHUNK_SIZE)
                    data = ZERO_VIEW if n == CHUNK_SIZE else memoryview(bytes(n))
                out.append(data)
            else:
                return out

    async def _read_if_cached(self, idx: int) -> None:
        """Read chunk idx on this thread if the page cache holds all of it."""
        loc = self._location(idx)
        if loc is None:
            return
        if not self.packs.is_open(loc.pack):
            try:
                await trio.to_thread.run_sync(self.packs.open, loc.pack, limiter=self.limiter)
            except FileNotFoundError:
                return  # the worker's read reports the missing pack
            if idx in self._cache or idx in self._inflight:
                return
        buf = self._free.pop() if self._free else chunk_buffer()
        view = memoryview(buf)[:loc.length]
        ok = self.packs.read_if_cached(loc.pack, loc.offset, loc.length, loc.hash, loc.xxh,
                                       view)
        self._cold = not ok
        if ok:
            self.stats["inline"] += 1
            self._remember(idx, view.toreadonly())
        else:
            self._free.append(buf)

    def _fetch(self, todo: list[tuple[int, Location, mmap.mmap | None]]
               ) -> dict[int, tuple[mmap.mmap, int, bool | Exception]]:
        """In a worker: each chunk into its buffer (a new one if none was free),
        with whether the page cache held it all or the error to report."""
        out: dict[int, tuple[mmap.mmap, int, bool | Exception]] = {}
        for idx, loc, buf in todo:
            if buf is None:
                buf = chunk_buffer()
            view = memoryview(buf)[:loc.length]
            result: bool | Exception
            try:
                result = self.packs.read_if_cached(loc.pack, loc.offset, loc.length,
                                                   loc.hash, loc.xxh, view)
                if not result:
                    self.packs.read_into(loc.pack, loc.offset, loc.length, loc.hash,
                                         loc.xxh, view)
            except Exception as exc:  # reported to whoever reads that chunk
                result = exc
            out[idx] = (buf, loc.length, result)
        return out

    def _remember(self, idx: int, data: memoryview) -> None:
        self._cache[idx] = data
        self._cache.move_to_end(idx)
        while len(self._cache) > CACHED_CHUNKS:
            self._release(next(iter(self._cache)))

    def _release(self, idx: int) -> None:
        """Drop chunk idx from the cache; a pooled buffer goes back to the pool
        (last in, first out). Views of it already handed out stay valid until
        the caller awaits: nothing refills it before the next read."""
        data = self._cache.pop(idx, None)
        if (data is not None and isinstance(data.obj, mmap.mmap)
                and len(self._free) < SPARE_BUFFERS):
            self._free.append(data.obj)

    async def next_allocated(self, offset: int) -> int:
        idx = self.index.next_mapped(self.snap, offset // CHUNK_SIZE)
        return self.size if idx is None else min(self.size, max(offset, idx * CHUNK_SIZE))

    async def allocated_bytes(self) -> int | None:
        count = await trio.to_thread.run_sync(self.index.mapped_count, self.snap,
                                              limiter=self.limiter)
        return min(self.size, count * CHUNK_SIZE)

    async def aclose(self) -> None:
        log.debug("image reader closed: %s", self.stats)
        self._closed = True
        self._cache.clear()
        self._free.clear()
        self._failed.clear()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
