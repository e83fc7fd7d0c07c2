"""Inode numbers for tree keys, stable for the life of the mount.

A key gets a number the first time the kernel sees it and keeps it: numbers are
never reused, so a stale inode the kernel still holds can never designate
another node (it resolves to a key whose resource may be gone, and the node
answers ENOENT). The table grows with the nodes the kernel has been shown; at a
few hundred bytes per key, 10,000 snapshots in four views stay a few MB, so
``forget`` is not worth the bookkeeping.
"""

from __future__ import annotations

import pyfuse3

from ..errors import NotFound
from .keys import ROOT, Key, Kind


class InodeTable:
    def __init__(self) -> None:
        self._by_key: dict[Key, int] = {ROOT: pyfuse3.ROOT_INODE}
        self._by_inode: dict[int, Key] = {pyfuse3.ROOT_INODE: ROOT}
        self._next = pyfuse3.ROOT_INODE + 1

    def inode(self, key: Key) -> int:
        ino = self._by_key.get(key)
        if ino is None:
            ino = self._next
            self._next += 1
            self._by_key[key] = ino
            self._by_inode[ino] = key
        return ino

    def key(self, inode: int) -> Key:
        try:
            return self._by_inode[inode]
        except KeyError:
            raise NotFound("inode", str(inode)) from None

    def known(self, key: Key) -> int | None:
        """The inode of ``key`` if the kernel was ever shown it."""
        return self._by_key.get(key)

    def __len__(self) -> int:
        return len(self._by_key)

    def snapshot_keys(self, snapshot_id: str) -> list[Key]:
        """The directories of snapshot ``snapshot_id`` the kernel was shown, in every
        view (to invalidate the names it may have cached for them)."""
        return [k for k in self._by_key
                if k.kind is Kind.SNAPSHOT and k.snapshot == snapshot_id]
