"""Random-access reads of a stored snapshot: chunk map lookups on the trio
thread, pread + hash verification in worker threads, a few verified chunks kept
so that small sequential reads do not re-read and re-verify a whole chunk."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import trio

from ..service import ImageReader
from .chunkindex import ChunkIndex, Location
from .chunks import CHUNK_SIZE, PackFiles

CACHED_CHUNKS = 4


class LocalImageReader(ImageReader):
    def __init__(self, snap: int, size: int, index: ChunkIndex, packs: PackFiles,
                 limiter: trio.CapacityLimiter,
                 on_close: Callable[[], None] | None = None) -> None:
        self.snap = snap
        self._on_close = on_close
        self.size = size
        self.index = index
        self.packs = packs
        self.limiter = limiter
        self._cache: OrderedDict[int, bytes] = OrderedDict()

    async def _chunk(self, idx: int, loc: Location | None) -> bytes:
        data = self._cache.get(idx)
        if data is not None:
            self._cache.move_to_end(idx)
            return data
        if loc is None:
            length = min(CHUNK_SIZE, self.size - idx * CHUNK_SIZE)
            return bytes(length)
        data = await trio.to_thread.run_sync(
            self.packs.read, loc.pack, loc.offset, loc.length, loc.hash, limiter=self.limiter)
        self._cache[idx] = data
        while len(self._cache) > CACHED_CHUNKS:
            self._cache.popitem(last=False)
        return data

    async def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        end = min(offset + length, self.size)
        first, last = offset // CHUNK_SIZE, (end - 1) // CHUNK_SIZE
        locs = self.index.locate(self.snap, first, last)
        parts = []
        for idx in range(first, last + 1):
            data = await self._chunk(idx, locs.get(idx))
            base = idx * CHUNK_SIZE
            parts.append(data[max(offset, base) - base:min(end, base + CHUNK_SIZE) - base])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def aclose(self) -> None:
        self._cache.clear()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
