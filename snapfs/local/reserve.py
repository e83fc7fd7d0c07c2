"""Room kept back so that a snapshot can be deleted on a full disk.

Deleting is how a user frees space, yet it writes too: SQLite appends the
change to ``metadata.db-wal`` before any pack space is punched out. On a disk
filled to the last block (root's reserved blocks included) a delete was
refused with ENOSPC, and the only way out was to delete files by hand. ZFS
keeps "slop space" back for the same reason and btrfs a global reserve.

A mount or ``serve`` keeps ``<store>/reserve``, up to RESERVE_BYTES allocated
on disk: made at open, topped up every KEEP_EVERY seconds and after each delete
(a disk with less room free gets a smaller reserve rather than none). A delete
that finds the disk full gives it up STEP bytes at a time (a writer beside it
can take only what was freed, and the rest stays for the next try) and tries
again. Nothing else may use it: captures, imports and renames on a full disk
are refused (ENOSPC) as before.

Only a file the reserve can call its own is touched: a regular file of this
user with one link (a hard link planted under the name would have another
file of the user's extended or cut), never a symlink, directory or fifo.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path
from typing import Awaitable, Callable, TypeVar

import trio

from ..errors import StoreFull


log = logging.getLogger(__name__)

NAME = "reserve"
#: A delete's metadata transaction and its release steps take a few pages of
#: WAL each; SQLite checkpoints (and reuses the WAL) every ~4 MiB.
RESERVE_BYTES = 8 << 20
STEP = 2 << 20
#: Seconds between top-ups (space freed by hand, or by another process).
KEEP_EVERY = 30.0
_FULL = (errno.ENOSPC, errno.EDQUOT)

T = TypeVar("T")


class SpaceReserve:
    def __init__(self, store: Path, size: int = RESERVE_BYTES) -> None:
        self.path = store / NAME
        self.size = size
        self._said_short = False
        self._said_odd = False  # the name held by something else: said once

    def ensure(self) -> bool:
        """Top the reserve up to ``size`` where the disk has room (blocking: call
        it off the trio thread). True if it is whole."""
        fd = self._open(os.O_CREAT)
        if fd is None:
            return False
        try:
            held = os.fstat(fd).st_blocks * 512
            if held >= self.size:
                return True
            if _allocate(fd, self.size):
                self._said_short = False
                return True
            # Short of room: whole steps while they fit, so it keeps what it can.
            for length in range(held - held % STEP + STEP, self.size, STEP):
                if not _allocate(fd, length):
                    break
            if not self._said_short:
                log.warning("the store's disk is too full for its whole space reserve "
                            "(%d MiB, so that deletes work on a full disk): %d MiB held",
                            self.size >> 20, os.fstat(fd).st_blocks * 512 >> 20)
                self._said_short = True
            return False
        finally:
            os.close(fd)

    def give_up(self) -> bool:
        """Free a step of the reserve for a delete on a full disk; False if there
        is none left (or the file is not the reserve's own)."""
        fd = self._open(0)
        if fd is None:
            return False
        try:
            st = os.fstat(fd)
            if st.st_blocks == 0:
                return False
            left = max(0, st.st_size - STEP)
            os.ftruncate(fd, left)  # frees every block past it (a failed fallocate's too)
        finally:
            os.close(fd)
        log.warning("the store's disk is full: %d MiB of its space reserve given to a "
                    "delete (%d MiB left; topped up once space is free)", STEP >> 20, left >> 20)
        return True

    def _open(self, create: int) -> int | None:
        """The reserve's descriptor, if the name is a regular file of this user's
        with one link (made 0600 if ``create`` and missing); None (logged when
        something else holds the name) otherwise."""
        try:
            fd = os.open(self.path, os.O_RDWR | create | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            return None
        except OSError as exc:  # a symlink (ELOOP), a directory (EISDIR), ...
            self._odd(f"cannot open {self.path}: {exc.strerror}")
            return None
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1:
            self._said_odd = False
            return fd
        os.close(fd)
        self._odd(f"{self.path} is not a file of its own (a regular file of this user "
                  "with one link)")
        return None

    def _odd(self, why: str) -> None:
        if not self._said_odd:
            log.warning("no space reserve: %s", why)
            self._said_odd = True

    async def keep(self) -> None:
        """Top the reserve up now and then, for as long as the service runs."""
        while True:
            await trio.sleep(KEEP_EVERY)
            try:
                await trio.to_thread.run_sync(self.ensure)
            except OSError as exc:  # a disk error: the next round tries again
                log.warning("the space reserve could not be topped up: %s", exc)


def _allocate(fd: int, length: int) -> bool:
    """Blocks for the first ``length`` bytes, synced; False when they do not fit."""
    try:
        os.posix_fallocate(fd, 0, length)
    except OSError as exc:
        if exc.errno not in _FULL:
            raise
        return False
    os.fsync(fd)
    return True


async def on_full_disk(reserve: SpaceReserve, call: Callable[[], Awaitable[T]]) -> T:
    """``call()``, again with a step of the reserve given up each time it finds
    the disk full. Only for what frees space: a delete, or a failed capture's
    record (which gives its partial map back)."""
    while True:
        try:
            return await call()
        except StoreFull:
            if not await trio.to_thread.run_sync(reserve.give_up):
                raise
