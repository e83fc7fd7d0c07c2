"""Room kept back so that a snapshot can be deleted on a full disk.

Deleting is how a user frees space, yet it writes too: SQLite appends the
change to ``metadata.db-wal`` before any pack space is punched out. On a disk
filled to the last block (root's reserved blocks included) a delete was
refused with ENOSPC, and the only way out was to delete files by hand. ZFS
keeps "slop space" back for the same reason and btrfs a global reserve.

A writable open makes ``<store>/reserve``, RESERVE_BYTES allocated on disk
(best effort: a disk already full gets none, said once in the log). A delete
that finds the disk full gives it up (unlinked: its blocks are free at once)
and tries again; once the delete's space is punched out, the reserve is made
again. Nothing else may use it: captures, imports and renames on a full disk
are refused (ENOSPC) as before, with the reserve left for a delete.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from ..errors import StoreUnusable
from .store import open_private

log = logging.getLogger(__name__)

NAME = "reserve"
#: A delete's metadata transaction and its release steps take a few pages of
#: WAL each; SQLite checkpoints (and reuses the WAL) every ~4 MiB.
RESERVE_BYTES = 8 << 20


class SpaceReserve:
    def __init__(self, store: Path, size: int = RESERVE_BYTES) -> None:
        self.path = store / NAME
        self.size = size
        self._said_full = False

    def ensure(self) -> bool:
        """Make the reserve if it is missing or short (best effort; blocking:
        call it off the trio thread). True if it is there in full now."""
        try:
            fd = open_private(self.path, os.O_RDWR | os.O_CREAT, "the space reserve ")
        except StoreUnusable as exc:  # a planted symlink or someone else's file
            log.warning("no space reserve: %s", exc)
            return False
        try:
            if os.fstat(fd).st_blocks * 512 >= self.size:
                return True
            try:
                os.posix_fallocate(fd, 0, self.size)
                os.fsync(fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                os.ftruncate(fd, 0)  # a part of it would only take room from a delete
                if not self._said_full:
                    log.warning("no room for the store's space reserve (%d MiB, so that "
                                "deletes work on a full disk): the disk is full",
                                self.size >> 20)
                    self._said_full = True
                return False
        finally:
            os.close(fd)
        self._said_full = False
        return True

    def give_up(self) -> bool:
        """Free the reserve for a delete on a full disk; False if there was none."""
        try:
            had = os.lstat(self.path).st_blocks > 0
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        if had:
            log.warning("the store's disk is full: its space reserve (%d MiB) is given to "
                        "a delete, and made again once the delete has freed its space",
                        self.size >> 20)
        return had
