"""Which parts of a QCOW2 image's guest space hold data, as a bitmap of grains.

An import learns it from the L2 tables it validates anyway (decoder.check_l2)
and then fetches only the grains marked, in guest order; everything else is a
hole in the snapshot's map without being read, zero-filled or hashed. One bit
per 1 MiB grain: 8 MiB of bitmap for the largest image accepted (64 TiB).
"""

from __future__ import annotations

import re
from array import array
from typing import Iterator

from .decoder import Qcow2Map
from .format import OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_ZERO

#: Bitmap granularity; the local store's chunk size, so a grain is one map entry.
GRAIN = 1 << 20
_NONZERO = re.compile(rb"[^\x00]")
_NOT_FULL = re.compile(rb"[^\xff]")
_BLOCK = 4096
_ZEROS, _FULL = bytes(_BLOCK), b"\xff" * _BLOCK


class Allocation:
    """Grains of a ``size``-byte guest space that hold data (bit set)."""

    def __init__(self, size: int, grain: int = GRAIN) -> None:
        self.size = size
        self.grain = grain
        self.grains = -(-size // grain)
        self.bits = bytearray(-(-self.grains // 8))
        self.marked = 0  # grains set, counted as they are

    def mark(self, offset: int, length: int) -> None:
        """Guest bytes offset..+length hold data."""
        first, last = offset // self.grain, (offset + length - 1) // self.grain
        for g in range(first, min(last, self.grains - 1) + 1):
            bit = 1 << (g & 7)
            if not self.bits[g >> 3] & bit:
                self.bits[g >> 3] |= bit
                self.marked += 1

    def mark_l2(self, qmap: Qcow2Map, l1_indices: list[int], table: array) -> None:
        """The clusters one (validated) L2 table maps to data or compressed
        data, for each L1 entry of ``l1_indices`` that names it; entries that
        read as zeros (unallocated, the zero flag) are not.

        A crafted image may name one table from every L1 entry (131072 of them
        at 64 TiB): the table is walked once, and each entry's span gets its
        pattern of grains, a few bytes OR-ed into the bitmap, not a walk."""
        cs, span = qmap.header.cluster_size, qmap.l2_span()
        runs: list[list[int]] = []  # [first, end) entries holding data
        for i, entry in enumerate(table):
            if entry & OFLAG_COMPRESSED or (entry & OFFSET_MASK and not entry & OFLAG_ZERO):
                if runs and runs[-1][1] == i:
                    runs[-1][1] = i + 1
                else:
                    runs.append([i, i + 1])
        if not runs:
            return
        whole = [i for i in l1_indices if (i + 1) * span <= self.size]
        for i in l1_indices:
            if (i + 1) * span > self.size:  # the last table: clipped to the size
                base = i * span
                for a, b in runs:
                    if base + a * cs < self.size:
                        self.mark(base + a * cs, min(b * cs, self.size - base) - a * cs)
        if span % self.grain == 0 and span // self.grain % 8 == 0:
            # Spans start on bitmap bytes: OR in the table's pattern of bytes.
            pattern = Allocation(span, self.grain)
            for a, b in runs:
                pattern.mark(a * cs, (b - a) * cs)
            width, mask = len(pattern.bits), int.from_bytes(pattern.bits, "little")
            for i in whole:
                at = i * width
                old = int.from_bytes(self.bits[at:at + width], "little")
                new = old | mask
                if new != old:
                    self.bits[at:at + width] = new.to_bytes(width, "little")
                    self.marked += new.bit_count() - old.bit_count()
        elif self.grain % span == 0:
            for i in whole:  # the whole table lies in one grain
                self.mark(i * span, 1)
        else:  # grains of a size that does not divide (not used by snapfs)
            for i in whole:
                for a, b in runs:
                    self.mark(i * span + a * cs, (b - a) * cs)

    def __contains__(self, grain: int) -> bool:
        return 0 <= grain < self.grains and bool(self.bits[grain >> 3] >> (grain & 7) & 1)

    def count(self) -> int:
        """Grains marked."""
        return self.marked

    def next_set(self, grain: int) -> int:
        """The first marked grain >= ``grain`` (``grains`` when none)."""
        return self._next(grain, True)

    def next_clear(self, grain: int) -> int:
        """The first unmarked grain >= ``grain`` (``grains`` when none)."""
        return self._next(grain, False)

    def _next(self, grain: int, value: bool) -> int:
        if grain >= self.grains:
            return self.grains
        byte = grain >> 3
        bits = self.bits[byte] if value else ~self.bits[byte] & 0xFF
        bits >>= grain & 7
        if bits:
            return min(self.grains, grain + ((bits & -bits).bit_length() - 1))
        # Blocks of whole bytes skipped by memcmp: a terabyte of holes is 32
        # compares; the regex only searches the block that differs.
        skip = _ZEROS if value else _FULL
        pos, n = byte + 1, len(self.bits)
        while pos < n:
            block = self.bits[pos:pos + _BLOCK]
            if block != skip[:len(block)]:
                break
            pos += _BLOCK
        else:
            return self.grains
        found = (_NONZERO if value else _NOT_FULL).search(block)
        assert found is not None
        b = pos + found.start()
        bits = self.bits[b] if value else ~self.bits[b] & 0xFF
        return min(self.grains, b * 8 + (bits & -bits).bit_length() - 1)

    def runs(self, start: int = 0) -> Iterator[tuple[int, int]]:
        """(first, end) grain ranges marked, in order, from grain ``start``."""
        pos = start
        while True:
            first = self.next_set(pos)
            if first >= self.grains:
                return
            pos = self.next_clear(first)
            yield first, pos
