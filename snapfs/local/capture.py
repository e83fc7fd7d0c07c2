"""Capture: a volume's (or an imported image's) bytes into the chunk store.

Two stages joined by a one-slot memory channel, so memory stays at a few
batches whatever the volume's size:
  1. read + zero-check + hash a batch of chunks (in a worker thread), skipping
     ranges the file reports as holes (SEEK_DATA) without reading them;
  2. under the index lock: look up which hashes are new, append those to this
     capture's pack, fdatasync, then commit chunk rows + map entries + progress.
Stage 1 of batch n+1 runs while stage 2 of batch n writes, using both cores.
"""

from __future__ import annotations

import abc
import errno
import os
from dataclasses import dataclass
from typing import Awaitable, Callable

import trio

from ..service import ImageReader
from .chunkindex import ChunkIndex
from .chunks import CHUNK_SIZE, PackFiles, PackWriter, digest, is_zero

BATCH_CHUNKS = 16


@dataclass
class Hashed:
    idx: int
    data: bytes | None  # None: all zeros (a hole)
    hash: bytes | None


class CaptureSource(abc.ABC):
    size: int

    @abc.abstractmethod
    async def read_batch(self, first: int, count: int) -> list[Hashed]:
        """Chunks first..first+count-1, read and hashed off the trio thread."""

    async def aclose(self) -> None:
        pass


def _hash_chunks(first: int, blocks: list[bytes | None]) -> list[Hashed]:
    out = []
    for i, data in enumerate(blocks):
        if data is None or is_zero(data):
            out.append(Hashed(first + i, None, None))
        else:
            out.append(Hashed(first + i, data, digest(data)))
    return out


class FileSource(CaptureSource):
    """A raw image file or block device, read with pread (holes skipped)."""

    def __init__(self, path: str, limiter: trio.CapacityLimiter) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.limiter = limiter
        self._seek_data = True

    def _has_data(self, start: int, end: int) -> bool:
        if not self._seek_data:
            return True
        try:
            return os.lseek(self.fd, start, os.SEEK_DATA) < end
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data at or after start
                return False
            self._seek_data = False  # device or filesystem without SEEK_DATA
            return True

    def _read(self, first: int, count: int) -> list[Hashed]:
        blocks: list[bytes | None] = []
        for idx in range(first, first + count):
            start = idx * CHUNK_SIZE
            end = min(start + CHUNK_SIZE, self.size)
            if not self._has_data(start, end):
                blocks.append(None)
                continue
            data = os.pread(self.fd, end - start, start)
            if len(data) != end - start:
                raise OSError(errno.EIO, f"short read from volume at {start}")
            blocks.append(data)
        return _hash_chunks(first, blocks)

    async def read_batch(self, first: int, count: int) -> list[Hashed]:
        return await trio.to_thread.run_sync(self._read, first, count, limiter=self.limiter)

    async def aclose(self) -> None:
        os.close(self.fd)


class ReaderSource(CaptureSource):
    """Any ImageReader (an imported QCOW2 object); hashing still off the trio thread."""

    def __init__(self, reader: ImageReader, limiter: trio.CapacityLimiter) -> None:
        self.reader = reader
        self.size = reader.size
        self.limiter = limiter

    async def read_batch(self, first: int, count: int) -> list[Hashed]:
        start = first * CHUNK_SIZE
        data = await self.reader.read(start, min(count * CHUNK_SIZE, self.size - start))
        blocks: list[bytes | None] = [data[i:i + CHUNK_SIZE]
                                      for i in range(0, len(data), CHUNK_SIZE)]
        return await trio.to_thread.run_sync(_hash_chunks, first, blocks, limiter=self.limiter)

    async def aclose(self) -> None:
        await self.reader.aclose()


class PackPool:
    """This process's packs that still take chunks; each lent to one capture at a time.
    Packs are never shared between processes: each process appends only to packs it
    created, so two daemons on one store cannot interleave writes."""

    def __init__(self, packs: PackFiles, index: ChunkIndex) -> None:
        self.packs = packs
        self.index = index
        self.idle: list[PackWriter] = []
        self.active: set[int] = set()

    def take(self) -> PackWriter:
        w = self.idle.pop() if self.idle else PackWriter(self.packs, self.index.new_pack(), 0)
        self.active.add(w.pack)
        return w

    def give_back(self, w: PackWriter) -> None:
        self.active.discard(w.pack)
        if w.full:
            w.close()
        else:
            self.idle.append(w)

    def retire(self, w: PackWriter) -> None:
        self.active.discard(w.pack)
        w.close()

    def ours(self) -> set[int]:
        return self.active | {w.pack for w in self.idle}

    def close(self) -> None:
        for w in self.idle:
            w.close()
        self.idle.clear()


async def capture(source: CaptureSource, snapshot_id: str, snap: int, index: ChunkIndex,
                  pool: PackPool, index_lock: trio.Lock, io_limiter: trio.CapacityLimiter,
                  on_progress: Callable[[int], Awaitable[None]] | None = None) -> None:
    """Store all of ``source`` as the chunk map of snapshot ``snap``. Raises on any
    failure; the caller then marks the snapshot and releases the partial map."""
    total = (source.size + CHUNK_SIZE - 1) // CHUNK_SIZE
    send, recv = trio.open_memory_channel[list[Hashed]](1)
    writer: PackWriter | None = None

    async def produce() -> None:
        async with send:
            for first in range(0, total, BATCH_CHUNKS):
                await send.send(await source.read_batch(first, min(BATCH_CHUNKS, total - first)))

    async def consume() -> None:
        nonlocal writer
        async with recv:
            async for batch in recv:
                stored = [h for h in batch if h.hash is not None]
                done = batch[-1].idx + 1
                async with index_lock:
                    known = index.known([h.hash for h in stored])  # type: ignore[misc]
                    fresh: dict[bytes, bytes] = {}
                    for h in stored:
                        if h.hash not in known:
                            fresh.setdefault(h.hash, h.data)  # type: ignore[arg-type]
                    new: list[tuple[bytes, int, int]] = []
                    if fresh:
                        if writer is None or writer.full:
                            if writer is not None:
                                pool.give_back(writer)
                            writer = pool.take()
                        w = writer

                        def write_all() -> list[tuple[bytes, int, int]]:
                            out = [(hh, w.append(d), len(d)) for hh, d in fresh.items()]
                            w.sync()
                            return out
                        new = await trio.to_thread.run_sync(write_all, limiter=io_limiter)
                    index.commit_batch(
                        snap, writer.pack if writer else None, writer.end if writer else 0,
                        new, [(h.idx, h.hash) for h in stored],  # type: ignore[misc]
                        (snapshot_id, min(99, done * 100 // max(total, 1))))
                if on_progress is not None:
                    await on_progress(done)

    ok = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            nursery.start_soon(consume)
        ok = True
    finally:
        if writer is not None:
            if ok:
                pool.give_back(writer)
            else:  # its tail may hold uncommitted bytes: the next exclusive open cuts them
                pool.retire(writer)
