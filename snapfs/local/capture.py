"""Capture: a volume's (or an imported image's) bytes into the chunk store.

Three stages joined by memory channels (rendezvous ones when compressing: each
stage holds one batch), so memory stays at a few batches whatever the volume's
size:
  1. read + zero-check + hash a batch of chunks (in worker threads), skipping
     ranges the file reports as holes (SEEK_DATA) without reading them;
  2. compress the chunks the index does not hold yet (where it pays, in
     parallel: compression.py) -- a hint looked up without the index lock, so a
     second snapshot compresses only its new chunks;
  3. under the index lock: look up which hashes are new (the answer that
     counts: a chunk the hint missed is compressed here, one stored meanwhile
     is dropped), append them to this capture's pack, fdatasync, then commit
     chunk rows + map entries + progress.
While stage 3 writes and syncs batch n, stage 2 compresses n+1 and stage 1
reads n+2: the compression threads, most of a first snapshot's CPU, no longer
idle during the appends and fdatasyncs (as they did with compression in the
write step). At level 0 stage 2 is left out.
"""

from __future__ import annotations

import abc
import errno
import logging
import os
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import trio

from ..errors import SnapfsError, StoreFull
from ..service import ImageReader
from ..taskgroups import first_error
from .chunkindex import ChunkIndex
from .chunks import CHUNK_SIZE, PackWriter, check, digest, is_zero
from .compression import compress_all, store_level
from .packpool import PackPool
from .shadows import Ranges, in_ranges
from .volumefile import VolumeFile, open_volume
from .storelocks import StoreLock

log = logging.getLogger(__name__)

BATCH_CHUNKS = 16
#: Fresh bytes (and map entries) per fdatasync + commit.
GROUP_BYTES = 128 << 20
#: Map entries per commit when little is new: bounds how long a delete waits for
#: the index lock behind a capture (256 MiB of reading).
GROUP_REFS = 256
READ_THREADS = 2


@dataclass
class Hashed:
    idx: int
    data: bytes | memoryview | None  # None: all zeros (a hole)
    hash: bytes | None
    #: Stage 2's verdict: None = not tried; b"" = stays raw; else the zstd frame
    #: stored instead of ``data``.
    packed: bytes | None = None


class CaptureSource(abc.ABC):
    size: int
    #: A file whose chunk idx lies at idx * CHUNK_SIZE and never changes (a
    #: shadow, shadows.py): new chunks are cloned from it into packs, not written.
    clone_fd: int | None = None

    @abc.abstractmethod
    async def read_batch(self, first: int, count: int) -> list[Hashed]:
        """Chunks first..first+count-1, read and hashed off the trio thread."""

    async def next_data(self, offset: int) -> int:
        """The first offset >= ``offset`` that may hold data (size when none):
        lets a capture jump over the holes of a huge sparse volume."""
        return offset

    def percent(self, next_idx: int) -> int:
        """Progress once chunks before ``next_idx`` are stored (0..99)."""
        total = -(-self.size // CHUNK_SIZE)
        return min(99, next_idx * 100 // max(total, 1))

    async def aclose(self) -> None:
        pass


def _hash_chunks(first: int, blocks: list[bytes | memoryview | None]) -> list[Hashed]:
    out = []
    for i, data in enumerate(blocks):
        if data is None or is_zero(data):
            out.append(Hashed(first + i, None, None))
        else:
            out.append(Hashed(first + i, data, digest(data)))
    return out


class FileSource(CaptureSource):
    """A raw image file or block device, read with pread (holes skipped): a
    volume, opened only if it is still the file registered (volumefile.py), or a
    shadow of one. With ``only`` (chunk index ranges), the chunks outside them are
    skipped like holes: the snapshot's map already has them (an incremental
    capture, shadows.py)."""

    def __init__(self, path: str | VolumeFile, limiter: trio.CapacityLimiter,
                 size: int | None = None, only: Ranges | None = None,
                 clone: bool = False) -> None:
        self.only = only
        if isinstance(path, VolumeFile):
            self.fd = open_volume(path)[0]
        else:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if clone:
            self.clone_fd = self.fd
        # The size the snapshot was created with: a volume growing meanwhile must
        # not map chunks past the snapshot's size.
        self.size = size if size is not None else os.lseek(self.fd, 0, os.SEEK_END)
        self.limiter = limiter
        self.bytes_read = 0  # from the file: what a snapshot really cost (logged)
        self._count = threading.Lock()
        self._seek_data = True
        self._pool = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="capture")
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # bigger kernel readahead

    def _wanted(self, offset: int) -> bool:
        return self.only is None or in_ranges(self.only, offset // CHUNK_SIZE) == \
            offset // CHUNK_SIZE

    def _seek_data_from(self, offset: int) -> int:
        """The first offset >= ``offset`` that may hold data to read (size when none)."""
        while offset < self.size:
            if self.only is not None:
                idx = in_ranges(self.only, offset // CHUNK_SIZE)
                if idx is None:
                    return self.size
                offset = max(offset, idx * CHUNK_SIZE)
            found = self._lseek_data(offset)
            if found >= self.size or self._wanted(found):
                return found
            offset = found
        return self.size

    def _lseek_data(self, offset: int) -> int:
        if not self._seek_data:
            return offset
        try:
            return os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data at or after offset
                return self.size
            self._seek_data = False  # device or filesystem without SEEK_DATA
            return offset

    def _has_data(self, start: int, end: int) -> bool:
        return self._wanted(start) and self._lseek_data(start) < end

    def _read_one(self, idx: int) -> Hashed:
        start = idx * CHUNK_SIZE
        end = min(start + CHUNK_SIZE, self.size)
        if not self._has_data(start, end):
            return Hashed(idx, None, None)
        data = os.pread(self.fd, end - start, start)
        with self._count:
            self.bytes_read += len(data)
        if len(data) != end - start:
            raise OSError(errno.EIO, f"short read from volume at {start}")
        return _hash_chunks(idx, [data])[0]

    def _read(self, first: int, count: int) -> list[Hashed]:
        # Ask for the next batch now, so the disk works while this one is hashed.
        nxt = (first + count) * CHUNK_SIZE
        if nxt < self.size:
            os.posix_fadvise(self.fd, nxt, count * CHUNK_SIZE, os.POSIX_FADV_WILLNEED)
        # pread and blake3 both release the GIL: two chunks at a time use both cores,
        # which is what makes a mostly-unchanged second snapshot cheap.
        return list(self._pool.map(self._read_one, range(first, first + count)))

    async def read_batch(self, first: int, count: int) -> list[Hashed]:
        return await trio.to_thread.run_sync(self._read, first, count, limiter=self.limiter)

    async def next_data(self, offset: int) -> int:
        return await trio.to_thread.run_sync(self._seek_data_from, offset,
                                             limiter=self.limiter)

    async def aclose(self) -> None:
        # In a worker: a close may wait on the file's filesystem (a FLUSH over
        # FUSE or NFS), and the trio thread must go on answering meanwhile.
        # Shielded: a cancelled capture closes its file all the same.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._close, limiter=self.limiter)

    def _close(self) -> None:
        self._pool.shutdown()
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

        def split_and_hash() -> list[Hashed]:
            # Views, not slices: a slice would copy the batch once more (import RSS).
            view = memoryview(data)
            return _hash_chunks(first, [view[i:i + CHUNK_SIZE]
                                        for i in range(0, len(data), CHUNK_SIZE)])
        return await trio.to_thread.run_sync(split_and_hash, limiter=self.limiter)

    async def next_data(self, offset: int) -> int:
        # A QCOW2 reader knows the spans its image leaves unallocated (s3/reader.py).
        find = getattr(self.reader, "next_data", None)
        return offset if find is None else int(find(offset))

    async def aclose(self) -> None:
        await self.reader.aclose()


class _Group:
    """Chunks appended since the last commit (not yet synced) and map entries."""

    def __init__(self) -> None:
        self.new: list[tuple[bytes, int, int, bytes, int | None]] = []
        self.refs: list[tuple[int, bytes]] = []
        self.fresh: set[bytes] = set()
        self.bytes = 0


class _Capture:
    """Group commit: fresh chunks are appended without syncing; every GROUP_BYTES
    of them (and at the end) one fdatasync, then one transaction for the group.
    Syncing every 16 MiB instead costs ~4x in write throughput on this class of
    disk (measured). The index lock is held from a group's first lookup to its
    commit, so no delete can drop a chunk the group decided to reuse."""

    def __init__(self, snapshot_id: str, snap: int, total: int, index: ChunkIndex,
                 pool: PackPool, index_lock: StoreLock,
                 io_limiter: trio.CapacityLimiter, clone_fd: int | None,
                 percent: Callable[[int], int] | None = None, level: int = 0) -> None:
        self.snapshot_id, self.snap, self.total = snapshot_id, snap, total
        self.percent = percent or (lambda done: min(99, done * 100 // max(total, 1)))
        self.index, self.pool, self.lock, self.io = index, pool, index_lock, io_limiter
        self.writer: PackWriter | None = None
        self.clone_fd = clone_fd  # the source's (CaptureSource.clone_fd)
        self.level = level  # zstd level of new chunks, 0: stored raw
        self.group = _Group()
        self.done = 0

    async def commit(self) -> None:
        g, w = self.group, self.writer
        if g.new:
            assert w is not None
            await trio.to_thread.run_sync(w.sync, limiter=self.io)
        self.index.commit_batch(self.snap, w.pack if w else None, w.end if w else 0, g.new,
                                g.refs, (self.snapshot_id, self.percent(self.done)))
        if w is not None:
            w.committed = w.end
        self.group = _Group()

    async def take(self, batch: list[Hashed]) -> None:
        g = self.group
        stored = [h for h in batch if h.hash is not None]
        self.done = batch[-1].idx + 1
        known = self.index.known([h.hash for h in stored if h.hash not in g.fresh])  # type: ignore[misc]
        fresh: dict[bytes, bytes | memoryview] = {}
        tried: dict[bytes, bytes] = {}  # stage 2's verdicts (b"": raw)
        first_idx: dict[bytes, int] = {}  # where each fresh chunk lies in the source
        for h in stored:
            hh = h.hash
            assert hh is not None and h.data is not None
            if hh not in known and hh not in g.fresh and hh not in fresh:
                fresh[hh] = h.data
                first_idx[hh] = h.idx
                if h.packed is not None:
                    tried[hh] = h.packed
        if fresh:
            if self.writer is None or self.writer.full:
                if g.new:
                    await self.commit()  # a group never spans two packs
                    g = self.group
                if self.writer is not None:
                    self.pool.give_back(self.writer)
                self.writer = self.pool.take()
            w = self.writer
            src = self.clone_fd

            level = self.level

            def write_all() -> list[tuple[bytes, int, int, bytes, int | None]]:
                # Compressed where it pays (compression.py), COMPRESS_THREADS at once.
                # Stage 2 compressed what its hint said was new; the rest here.
                hashes = list(fresh)
                todo = [hh for hh in hashes if hh not in tried]
                packed = {hh: z or None for hh, z in tried.items()}
                packed.update(zip(todo, compress_all([fresh[hh] for hh in todo], level)))
                placed: dict[bytes, int] = {}
                if src is not None:  # a clone is raw: only what compression leaves raw
                    for hh in hashes:
                        if packed[hh] is None:
                            at = w.clone_in(src, first_idx[hh] * CHUNK_SIZE, len(fresh[hh]))
                            if at is not None:
                                placed[hh] = at
                rest = [hh for hh in hashes if hh not in placed]
                body = [packed[hh] or fresh[hh] for hh in rest]
                placed.update(zip(rest, w.append_all(body)))
                out: list[tuple[bytes, int, int, bytes, int | None]] = []
                for hh in hashes:
                    z, d = packed[hh], fresh[hh]
                    out.append((hh, placed[hh], len(d), check(d), None) if z is None
                               else (hh, placed[hh], len(z), check(z), len(d)))
                return out
            new = await trio.to_thread.run_sync(write_all, limiter=self.io)
            g.new += new
            g.fresh.update(fresh)
            g.bytes += sum(n for _, _, n, _, _ in new)  # stored bytes: what the sync writes
        g.refs += [(h.idx, h.hash) for h in stored]  # type: ignore[misc]

    async def consume(self, recv: trio.MemoryReceiveChannel[list[Hashed]]) -> None:
        try:
            await self._consume(recv)
        except OSError as exc:  # everything here writes the store, nothing reads the source
            raise _write_error(exc, self.pool.packs.dir) from None
        except sqlite3.OperationalError as exc:
            if "full" not in str(exc):  # SQLITE_FULL: "database or disk is full"
                raise
            raise _full(self.pool.packs.dir.parent, "the metadata database") from None

    async def _consume(self, recv: trio.MemoryReceiveChannel[list[Hashed]]) -> None:
        holding = False
        try:
            async with recv:
                async for batch in recv:
                    if not holding:
                        await self.lock.acquire()
                        holding = True
                    await self.take(batch)
                    if self.group.bytes >= GROUP_BYTES or len(self.group.refs) >= GROUP_REFS:
                        await self.commit()
                        self.lock.release()
                        holding = False
            if not holding:
                await self.lock.acquire()
                holding = True
            await self.commit()
        finally:
            if holding:
                self.lock.release()


async def capture(source: CaptureSource, snapshot_id: str, snap: int, index: ChunkIndex,
                  pool: PackPool, index_lock: StoreLock,
                  io_limiter: trio.CapacityLimiter) -> None:
    """Store all of ``source`` as the chunk map of snapshot ``snap``. Raises on any
    failure; the caller then marks the snapshot and releases the partial map."""
    total = (source.size + CHUNK_SIZE - 1) // CHUNK_SIZE
    level = store_level(index.conn)
    # With a compression stage the channels hold no batch of their own: each
    # stage holds one (3 in all, as two stages with a one-slot channel did).
    send, recv = trio.open_memory_channel[list[Hashed]](0 if level > 0 else 1)
    cap = _Capture(snapshot_id, snap, total, index, pool, index_lock, io_limiter,
                   source.clone_fd, source.percent, level)

    async def produce() -> None:
        async with send:
            first = 0
            while first < total:
                first = max(first, await source.next_data(first * CHUNK_SIZE) // CHUNK_SIZE)
                if first >= total:
                    break
                count = min(BATCH_CHUNKS, total - first)
                await send.send(await source.read_batch(first, count))
                first += count

    ok = False
    try:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                if level > 0:
                    send2, recv2 = trio.open_memory_channel[list[Hashed]](0)
                    nursery.start_soon(_compress_stage, recv, send2, index, level, io_limiter)
                    recv = recv2
                nursery.start_soon(cap.consume, recv)
        except BaseExceptionGroup as group:
            # One stage failed and the other was cancelled because of it: the caller
            # wants that one failure (an InvalidData from an import, an OSError...).
            raise first_error(group) from None
        ok = True
    finally:
        if cap.writer is not None:
            if ok:
                pool.give_back(cap.writer)
            else:  # its uncommitted tail is cut off now (committed: the caller releases)
                with trio.CancelScope(shield=True):
                    try:
                        await trio.to_thread.run_sync(pool.retire, cap.writer,
                                                      limiter=io_limiter)
                    except OSError as exc:
                        # Not the capture's error (raised here, it replaced it: a
                        # pack made immutable read as "reading the source failed").
                        log.warning("snapshot %s: the uncommitted tail of pack %d "
                                    "could not be cut (%s); the next exclusive open "
                                    "cuts it", snapshot_id, cap.writer.pack,
                                    exc.strerror or exc)


async def _compress_stage(recv: trio.MemoryReceiveChannel[list[Hashed]],
                          send: trio.MemorySendChannel[list[Hashed]], index: ChunkIndex,
                          level: int, limiter: trio.CapacityLimiter) -> None:
    """Stage 2: each batch's chunks the index does not hold (a hint, read without
    the index lock: stage 3 decides) compressed, COMPRESS_THREADS at a time."""
    async with recv, send:
        async for batch in recv:
            todo: dict[bytes, list[Hashed]] = {}
            for h in batch:
                if h.hash is not None:
                    todo.setdefault(h.hash, []).append(h)
            for hh in index.known(list(todo)):
                del todo[hh]
            if todo:
                raws: list[bytes | memoryview] = []
                for hs in todo.values():
                    assert hs[0].data is not None  # hashed: not a hole
                    raws.append(hs[0].data)
                packed = await trio.to_thread.run_sync(compress_all, raws, level,
                                                       limiter=limiter)
                for hs, z in zip(todo.values(), packed):
                    for h in hs:
                        h.packed = z or b""
            await send.send(batch)


def _full(store: Path, what: str) -> StoreFull:
    return StoreFull(f"the store is full: no space left for {what} on the filesystem of "
                     f"{store}; free space there (or delete snapshots) and take the "
                     "snapshot again")


def _write_error(exc: OSError, packs: Path) -> SnapfsError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return _full(packs.parent, "the snapshot's data")
    return SnapfsError(f"writing to the store failed ({packs}): {exc.strerror or exc}")

