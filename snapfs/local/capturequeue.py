"""The capture queue: how many captures read at once, and in which order.

A capture holds tens of MiB of buffers while it reads (capture.py); a burst of
snapshot requests (a ``mkdir`` loop) must not multiply that. Captures therefore
take a ticket when requested (synchronously, so the bound holds however fast they
come) and wait, holding nothing but their ticket, for their turn:

- at most ``running`` captures read at once, whatever their volumes;
- one volume's captures run one after another, in the order requested. A
  snapshot requested while an earlier one of its volume is queued or running thus
  starts only once that one is done, and when the volume's read lease shows it
  unchanged since (leases.py), it copies that map instead of reading the volume;
- at most ``limit`` tickets exist: beyond, a request is refused (EAGAIN) instead
  of queueing without bound.

Waiting is on trio's fair (FIFO) locks and limiter: events, no polling. A
cancelled waiter (``rmdir`` of a queued snapshot, the service closing) gives its
ticket back on the way out.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

import trio

from ..errors import Transient

#: Captures reading at once (each holds a few batches of 1 MiB chunks).
RUNNING = 2
#: Captures requested and not finished, at most.
LIMIT = 4096


@dataclass(eq=False)
class _Line:
    """One volume's captures: the lock they take in turn, and how many hold tickets."""
    lock: trio.Lock = field(default_factory=trio.Lock)
    tickets: int = 0


@dataclass(eq=False)
class Ticket:
    """A place in the queue, for the captures of ``volume`` (None: no volume, an
    import: only the global bound applies)."""
    volume: str | None
    line: _Line | None
    spent: bool = False


class CaptureQueue:
    def __init__(self, running: int = RUNNING, limit: int = LIMIT) -> None:
        self.limit = limit
        self._slots = trio.CapacityLimiter(running)
        self._lines: dict[str, _Line] = {}
        self.tickets = 0

    def ticket(self, volume: str | None, bounded: bool = True) -> Ticket:
        """A place in the queue, taken when the work is requested. ``bounded``
        False for work that already exists (storing retried, resumed at open):
        refusing it would lose it."""
        if bounded and self.tickets >= self.limit:
            raise Transient(f"{self.tickets} captures are queued already; try again once "
                            "some are done")
        self.tickets += 1
        line = None
        if volume is not None:
            line = self._lines.setdefault(volume, _Line())
            line.tickets += 1
        return Ticket(volume, line)

    def give_back(self, t: Ticket) -> None:
        if t.spent:
            return
        t.spent = True
        self.tickets -= 1
        if t.line is not None and t.volume is not None:
            t.line.tickets -= 1
            if not t.line.tickets and self._lines.get(t.volume) is t.line:
                del self._lines[t.volume]

    @asynccontextmanager
    async def turn(self, t: Ticket) -> AsyncIterator[None]:
        """Wait for the ticket's turn (its volume's earlier captures done, then a
        free slot) and hold it for the body; the ticket is given back however the
        body or the wait ends."""
        try:
            if t.line is not None:
                async with t.line.lock:  # the volume's line first: waiting there takes no slot
                    async with self._slots:
                        yield
            else:
                async with self._slots:
                    yield
        finally:
            self.give_back(t)

    def queued(self, volume: str) -> int:
        """How many captures of ``volume`` hold tickets (queued or running)."""
        line = self._lines.get(volume)
        return line.tickets if line is not None else 0
