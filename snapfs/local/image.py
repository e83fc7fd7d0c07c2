"""Random-access reads of a stored snapshot.

The chunk map is looked up a window at a time (one query per LOC_WINDOW chunks,
not per read); chunks are read and checked in worker threads, several per thread
hand-off; for a sequential reader the next AHEAD chunks are fetched in the
background while it consumes the current ones, and a request for a chunk already
being fetched waits for that fetch instead of reading it again. On two cores the
per-request cost on the trio thread bounds throughput, so these are the costs cut.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Awaitable, Callable

import trio

from ..service import ImageReader
from .chunkindex import ChunkIndex, Location
from .chunks import CHUNK_SIZE, ZERO_CHUNK, PackFiles

#: Verified chunks kept per reader (a sequential reader's read-ahead lands here).
CACHED_CHUNKS = 8
#: Chunks fetched ahead of a sequential reader, in the same thread hand-off.
AHEAD = 4
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
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._inflight: dict[int, trio.Event] = {}
        self._failed: dict[int, Exception] = {}
        self._locs: dict[int, Location] = {}
        self._loc_window = (-1, -1)  # [start, end) of chunk indices in _locs
        self._next = 0  # the chunk a sequential reader asks for next

    def _location(self, idx: int) -> Location | None:
        start, end = self._loc_window
        if not start <= idx < end:
            start, end = idx, min(idx + LOC_WINDOW, self._chunks)
            self._locs = self.index.locate(self.snap, start, end - 1)
            self._loc_window = (start, end)
        return self._locs.get(idx)

    async def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        end = min(offset + length, self.size)
        first, last = offset // CHUNK_SIZE, (end - 1) // CHUNK_SIZE
        sequential = first in (self._next, self._next - 1)
        self._next = last + 1
        got = await self._get(first, last)
        if sequential and self._spawn is not None:
            ahead = range(last + 1, min(last + 1 + AHEAD, self._chunks))
            if any(i not in self._cache and i not in self._inflight for i in ahead):
                self._spawn(lambda: self._read_ahead(ahead.start, ahead.stop - 1))
        parts = []
        for idx in range(first, last + 1):
            base = idx * CHUNK_SIZE
            parts.append(got[idx][max(offset, base) - base:min(end, base + CHUNK_SIZE) - base])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _read_ahead(self, first: int, last: int) -> None:
        try:
            await self._fetch_missing(first, last)
        except Exception:  # reported (again) to the request that wants those bytes
            pass

    async def _fetch_missing(self, first: int, last: int) -> None:
        """Fetch the chunks of first..last that are neither cached nor being
        fetched, in one thread hand-off."""
        todo: list[tuple[int, Location]] = []
        for idx in range(first, last + 1):
            if idx in self._cache or idx in self._inflight:
                continue
            loc = self._location(idx)
            if loc is not None:
                todo.append((idx, loc))
        if todo:
            done = trio.Event()
            for idx, _ in todo:
                self._inflight[idx] = done
            try:
                fetched = await trio.to_thread.run_sync(self._fetch, todo, limiter=self.limiter)
            finally:
                for idx, _ in todo:
                    self._inflight.pop(idx, None)
                done.set()
            for idx, data in fetched.items():
                if isinstance(data, Exception):
                    self._failed[idx] = data
                else:
                    self._remember(idx, data)

    async def _get(self, first: int, last: int) -> dict[int, bytes]:
        """Chunks first..last, verified (or zeros for holes)."""
        await self._fetch_missing(first, last)
        out: dict[int, bytes] = {}
        for idx in range(first, last + 1):
            while idx in self._inflight:  # another request is fetching it
                await self._inflight[idx].wait()
            if idx in self._failed:
                raise self._failed.pop(idx)
            data = self._cache.get(idx)
            if data is None:
                if self._location(idx) is not None:  # evicted meanwhile: fetch it alone
                    data = (await self._get(idx, idx))[idx]
                else:  # a hole: one shared zero chunk, no allocation per read
                    n = min(CHUNK_SIZE, self.size - idx * CHUNK_SIZE)
                    data = ZERO_CHUNK if n == CHUNK_SIZE else bytes(n)
            out[idx] = data
        return out

    def _fetch(self, todo: list[tuple[int, Location]]) -> dict[int, bytes | Exception]:
        out: dict[int, bytes | Exception] = {}
        for idx, loc in todo:
            try:
                out[idx] = self.packs.read(loc.pack, loc.offset, loc.length, loc.hash, loc.xxh)
            except Exception as exc:  # reported to whoever reads that chunk
                out[idx] = exc
        return out

    def _remember(self, idx: int, data: bytes) -> None:
        self._cache[idx] = data
        self._cache.move_to_end(idx)
        while len(self._cache) > CACHED_CHUNKS:
            self._cache.popitem(last=False)

    async def aclose(self) -> None:
        self._cache.clear()
        self._failed.clear()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
