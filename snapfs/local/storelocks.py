"""Locks between the processes that share one store (mounts, `snapfs serve`, the CLI).

All of them are open-file-description byte-range locks (``F_OFD_SETLK``) on the
store's ``lock`` file, the file whose whole-file ``flock`` tells an open whether
it has the store to itself (open_local_service). The kernel drops them when their
descriptor is closed or the process dies, SIGKILL included, so nothing is ever
left to clean up; they do not interact with ``flock`` on a local filesystem, and
two descriptors of one process exclude each other as two processes do (a
per-process ``trio.Lock`` would not see another process).

- Byte 0, the **index lock**: held exclusively around every change to the chunk
  index that another change must not interleave with: a capture's group from its
  dedupe lookup to its commit, the release of a map, a map copy, recovery. So a
  chunk one process decided to reuse is never freed (and punched) by another
  before the reference commits, and two processes never insert one new hash.
- Byte ``READERS + h(snapshot id)``, a **reader lock** per snapshot: every open
  image reader holds it shared, on a descriptor of its own; a delete takes it
  exclusively while it marks the snapshot deleting, waiting at most a moment. A reader
  takes its lock first and then checks that the snapshot is not being deleted, so
  there is no window in which a delete could begin under an open reader.
- Byte 1, the **open lock**: opens one at a time, so that two can never both
  find the store to themselves (the whole-file ``flock`` turns from exclusive to
  shared non-atomically). Only an open that has work of dead processes to
  recover takes the index lock too: a command is not kept waiting by a delete.

Locks are polled with short sleeps, never waited for in the kernel: the trio
thread must not block, and a thread blocked in ``F_OFD_SETLKW`` cannot be cancelled.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
from pathlib import Path
from types import TracebackType

import trio

#: The index lock's byte, the open lock's, and where the reader locks begin.
INDEX = 0
OPEN = 1
READERS = 1 << 32
#: Polling of a lock held elsewhere: first and longest sleep, in seconds.
POLL_FIRST = 0.001
POLL_MAX = 0.02


def _flock(kind: int, start: int) -> bytes:
    """A ``struct flock`` (LP64 Linux: two shorts, two off_t, a pid_t; l_pid 0 for
    OFD locks) covering one byte."""
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, start, 1, 0)


def _try_lock(fd: int, kind: int, start: int) -> bool:
    """Take (``F_RDLCK``/``F_WRLCK``) or drop (``F_UNLCK``) one byte without waiting."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(kind, start))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _open_lock_file(path: Path) -> int:
    """The store's lock file, never through a symlink (store.py: trust no one else)."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


def _reader_byte(snapshot_id: str) -> int:
    return READERS + int.from_bytes(hashlib.blake2b(snapshot_id.encode(),
                                                    digest_size=7).digest(), "big")


class StoreLock:
    """The index lock (or the open lock): a ``trio.Lock`` for this process's
    tasks, then one byte of the store's lock file for the other processes."""

    def __init__(self, path: Path, byte: int = INDEX) -> None:
        self._path = path
        self._fd: int | None = None  # opened at first use: a read-only open makes no file
        self._byte = byte
        self._local = trio.Lock()

    async def acquire(self) -> None:
        await self._local.acquire()
        try:
            if self._fd is None:
                self._fd = _open_lock_file(self._path)
            delay = POLL_FIRST
            while not _try_lock(self._fd, fcntl.F_WRLCK, self._byte):
                await trio.sleep(delay)
                delay = min(2 * delay, POLL_MAX)
        except BaseException:
            self._local.release()
            raise

    def release(self) -> None:
        assert self._fd is not None  # acquired
        _try_lock(self._fd, fcntl.F_UNLCK, self._byte)
        self._local.release()

    def locked(self) -> bool:
        return self._local.locked()

    def statistics(self) -> trio.LockStatistics:
        """This process's side (tasks waiting, owner)."""
        return self._local.statistics()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ReaderLocks:
    """The per-snapshot reader locks; each hold is a descriptor of its own (OFD
    locks of one descriptor on one byte would merge into one)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _open(self) -> int:
        return _open_lock_file(self.path)

    async def share(self, snapshot_id: str) -> int:
        """A descriptor holding the snapshot's reader lock shared; close it to let
        go. Waits while a delete holds it (a few milliseconds): the caller then
        checks that the snapshot still exists and is not being deleted."""
        fd = self._open()
        try:
            delay = POLL_FIRST
            while not _try_lock(fd, fcntl.F_RDLCK, _reader_byte(snapshot_id)):
                await trio.sleep(delay)
                delay = min(2 * delay, POLL_MAX)
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def exclusive(self, snapshot_id: str, grace: float = 0.0) -> int | None:
        """A descriptor holding the snapshot's reader lock exclusively, or None when
        some reader, in any process, still has the snapshot open after ``grace``
        seconds (for one that has just closed: close(2) returns before the kernel
        tells its mount, whose reader lets go only then)."""
        fd = self._open()
        byte = _reader_byte(snapshot_id)
        delay = POLL_FIRST
        with trio.move_on_after(grace):
            while not _try_lock(fd, fcntl.F_WRLCK, byte):
                await trio.sleep(delay)
                delay = min(2 * delay, POLL_MAX)
            return fd
        if _try_lock(fd, fcntl.F_WRLCK, byte):
            return fd
        os.close(fd)
        return None
