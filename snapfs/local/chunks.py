"""Pack files: where chunk bytes live. Synchronous; callers run it in threads.

Why pack files rather than one file per chunk: a 1 TiB volume is a million
1 MiB chunks, and a million small files cost a million inodes plus directory
fan-out, and make fsck and GC walk a huge tree. Packs of up to PACK_LIMIT bytes
keep that to ~1000 files per TiB. Space of deleted chunks is returned at once
by punching holes (fallocate PUNCH_HOLE) at 4 KiB-aligned offsets, so packs
never need rewriting; a pack with no live chunk left is unlinked.

Integrity: every read is verified against the chunk's blake3 digest, so a
flipped bit reads as CorruptData, never as wrong bytes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import struct
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import blake3
import xxhash

from ..errors import CorruptData, TooManyOpen
from ..memory import aligned_buffer

CHUNK_SIZE = 1 << 20
#: A pack stops taking new chunks past this size.
PACK_LIMIT = 1 << 30
ALIGN = 4096
#: Bytes per O_DIRECT write request, and how many are in flight per pack writer.
STAGE_BYTES = 8 << 20
DIRECT_DEPTH = 3

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
#: The C library, for the calls the os module lacks (fallocate, sync_file_range, fstatfs).
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2
_FICLONERANGE = 0x4020940D

ZERO_CHUNK = bytes(CHUNK_SIZE)


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """The content address (dedup identity): collision-resistant."""
    return blake3.blake3(data).digest()


def check(data: bytes | bytearray | memoryview) -> bytes:
    """The read-path integrity check: catches corruption at memory speed."""
    return xxhash.xxh3_128_digest(data)


def is_zero(data: bytes | memoryview) -> bool:
    n = len(data)
    return data == (ZERO_CHUNK if n == CHUNK_SIZE else bytes(n))


def chunk_buffer() -> mmap.mmap:
    """A chunk-sized buffer to read a chunk into (page-aligned: see aligned_buffer)."""
    return aligned_buffer(CHUNK_SIZE)


def align_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (a file just created in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the blocks of [offset, offset+length) keeping the file size.
    Returns False where the filesystem cannot (the bytes then stay as dead space)."""
    if libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                      offset, length) != 0:
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS):
            return False
        raise OSError(err, os.strerror(err))
    return True


class PackFiles:
    """Read access to all packs (cached descriptors) plus pack-level maintenance."""

    def __init__(self, directory: Path, create: bool = True) -> None:
        self.dir = directory
        if create:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        #: The highest pack file id present at open: new packs are numbered above it,
        #: so that a file no row knows (a metadata.db restored from a backup older
        #: than it) is never reused. Files made since always have their row first.
        self.floor = max(self.existing(), default=0)
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()
        self._nowait = hasattr(os, "RWF_NOWAIT")

    def path(self, pack: int) -> Path:
        return self.dir / f"{pack:08d}.pack"

    def is_open(self, pack: int) -> bool:
        return pack in self._fds

    def open_count(self) -> int:
        """Pack descriptors held (each kept until the packs are closed)."""
        return len(self._fds)

    def open(self, pack: int) -> None:
        """Open the pack's descriptor now (a file-system call: from a worker thread)."""
        self._fd(pack)

    def _fd(self, pack: int) -> int:
        with self._lock:
            fd = self._fds.get(pack)
            if fd is None:
                try:
                    fd = os.open(self.path(pack), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except OSError as exc:  # out of descriptors: no fault of the store's
                    if exc.errno in (errno.EMFILE, errno.ENFILE):
                        raise TooManyOpen(f"cannot open pack {pack}: {exc.strerror}") \
                            from None
                    raise
                self._fds[pack] = fd
            return fd

    def read(self, pack: int, offset: int, length: int, expected: bytes,
             xxh: bytes | None = None) -> bytes:
        """The chunk's bytes, verified against its xxh3 check when it has one
        (every read), else against its blake3 digest (fsck passes xxh=None)."""
        try:
            data = os.pread(self._fd(pack), length, offset)
        except FileNotFoundError:
            raise CorruptData(f"pack {pack} is missing (chunk at {offset})") from None
        self._verify(data, pack, offset, length, expected, xxh)
        return data

    def read_into(self, pack: int, offset: int, length: int, expected: bytes,
                  xxh: bytes | None, into: memoryview) -> None:
        """Read the chunk into ``into`` and verify it, as read() does."""
        try:
            n = os.preadv(self._fd(pack), [into], offset)
        except FileNotFoundError:
            raise CorruptData(f"pack {pack} is missing (chunk at {offset})") from None
        self._verify(into[:n], pack, offset, length, expected, xxh)

    def read_if_cached(self, pack: int, offset: int, length: int, expected: bytes,
                       xxh: bytes | None, into: memoryview) -> bool:
        """Read the chunk into ``into`` and verify it, if all of its bytes are in
        the page cache and the pack is already open; otherwise return False,
        having waited for nothing.

        RWF_NOWAIT makes the read fail instead of waiting for the disk, so this
        is safe on the trio thread: it costs a memory copy and a hash (~0.1 ms per
        MiB), less than handing the read to a worker thread and back."""
        fd = self._fds.get(pack)
        if fd is None or not self._nowait:
            return False
        try:
            n = os.preadv(fd, [into], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return False
        except OSError as exc:  # e.g. a filesystem without RWF_NOWAIT: stop trying
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait = False
            return False  # anything else: read_into() reports it
        if n != length:  # partly cached: read_into() reads it all
            return False
        self._verify(into, pack, offset, length, expected, xxh)
        return True

    @staticmethod
    def _verify(data: bytes | memoryview, pack: int, offset: int, length: int,
                expected: bytes, xxh: bytes | None) -> None:
        ok = len(data) == length and (check(data) == xxh if xxh is not None
                                      else digest(data) == expected)
        if not ok:
            raise CorruptData(f"chunk {expected.hex()[:16]} in pack {pack} at offset "
                              f"{offset} does not match its hash")

    def punch(self, extents: list[tuple[int, int, int]]) -> None:
        """Free the (pack, offset, length) extents, opening each pack once."""
        by_pack: dict[int, list[tuple[int, int]]] = {}
        for pack, offset, length in extents:
            by_pack.setdefault(pack, []).append((offset, length))
        for pack, ranges in by_pack.items():
            try:
                fd = os.open(self.path(pack), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                for offset, length in ranges:
                    punch_hole(fd, offset, align_up(length))
            finally:
                os.close(fd)

    def remove(self, pack: int) -> None:
        with self._lock:
            fd = self._fds.pop(pack, None)
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(self.path(pack))
        except FileNotFoundError:
            pass

    def truncate(self, pack: int, length: int) -> None:
        """Cut an interrupted write's tail off (recovery)."""
        p = self.path(pack)
        if p.exists() and p.stat().st_size > length:
            os.truncate(p, length)

    def size(self, pack: int) -> int | None:
        """The pack file's size, None when it is missing."""
        try:
            return os.stat(self.path(pack)).st_size
        except FileNotFoundError:
            return None

    def _number(self, p: Path) -> int | None:
        """The pack a file in packs/ is, by its name: only our own names count
        ("²².pack" passed isdigit() and crashed int(); "12.pack" was taken for
        pack 12, whose file is 00000012.pack)."""
        if p.suffix == ".pack" and p.stem.isascii() and p.stem.isdigit():
            n = int(p.stem)
            if p.name == self.path(n).name:
                return n
        return None

    def existing(self) -> set[int]:
        if not self.dir.is_dir():  # a read-only open of a store without a pack yet
            return set()
        return {n for n in map(self._number, self.dir.iterdir()) if n is not None}

    def strays(self) -> list[Path]:
        """Entries of packs/ that are no pack's file (fsck reports them)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if self._number(p) is None)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class PackWriter:
    """Appends chunks to one pack; used by one capture at a time.

    ``append_all`` writes without syncing; ``sync`` makes everything appended so
    far durable, and only then may the caller commit rows pointing at it.
    """

    def __init__(self, packs: PackFiles, pack: int, committed: int,
                 direct: bool = True) -> None:
        self.pack = pack
        path = packs.path(pack)
        # A new pack never takes over a file that is there already: one no row knows
        # is never written over (PackFiles.floor keeps new ids above them).
        excl = os.O_EXCL if committed == 0 else 0
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | excl | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o600)
        # Whatever lies past the committed length is an earlier interrupted tail.
        os.ftruncate(self.fd, committed)
        self.end = committed
        #: The length rows point into (set by the capture once it commits).
        self.committed = committed
        self._written_back = committed
        self._synced_dir = committed > 0
        self._dir = packs.dir
        self._direct: _DirectWrites | None = None
        self._clones = True  # until the filesystem says it cannot
        self._cloned = False  # since the last sync
        if direct and committed % ALIGN == 0:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as exc:  # a filesystem without O_DIRECT: buffered writes
                if exc.errno != errno.EINVAL:
                    raise
            else:
                self._direct = _DirectWrites(fd)

    @property
    def full(self) -> bool:
        return self.end >= PACK_LIMIT

    def _append(self, data: bytes | memoryview) -> int:
        """Write ``data`` at the aligned end; returns its offset."""
        offset = self.end
        view = memoryview(data)
        written = 0
        while written < len(view):
            written += os.pwrite(self.fd, view[written:], offset + written)
        self.end = align_up(offset + len(view))
        return offset

    def clone_in(self, src: int, offset: int, length: int) -> int | None:
        """Append ``length`` bytes of file ``src`` at ``offset`` by sharing its blocks
        (FICLONERANGE: XFS, btrfs) instead of writing them; the offset in the pack,
        or None where the filesystem cannot (then, and from then on, append)."""
        if not self._clones or length % ALIGN or offset % ALIGN:
            return None
        at = self.end
        try:
            fcntl.ioctl(self.fd, _FICLONERANGE, struct.pack("=qQQQ", src, offset, length, at))
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY):
                raise
            self._clones = False
            return None
        self.end = at + length
        self._cloned = True
        return at

    def append_all(self, chunks: list[bytes | memoryview]) -> list[int]:
        """Append each chunk at an aligned offset; returns their offsets.

        Written with O_DIRECT where the filesystem allows: the chunks are staged
        back to back (4 KiB-padded) in page-aligned buffers, one request per
        STAGE_BYTES, DIRECT_DEPTH of them in flight. A capture then allocates no
        page cache for the bytes it stores -- on this class of VM, touching fresh
        page-cache pages made a 1 GiB first snapshot take 2.8-3.1 s instead of
        0.7 s (scripts/bench/snapshot.py --warm; buffered appends win only where
        free pages are cheap to reuse, 0.55 vs 0.6 s) -- and snapshotting a big
        volume does not evict what the machine's page cache holds. Durability
        still comes from sync(): O_DIRECT bypasses the page cache, not the
        device's cache."""
        if self._direct is None:
            offsets = [self._append(d) for d in chunks]
            self.start_writeback()
            return offsets
        direct = self._direct
        stage, base, pos, offsets = direct.buffer(), self.end, 0, []
        for data in chunks:
            n, padded = len(data), align_up(len(data))
            if pos + padded > STAGE_BYTES:
                direct.submit(stage, base, pos)
                stage, base, pos = direct.buffer(), base + pos, 0
            stage[pos:pos + n] = data
            if padded > n:
                stage[pos + n:pos + padded] = bytes(padded - n)
            offsets.append(base + pos)
            pos += padded
        direct.submit(stage, base, pos)
        self.end = base + pos
        return offsets

    def start_writeback(self) -> None:
        """Buffered appends (filesystems without O_DIRECT): start writing back what
        was appended since the last call, without waiting, so that the group's
        fdatasync finds most of it on disk already. Once per batch of chunks, not
        per chunk: per-MiB calls made a capture 2.5x slower (measured), many small
        writebacks each waiting for the device queue."""
        if self.end > self._written_back:
            libc.sync_file_range(self.fd, self._written_back, self.end - self._written_back,
                                  _SYNC_FILE_RANGE_WRITE)
            self._written_back = self.end

    def idle(self) -> None:
        """Between captures: give back the staging buffers (32 MiB)."""
        if self._direct is not None:
            self._direct.trim()

    def sync(self) -> None:
        if self._direct is not None:
            self._direct.drain()  # every write done (or its error raised) first
        if self._cloned:  # the shared extents are metadata: a full fsync
            os.fsync(self.fd)
            self._cloned = False
        else:
            os.fdatasync(self.fd)
        if not self._synced_dir:  # the new file's directory entry must be durable too
            fsync_dir(self._dir)
            self._synced_dir = True

    def close(self, cut: bool = False) -> None:
        """``cut``: a failed capture's writer: the uncommitted tail (up to a whole
        group of appended chunks) goes now, not at the next exclusive open -- the
        space of a capture that failed for want of it must come back at once."""
        if self._direct is not None:
            self._direct.close()
        try:
            if cut and self.end > self.committed:
                os.ftruncate(self.fd, self.committed)
        finally:
            os.close(self.fd)


class _DirectWrites:
    """O_DIRECT writes of staged buffers, DIRECT_DEPTH requests in flight: the
    device writes one batch while the capture stages the next (a warm 1 GiB
    capture took 0.57-0.71 s this way, 0.60-0.78 s with one request at a time,
    alternating A/B). Errors surface at the next buffer() or drain()."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pool = ThreadPoolExecutor(DIRECT_DEPTH, thread_name_prefix="packwrite")
        self._free: list[mmap.mmap] = []
        self._made = 0
        self._pending: deque[tuple[Future[None], mmap.mmap]] = deque()

    def buffer(self) -> mmap.mmap:
        """A staging buffer (page-aligned, as O_DIRECT requires)."""
        if not self._free and self._made <= DIRECT_DEPTH:
            self._made += 1
            return aligned_buffer(STAGE_BYTES)
        while not self._free:
            self._reap()
        return self._free.pop()

    def submit(self, buf: mmap.mmap, offset: int, length: int) -> None:
        self._pending.append((self._pool.submit(self._write, buf, offset, length), buf))

    def _write(self, buf: mmap.mmap, offset: int, length: int) -> None:
        with memoryview(buf) as whole, whole[:length] as view:
            written = 0
            while written < length:
                written += os.pwrite(self.fd, view[written:], offset + written)

    def _reap(self) -> None:
        fut, buf = self._pending.popleft()
        self._free.append(buf)
        fut.result()

    def drain(self) -> None:
        while self._pending:
            self._reap()

    def trim(self) -> None:
        """Unmap the staging buffers (after drain): an idle writer holds no memory."""
        for buf in self._free:
            buf.close()
        self._free.clear()
        self._made = len(self._pending)

    def close(self) -> None:
        while self._pending:
            try:
                self._reap()
            except OSError:
                pass  # a failed capture's writer: its tail is cut at the next open
        self._pool.shutdown()
        for buf in self._free:
            buf.close()
        os.close(self.fd)
