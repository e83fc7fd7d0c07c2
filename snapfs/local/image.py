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

    async def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        end = min(offset + length, self.size)
        first, last = offset // CHUNK_SIZE, (end - 1) // CHUNK_SIZE
        wanted = [i for i in range(first, last + 1) if i not in self._cache]
        fetched: dict[int, bytes] = {}
        if wanted:
            locs = self.index.locate(self.snap, wanted[0], wanted[-1])
            stored = [(i, locs[i]) for i in wanted if i in locs]
            if stored:  # one thread hand-off for all of this request's chunks
                fetched = await trio.to_thread.run_sync(self._fetch, stored,
                                                        limiter=self.limiter)
        parts = []
        for idx in range(first, last + 1):
            data = self._cache.get(idx) or fetched.get(idx)
            if data is None:  # a hole
                data = bytes(min(CHUNK_SIZE, self.size - idx * CHUNK_SIZE))
            else:
                self._remember(idx, data)
            base = idx * CHUNK_SIZE
            parts.append(data[max(offset, base) - base:min(end, base + CHUNK_SIZE) - base])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _fetch(self, stored: list[tuple[int, Location]]) -> dict[int, bytes]:
        return {i: self.packs.read(loc.pack, loc.offset, loc.length, loc.hash, loc.xxh)
                for i, loc in stored}

    def _remember(self, idx: int, data: bytes) -> None:
        self._cache[idx] = data
        self._cache.move_to_end(idx)
        while len(self._cache) > CACHED_CHUNKS:
            self._cache.popitem(last=False)

    async def aclose(self) -> None:
        self._cache.clear()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
