"""Inode numbers for tree keys, the same across remounts and restarts.

A key gets a number the first time any mount of the store shows it to the
kernel, and keeps it for good: the numbers live in a small SQLite map file in
the store directory (``inodes.sqlite``; one file for every backend, so the
cloud backend has stable numbers too), handed out by AUTOINCREMENT, which
never reuses a number even after its row is gone. So a backup tool that keys
its cache on (device, inode) sees the same files after a remount, and a stale
inode the kernel still holds can never designate another node (it resolves to
a key whose resource may be gone, and the node answers ENOENT).

A snapshot's files are numbered without the view they were reached through
(``canonical``): ``image.raw`` is one inode in ``snapshots/``, ``volumes/<v>/``
and ``tags/<t>/``, so ``du`` and backup tools count it once (st_nlink says how
many places list it). Snapshot directories keep one number per view, since
their ``..`` differs.

The map grows with the nodes ever shown (a few hundred bytes per key). The
in-memory table in front of it saves a query per request and holds only what
the kernel holds: each entry the kernel is given (lookup, mkdir, create, a
readdirplus entry) counts one, FORGET takes its count away, and at zero the
entry leaves memory -- the map still has its number. So the daemon's memory
follows the kernel's inode cache, not every node ever shown. Without a
writable store directory (a read-only one) new numbers fall back to this
mount's life only, and those stay in memory for good (nowhere else has them).

Once a mount numbers in memory, another mount of the store may go on giving
numbers from the map -- the same numbers, to other keys. So a number the map
gives is taken only if this mount has not given it from memory, and memory
numbers go on above every number taken from the map. A detached mount tries
the map again after RETRY_AFTER seconds (a lock held for a while, a disk full
for a while): new keys are numbered for good again from then on.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import pyfuse3

from .. import sqlfull
from ..errors import NotFound, StoreFull, StoreUnusable
from .keys import ROOT, Key, Kind, View

log = logging.getLogger(__name__)

MAP_NAME = "inodes.sqlite"
#: What the map's statements raise when it cannot be used: SQLite's errors, and
#: StoreFull (sqlfull.Connection's name for "database or disk is full"), which
#: were missed -- on a full disk every lookup of a node not yet numbered was
#: ENOSPC, so no snapshot could even be reached to be deleted.
_MAP_ERRORS = (sqlite3.Error, StoreFull, StoreUnusable)
#: How long a lookup waits for another mount's write to the map (seconds). It
#: waits on the trio thread, so it is short: a row takes microseconds to write,
#: and a map held longer than this detaches the mount (numbers in memory).
BUSY_TIMEOUT = 1.0
#: Seconds before a detached table tries to write the map again, doubled after
#: each try that fails (a try may wait BUSY_TIMEOUT on the trio thread).
RETRY_AFTER = 10.0
RETRY_MAX = 600.0
_SEP = "\x00"


def canonical(key: Key) -> Key:
    """The key whose number ``key`` shares: a snapshot's files are one node."""
    if key.kind in (Kind.FILE, Kind.CHANGE) and key.view != View(Kind.SNAPSHOTS):
        return Key(key.kind, key.zone, key.project, View(Kind.SNAPSHOTS), key.snapshot,
                   key.name)
    return key


def encode(key: Key) -> str:
    view = key.view or View(Kind.ROOT)
    return _SEP.join((key.kind.value, key.zone, key.project, view.kind.value, view.arg,
                      key.snapshot, key.name))


def decode(text: str) -> Key:
    kind, zone, project, vkind, varg, snapshot, name = text.split(_SEP)
    view = None if vkind == Kind.ROOT.value else View(Kind(vkind), varg)
    return Key(Kind(kind), zone, project, view, snapshot, name)


class InodeMap:
    """The persisted key <-> number map (one SQLite file; several mounts of one
    store share it: INSERT OR IGNORE then SELECT gives them the same numbers)."""

    def __init__(self, path: Path, timeout: float = BUSY_TIMEOUT) -> None:
        self.conn = sqlite3.connect(str(path), isolation_level=None, timeout=timeout,
                                    check_same_thread=False, factory=sqlfull.Connection)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        # Numbers from 2 up: 1 is the root (pyfuse3.ROOT_INODE), never stored.
        self.conn.execute("CREATE TABLE IF NOT EXISTS inodes (ino INTEGER PRIMARY KEY "
                          "AUTOINCREMENT, key TEXT NOT NULL UNIQUE)")
        self.conn.execute("INSERT OR IGNORE INTO sqlite_sequence (name, seq) "
                          "SELECT 'inodes', ? WHERE NOT EXISTS "
                          "(SELECT 1 FROM sqlite_sequence WHERE name = 'inodes')",
                          (pyfuse3.ROOT_INODE,))

    def number(self, key: Key) -> int:
        text = encode(key)
        row = self.conn.execute("SELECT ino FROM inodes WHERE key = ?", (text,)).fetchone()
        if row is None:
            self.conn.execute("INSERT OR IGNORE INTO inodes (key) VALUES (?)", (text,))
            row = self.conn.execute("SELECT ino FROM inodes WHERE key = ?",
                                    (text,)).fetchone()
        return int(row[0])

    def find(self, key: Key) -> int | None:
        row = self.conn.execute("SELECT ino FROM inodes WHERE key = ?",
                                (encode(key),)).fetchone()
        return None if row is None else int(row[0])

    def highest(self) -> int:
        row = self.conn.execute("SELECT max(ino) FROM inodes").fetchone()
        return int(row[0] or pyfuse3.ROOT_INODE)

    def key(self, ino: int) -> Key | None:
        row = self.conn.execute("SELECT key FROM inodes WHERE ino = ?", (ino,)).fetchone()
        return None if row is None else decode(row[0])

    def close(self) -> None:
        self.conn.close()


class InodeTable:
    def __init__(self, persisted: InodeMap | None = None) -> None:
        self._by_key: dict[Key, int] = {ROOT: pyfuse3.ROOT_INODE}
        self._by_inode: dict[int, Key] = {pyfuse3.ROOT_INODE: ROOT}
        #: inode -> entries the kernel was given and has not forgotten
        self._lookups: dict[int, int] = {}
        #: numbers only this table has (no map, or it stopped taking rows): kept
        self._unstored: set[int] = {pyfuse3.ROOT_INODE}
        self._next = pyfuse3.ROOT_INODE + 1
        self._map = persisted
        self._writable = persisted is not None
        self.retry_after = RETRY_AFTER
        self._retry_at = 0.0  # time.monotonic() when a detached table tries again
        self._wait = 0.0  # the wait before that try (doubled by each failed try)

    @classmethod
    def in_store(cls, store: Path) -> "InodeTable":
        """Numbers kept in ``store``'s map file; for this mount only when it
        cannot be opened (the reason is logged once)."""
        try:
            return cls(InodeMap(store / MAP_NAME))
        except (*_MAP_ERRORS, OSError) as exc:
            log.warning("inode numbers last only for this mount: cannot open %s: %s",
                        store / MAP_NAME, exc)
            return cls()

    def inode(self, key: Key) -> int:
        """``key``'s number (given now if it has none). Only a key numbered in
        memory alone is remembered here: a stored one enters the table when the
        kernel is given it (``looked_up``)."""
        key = canonical(key)
        ino = self._by_key.get(key)
        if ino is None:
            ino = self._stored(key)
            if ino is None:
                ino, self._next = self._next, self._next + 1
                self._unstored.add(ino)
                self._remember(key, ino)
        return ino

    def looked_up(self, key: Key) -> int:
        """``key``'s number, for an entry the kernel is given: counted until the
        kernel forgets it."""
        ino = self.inode(key)
        self.hold(key, ino)
        return ino

    def hold(self, key: Key, ino: int) -> None:
        """The kernel was given an entry for ``key`` numbered ``ino`` (by inode())."""
        self._lookups[ino] = self._lookups.get(ino, 0) + 1
        self._remember(canonical(key), ino)

    def forget(self, inode: int, count: int) -> None:
        """The kernel dropped ``count`` of the entries it was given for ``inode``."""
        left = self._lookups.get(inode, 0) - count
        if left > 0:
            self._lookups[inode] = left
            return
        self._lookups.pop(inode, None)
        if inode not in self._unstored:
            key = self._by_inode.pop(inode, None)
            if key is not None and self._by_key.get(key) == inode:
                del self._by_key[key]

    def _remember(self, key: Key, ino: int) -> None:
        self._by_key[key] = ino
        self._by_inode[ino] = key

    def _stored(self, key: Key) -> int | None:
        """The map's number for ``key`` (added if new); None without a map, when
        it cannot take a new row, or when the number is one this table gave
        from memory (another mount, attached, gave it to ``key`` meanwhile)."""
        if self._map is None:
            return None
        retrying = not self._writable and time.monotonic() >= self._retry_at
        try:
            if self._writable or retrying:
                ino: int | None = self._map.number(key)
                if retrying:
                    self._writable, self._wait = True, 0.0
                    log.warning("inode numbers are kept in %s again", MAP_NAME)
            else:
                ino = self._map.find(key)
        except _MAP_ERRORS as exc:  # a read-only store, a full disk, a held lock
            self._detach(exc)
            return None
        if ino is None or ino in self._unstored:
            return None
        self._next = max(self._next, ino + 1)  # memory numbers stay above it
        return ino

    def _detach(self, exc: Exception) -> None:
        """Number new keys in memory, above every number the map has (so none
        is given twice), when the map stops taking rows; it is still read for
        the numbers it has, and written again after ``retry_after``."""
        assert self._map is not None
        if self._writable:
            log.warning("inode numbers given from now on last only for this mount: %s", exc)
        self._writable = False
        self._wait = min(self._wait * 2, RETRY_MAX) if self._wait else self.retry_after
        self._retry_at = time.monotonic() + self._wait
        try:
            highest = self._map.highest()
        except _MAP_ERRORS:
            highest = 1 << 40  # far above any map this store could have filled
        self._next = max(self._next, highest + 1, max(self._by_inode) + 1)

    def key(self, inode: int) -> Key:
        key = self._by_inode.get(inode)
        if key is None and self._map is not None:
            # Forgotten by the kernel, or shown by an earlier mount (the kernel
            # may still hold it, e.g. NFS): read, not remembered (uncounted).
            try:
                key = self._map.key(inode)
            except _MAP_ERRORS:
                key = None
        if key is None:
            raise NotFound("inode", str(inode))
        return key

    def known(self, key: Key) -> int | None:
        """The inode of ``key`` if the kernel holds it (or may: numbered in
        memory only)."""
        return self._by_key.get(canonical(key))

    def __len__(self) -> int:
        """Nodes in memory: about the ones the kernel holds."""
        return len(self._by_key)

    def snapshot_keys(self, snapshot_id: str) -> list[Key]:
        """The directories of snapshot ``snapshot_id`` the kernel holds, in every
        view (to invalidate the names it may have cached for them)."""
        return [k for k in self._by_key
                if k.kind is Kind.SNAPSHOT and k.snapshot == snapshot_id]

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
