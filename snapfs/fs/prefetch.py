"""Read-ahead for sequential readers of an image.

A FUSE read is one request at a time per reader (``dd``, ``cat``): while the
kernel copies one reply out and sends the next request, the daemon would sit
idle. When a reader's requests follow each other, the next ``depth`` requests
(same size, following offsets) are started in the background, so that the store's
pread + hash check of chunk N+1.. runs in worker threads while chunk N travels
through the kernel. Random readers (debugfs, e2fsck) never trigger it. Memory
is bounded by ``depth`` requests per open file.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import trio

from ..errors import Interrupted
from ..service import Buffer, ImageReader

log = logging.getLogger(__name__)


class _Slot:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: Exception | None = None


class Prefetcher:
    def __init__(self, reader: ImageReader, nursery: trio.Nursery | None, depth: int) -> None:
        self.reader = reader
        self.nursery = nursery
        self.depth = depth if nursery is not None else 0
        self._slots: OrderedDict[tuple[int, int], _Slot] = OrderedDict()
        self._last_end = -1
        self._closed = False
        #: ready / waited for / not read ahead: logged at close (tuning aid).
        self.stats = {"ready": 0, "waited": 0, "direct": 0}

    @property
    def size(self) -> int:
        return self.reader.size

    async def read_transient(self, offset: int, size: int) -> Buffer:
        """The bytes for a FUSE reply: the caller must be done with them before
        it next awaits (see ImageReader.read_transient)."""
        sequential = offset == self._last_end
        self._last_end = offset + size
        slot = self._slots.pop((offset, size), None)
        if sequential and self.depth:
            self._schedule(offset + size, size)
        elif not sequential and self._slots:
            self._slots.clear()  # the reader jumped: what was read ahead is not wanted
        if slot is not None:
            self.stats["ready" if slot.done.is_set() else "waited"] += 1
            await slot.done.wait()
            if slot.error is not None:
                raise slot.error
            assert slot.data is not None
            return slot.data
        self.stats["direct"] += 1
        return await self.reader.read_transient(offset, size)

    def _schedule(self, start: int, size: int) -> None:
        assert self.nursery is not None
        for i in range(self.depth):
            offset = start + i * size
            if offset >= self.reader.size:
                break
            if (offset, size) in self._slots:
                continue
            slot = _Slot()
            self._slots[(offset, size)] = slot
            self.nursery.start_soon(self._fill, slot, offset, size)
        while len(self._slots) > self.depth:
            self._slots.popitem(last=False)

    async def _fill(self, slot: _Slot, offset: int, size: int) -> None:
        try:
            if self._closed:
                raise Interrupted("file closed")
            slot.data = await self.reader.read(offset, size)
        except Exception as exc:  # handed to the reader that asks for these bytes
            slot.error = exc
        finally:
            if slot.data is None and slot.error is None:  # cancelled (unmount)
                slot.error = Interrupted("read-ahead cancelled")
            slot.done.set()

    async def aclose(self) -> None:
        log.debug("read-ahead: %s", self.stats)
        self._closed = True
        self._slots.clear()
        await self.reader.aclose()
