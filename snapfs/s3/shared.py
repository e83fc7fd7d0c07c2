"""What every QCOW2 object reader of the process shares, so that the daemon's
memory does not grow with the number of open cloud ``image.raw`` descriptors
(each open makes a reader of its own): the parsed L2 tables (one LRU, bounded
in bytes) and the spare read-ahead window buffers (a few, process-wide). The
windows themselves are charged to the readers' one budget (snapfs.memory).

And what opening one costs: an object version (its ETag) validated once --
every L2 table fetched and checked: for a fully allocated 1 TB image, 128 MiB
of GETs and ~20 s of checks -- is not validated again by the next open of that version (its
mapping and allocation are kept, bounded in bytes: VALIDATED); nor is one
refused as not valid QCOW2 (its reason is kept: REFUSED).

Everything here runs on the trio thread: no locks.
"""

from __future__ import annotations

import itertools
import mmap
from array import array
from collections import OrderedDict
from typing import TYPE_CHECKING, Hashable

from ..lru import LRUDict

if TYPE_CHECKING:
    from ..qcow2.allocation import Allocation
    from ..qcow2.decoder import Qcow2Map

#: Parsed L2 tables kept for all readers together (64 KiB each at 64 KiB clusters).
L2_CACHE_BYTES = 32 << 20
#: Window buffers kept for reuse by the next window of any reader: a fresh
#: multi-MiB buffer per window costs its page faults (measured: a stream took
#: twice as long without them); two serve a stream's steady state.
SPARE_WINDOWS = 2

_tokens = itertools.count()


def reader_token(endpoint: str, bucket: str, key: str, etag: str | None) -> Hashable:
    """What a reader's L2 tables are filed under: readers of one version of an
    object (same server, same ETag) share them; without an ETag, a reader has
    its own."""
    return (endpoint, bucket, key, etag) if etag else ("reader", next(_tokens))


class L2Tables:
    """One LRU of parsed L2 tables, bounded in bytes, for every reader."""

    def __init__(self, capacity: int = L2_CACHE_BYTES) -> None:
        self.capacity = capacity
        self.used = 0
        self._tables: OrderedDict[tuple[Hashable, int], array] = OrderedDict()

    def get(self, token: Hashable, offset: int) -> array | None:
        table = self._tables.get((token, offset))
        if table is not None:
            self._tables.move_to_end((token, offset))
        return table

    def put(self, token: Hashable, offset: int, table: array) -> None:
        old = self._tables.pop((token, offset), None)
        if old is not None:
            self.used -= old.itemsize * len(old)
        self._tables[(token, offset)] = table
        self.used += table.itemsize * len(table)
        while self.used > self.capacity and len(self._tables) > 1:
            _, gone = self._tables.popitem(last=False)
            self.used -= gone.itemsize * len(gone)


class WindowSpares:
    """Released window buffers, SPARE_WINDOWS at most for the whole process."""

    def __init__(self, limit: int = SPARE_WINDOWS) -> None:
        self.limit = limit
        self._buffers: list[mmap.mmap] = []

    def take(self, length: int) -> mmap.mmap | None:
        for i in range(len(self._buffers) - 1, -1, -1):  # the warmest first
            if len(self._buffers[i]) == length:
                return self._buffers.pop(i)
        return None

    def give(self, buf: mmap.mmap) -> None:
        if len(self._buffers) < self.limit:
            self._buffers.append(buf)


#: One version of an object: (server, bucket, key, ETag, size).
Version = tuple[str, str, str, str, int]


def version(endpoint: str, bucket: str, key: str, etag: str | None,
            size: int) -> Version | None:
    """What an object version is known by; None without an ETag (a GET cannot be
    pinned to it then: nothing is kept of it)."""
    return (endpoint, bucket, key, etag, size) if etag else None


#: Validated object versions kept (their L1 tables and allocation bitmaps).
VALIDATED_BYTES = 32 << 20
VALIDATED_MAX = 64


class Validated:
    """Object versions whose tables an open validated: their mapping and
    allocation, read-only from then on, for the next open."""

    def __init__(self, capacity: int = VALIDATED_BYTES, most: int = VALIDATED_MAX) -> None:
        self.capacity, self.most = capacity, most
        self.used = 0
        self._images: OrderedDict[Version, tuple["Qcow2Map", "Allocation", int]] = OrderedDict()

    def get(self, where: Version | None) -> tuple["Qcow2Map", "Allocation"] | None:
        if where is None or (found := self._images.get(where)) is None:
            return None
        self._images.move_to_end(where)
        return found[0], found[1]

    def put(self, where: Version | None, qmap: "Qcow2Map", allocation: "Allocation") -> None:
        cost = len(qmap.l1) * 8 + len(allocation.bits)
        if where is None or cost > self.capacity:
            return
        old = self._images.pop(where, None)
        if old is not None:
            self.used -= old[2]
        self._images[where] = (qmap, allocation, cost)
        self.used += cost
        while self.used > self.capacity or len(self._images) > self.most:
            _, (_, _, gone) = self._images.popitem(last=False)
            self.used -= gone


#: Object versions refused as not valid QCOW2 kept, with the reason.
REFUSED_MAX = 256


L2_TABLES = L2Tables()
#: Object versions whose validation refused them (InvalidData), with the reason: a
#: version's bytes never change, so the next open of it is refused with the same
#: reason after its HEAD, not after fetching and checking its tables again (a
#: crafted image may cost seconds of GETs and checks per open). Only verdicts on
#: the bytes are kept: an InvalidAnswer is about one answer of the server.
REFUSED: LRUDict[Version, str] = LRUDict(REFUSED_MAX)
VALIDATED = Validated()
SPARES = WindowSpares()
