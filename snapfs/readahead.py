"""One read-ahead engine for every image reader (local chunks, shadows, S3).

An image is cut into aligned windows of ``window`` bytes. A read is served from
the windows it spans: cached ones are used as they are (a read inside one window
is a view of it, no copy), missing ones are fetched with the reader's async
``fetch(offset, length)``, and a window already being fetched is waited for,
never fetched twice. While a reader goes forward (each read starts within
``slack`` bytes of where the last one ended) the next ``ahead`` windows are
fetched in background tasks, in the nursery the reader's OWNER gives it (the
service's long-lived one): the fetch of window N+1.. overlaps with the reader's
use of window N. Random readers never trigger it. At most ``cached`` windows are
kept; windows the stream has passed go first, then the least recently used.

A source with a cheap path (``fast``: the local store's page-cache read on the
trio thread) is tried first; read-ahead runs only while that path misses, since
a background task costs more than a read that never waits.

A background fetch that fails keeps its error for the read that wants those
bytes; an error no read received is raised by ``aclose()``, which first
waits for every fetch still in flight (the source may be closed after it).

With a ``budget`` (snapfs.memory.BufferBudget, shared by every reader of the
process) each cached window is charged there: read-ahead starts only for the
windows the budget grants, a window a read fetched is cached only if charged
(else it serves the reads waiting for it and goes), and the budget may ask the
engine to ``shed`` a window for another reader. So the cache bound per engine
(``cached``) is a ceiling, and the process's total is the budget's.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Awaitable, Callable

import trio

from .errors import Interrupted
from .memory import BufferBudget
from .service import Buffer

log = logging.getLogger(__name__)

#: Fetches a range (within the image) and returns exactly its bytes.
Fetch = Callable[[int, int], Awaitable[Buffer]]
#: The cheap path: the range's bytes, or None when only ``fetch`` can get them.
Fast = Callable[[int, int], Awaitable["Buffer | None"]]

#: Background errors kept for their reads (or close) at most; older ones are logged.
MAX_FAILED = 16




class ReadAhead:
    def __init__(self, fetch: Fetch, size: int, nursery: trio.Nursery | None, *,
                 window: int, ahead: int, cached: int, slack: int = 0, behind: int | None = None,
                 exact_random: bool = False, fast: Fast | None = None,
                 on_drop: Callable[[Buffer], None] | None = None, name: str = "image",
                 budget: BufferBudget | None = None,
                 cost: Callable[[Buffer], int] = len) -> None:
        """``behind``: a forward reader drops windows that end this far behind
        its last read (None: kept until evicted); ``exact_random``: a random read
        not in the cache fetches just its bytes, not its windows (for a source
        where a request costs per byte: S3); ``on_drop``: a window's buffer left
        the cache (the reader may reuse it: views lent by read_transient are done
        with before their caller awaits, and a buffer is only refilled by a fetch,
        which starts at an await); ``budget``: where cached windows are charged,
        ``cost`` bytes each (a shared buffer of zeros costs nothing)."""
        assert window > 0 and cached >= ahead + 2, "the reader's window and the ones ahead"
        self.fetch, self.fast, self.on_drop = fetch, fast, on_drop
        self.size, self.window, self.ahead, self.cached = size, window, ahead, cached
        self.slack, self.behind, self.exact_random = slack, behind, exact_random
        self.name = name
        self._nursery = nursery
        self._budget, self._cost = budget, cost
        #: Bytes charged to the budget for each window of _windows (only those:
        #: a window in _held is outside the budget, held by the reads waiting).
        self._charge: dict[int, int] = {}
        self._touched = -1  # the window whose read last told the budget
        self._windows: OrderedDict[int, Buffer] = OrderedDict()  # start -> bytes
        self._inflight: dict[int, trio.Event] = {}  # start -> its fetch ends
        self._failed: OrderedDict[int, Exception] = OrderedDict()  # start -> error
        #: Reads waiting for a window: evicted meanwhile, it is kept (in _held) for
        #: them, not given back to on_drop, so that concurrent readers cannot evict
        #: each other's windows forever.
        self._pins: dict[int, int] = {}
        self._held: dict[int, Buffer] = {}
        self._pos = 0  # where a forward reader reads next
        self._ahead = 0  # read-ahead started up to (not including) this window start
        self._edge = -1  # windows ending at or before it were dropped behind the reader
        #: The last window needed the slow path: read ahead (always, without fast).
        self.cold = True
        self._closed = False
        #: windows fetched ahead / on demand, reads fetched exactly: logged at close
        self.stats = {"ahead": 0, "on_demand": 0, "exact": 0}
        if budget is not None:
            budget.join(self)

    def in_flight(self) -> list[int]:
        """Starts of the windows being fetched."""
        return sorted(self._inflight)

    def cached_windows(self) -> list[int]:
        return sorted(self._windows)

    # --- reads ---------------------------------------------------------------------

    @property
    def span(self) -> int:
        """Longest read served in one piece: its windows must fit in the cache
        with the ones ahead (or it would evict its own first windows forever)."""
        return self.window * max(1, self.cached - self.ahead - 1)

    async def read(self, offset: int, length: int) -> bytes:
        if length <= self.span:
            return bytes(await self.read_transient(offset, length))
        parts = []
        for start in range(offset, min(offset + length, self.size), self.span):
            parts.append(bytes(await self.read_transient(
                start, min(self.span, offset + length - start))))
        return b"".join(parts)

    async def read_transient(self, offset: int, length: int) -> Buffer:
        """The bytes, maybe as a view of a cached window: valid until the caller
        next awaits."""
        if offset >= self.size or length <= 0:
            return b""
        if self._closed:
            raise Interrupted(f"read of {self.name} after it was closed")
        if length > self.span:
            return await self.read(offset, length)
        end = min(offset + length, self.size)
        w = self.window
        first, last = offset - offset % w, (end - 1) - (end - 1) % w
        budget = self._budget
        if budget is not None and (first != self._touched or budget.last is not self):
            # Not per read of a lone stream (the hit path's cost): per window it
            # moves to, or when another reader was used since.
            self._touched = first
            budget.touch(self)
        forward = self._pos - self.slack <= offset <= self._pos + self.slack
        self._pos = max(self._pos, end) if forward else end
        if not forward:
            self._ahead, self._edge = last + w, -1
            if self.exact_random and not all(self._has(s) for s in range(first, last + 1, w)):
                self.stats["exact"] += 1
                return await self.fetch(offset, end - offset)
        hit = self._windows.get(first) if first == last else None
        if hit is not None:  # the common case, kept short: on two cores it bounds throughput
            self._windows.move_to_end(first)
            got = [hit]
        else:
            if self._would_thrash(first, last):
                self.stats["exact"] += 1
                return await self.fetch(offset, end - offset)
            got = await self._get(first, last)
        # No await from here on: the views must reach the caller intact.
        if forward:
            if self.behind is not None:
                limit = end - self.behind
                edge = limit - limit % w
                if edge > self._edge:  # (once per window, not per read)
                    self._edge = edge
                    self._drop_behind(edge)
            if self.cold:
                self._read_ahead(last + w)
        if first == last:
            data = got[0]
            if offset == first and end - first == len(data):
                return data
            if not isinstance(data, memoryview):
                data = memoryview(data)  # a view: slicing bytes would copy
            return data[offset - first:end - first]
        parts = []
        for start, data in zip(range(first, last + 1, w), got):
            parts.append(memoryview(data)[max(offset, start) - start:min(end, start + w) - start])
        return b"".join(parts)

    async def _get(self, first: int, last: int) -> list[Buffer]:
        """The windows first..last (starts), collected with no await in between
        and after the last one."""
        starts = range(first, last + 1, self.window)
        for start in starts:
            self._pins[start] = self._pins.get(start, 0) + 1
        try:
            while True:
                missing = []
                for start in starts:
                    if start in self._failed:
                        raise self._failed.pop(start)  # a read-ahead's error: this read's
                    if not self._has(start) and start not in self._inflight:
                        if not await self._try_fast(start):
                            missing.append(start)
                if len(missing) == 1:
                    await self._fetch_window(missing[0])
                elif missing:  # one request's windows fetched in parallel
                    try:
                        async with trio.open_nursery() as nursery:
                            for start in missing:
                                nursery.start_soon(self._fetch_window, start)
                    except BaseExceptionGroup as group:
                        # A window's error (CorruptData, say) is this read's error,
                        # as it is with one window: not a group the errno table
                        # cannot name (it was logged as a bug).
                        raise _first_error(group) from None
                for start in starts:
                    while start in self._inflight:  # another read or a read-ahead fetches it
                        await self._inflight[start].wait()
                    if start in self._failed:
                        raise self._failed.pop(start)
                out: list[Buffer] = []
                for start in starts:
                    data = self._windows.get(start)
                    if data is None:
                        data = self._held.get(start)
                        if data is None:
                            break  # its fetch failed for another read, or was cancelled
                    else:
                        self._windows.move_to_end(start)
                    out.append(data)
                else:
                    return out
        finally:
            for start in starts:
                n = self._pins.pop(start) - 1
                if n:
                    self._pins[start] = n
                elif start in self._held:
                    self._dropped(self._held.pop(start))

    def _would_thrash(self, first: int, last: int) -> bool:
        """Whether the windows first..last of a per-byte source (exact_random)
        would be fetched whole only to be evicted again: the budget has no room
        for them but by evicting windows readers in use hold. Many streams at
        once then each GET their bytes, not a window per read (twenty streams
        reading a tenth of a window at a time fetched 10x the bytes they read:
        tests/test_memory_budget.py)."""
        budget = self._budget
        if not self.exact_random or budget is None:
            return False
        need = sum(self._length(s) for s in range(first, last + 1, self.window)
                   if not self._has(s) and s not in self._inflight)
        if not need:
            return False
        if budget.reserve(need, self, False):  # free room, or idle readers' windows
            budget.release(need)  # (a probe: the fetch charges it when it lands)
            return False
        return True

    def _has(self, start: int) -> bool:
        return start in self._windows or start in self._held

    def holds(self, offset: int) -> bool:
        """The window at ``offset`` is cached, being fetched or failed: a read
        of it goes through the engine (which hands over that result)."""
        start = offset - offset % self.window
        return self._has(start) or start in self._inflight or start in self._failed

    async def _try_fast(self, start: int, fetching: bool = False, charged: int = 0) -> bool:
        """The cheap path for one window; ``fetching``: called by its own fetch,
        which charged ``charged`` bytes for it (kept for that fetch on a miss)."""
        if self.fast is None:
            return False
        data = await self.fast(start, self._length(start))
        self.cold = data is None
        if data is not None:
            if self._closed or self._has(start) or (
                    not fetching and start in self._inflight):
                self._dropped(data)  # fetched meanwhile: keep that one
            else:
                self._remember(start, data, charged)
                charged = 0
        if charged and (data is not None or not fetching):
            self._budget_release(charged)
        return data is not None

    async def _fetch_window(self, start: int) -> None:
        """On demand: its error is this read's (a read waiting for it tries again)."""
        if start in self._inflight or self._has(start):
            return  # fetched meanwhile (while this read tried the cheap path)
        done = self._inflight[start] = trio.Event()
        try:
            data = await self.fetch(start, self._length(start))
            self.stats["on_demand"] += 1
            if self._closed:
                self._dropped(data)
            else:
                self._remember(start, data, 0)  # charged now, if the budget can
        finally:
            del self._inflight[start]
            done.set()

    def _length(self, start: int) -> int:
        return min(self.window, self.size - start)

    # --- read-ahead ----------------------------------------------------------------

    def _read_ahead(self, nxt: int) -> None:
        """Keep the ``ahead`` windows from ``nxt`` cached or in flight."""
        if self._nursery is None or self._closed:
            return
        stop = min(nxt + self.ahead * self.window, self.size)
        for start in range(max(self._ahead, nxt), stop, self.window):
            if self._has(start) or start in self._inflight or start in self._failed:
                continue
            charged = self._length(start)
            if self._budget is not None and not self._budget.reserve(charged, self, False):
                stop = start  # no room: the stream reads on demand; a later read retries
                break
            done = trio.Event()
            try:
                self._nursery.start_soon(self._fill, start, done, charged)
            except RuntimeError:  # the owner's nursery is closing: no more read-ahead
                self._budget_release(charged)
                self._nursery = None
                return
            # In flight from now on: a read arriving before the task runs waits for it.
            self._inflight[start] = done
        self._ahead = max(self._ahead, stop)

    async def _fill(self, start: int, done: trio.Event, charged: int) -> None:
        """``charged``: what _read_ahead reserved for it, passed on with the
        window or given back."""
        try:
            if self._closed:
                pass
            elif await self._try_fast(start, fetching=True, charged=charged):
                charged = 0  # passed on with the window
            else:
                data = await self.fetch(start, self._length(start))
                self.stats["ahead"] += 1
                if self._closed:
                    self._dropped(data)
                else:
                    self._remember(start, data, charged)
                    charged = 0
        except Exception as exc:  # kept for the read of these bytes, or close
            self._fail(start, exc)
        finally:  # (cancelled with the owner's nursery: a read fetches it itself)
            self._budget_release(charged)
            del self._inflight[start]
            done.set()

    def _fail(self, start: int, exc: Exception) -> None:
        self._failed[start] = exc
        while len(self._failed) > MAX_FAILED:
            old, err = self._failed.popitem(last=False)
            log.warning("%s: read-ahead at %d failed, no read wanted it: %s",
                        self.name, old, err)

    # --- the cache -----------------------------------------------------------------

    def _remember(self, start: int, data: Buffer, charged: int) -> None:
        """Cache a window for which ``charged`` bytes were reserved: charged
        what it costs (the difference reserved now, or given back), or, if the
        budget has no room, handed to the reads waiting for it only."""
        old = self._windows.pop(start, None)
        if old is not None:
            self._budget_release(self._charge.pop(start, 0))
            self._dropped(old)
        budget = self._budget
        if budget is not None:
            cost = self._cost(data)
            if charged > cost:
                budget.release(charged - cost)
            # Urgent (may evict any reader's windows) only if a read waits for it.
            elif charged < cost and not budget.reserve(cost - charged, self,
                                                       start in self._pins):
                budget.release(charged)
                if start in self._pins and start not in self._held:
                    self._held[start] = data  # served to those reads, then dropped
                else:
                    self._dropped(data)
                return
            self._charge[start] = cost
        self._windows[start] = data
        while len(self._windows) > self.cached:
            # Windows the stream has passed go first: plain LRU would drop a
            # read-ahead window before the reader gets to it.
            passed = next((s for s in self._windows if s + self.window <= self._pos), None)
            if passed is None:
                passed = next(iter(self._windows))
            self._evict(passed)

    def _drop_behind(self, limit: int) -> None:
        for start in [s for s in self._windows if s + self.window <= limit]:
            self._evict(start)

    def _evict(self, start: int) -> None:
        data = self._windows.pop(start)
        self._budget_release(self._charge.pop(start, 0))
        if start in self._pins:
            self._held[start] = data  # a read waits for it (see _get)
        else:
            self._dropped(data)

    def _dropped(self, data: Buffer) -> None:
        if self.on_drop is not None:
            self.on_drop(data)

    def _budget_release(self, n: int) -> None:
        if n and self._budget is not None:
            self._budget.release(n)

    def shed(self) -> bool:
        """For the budget: evict the window needed least -- one the stream has
        passed, else the least recently used -- but none a read waits for."""
        victim = None
        for start in self._windows:  # least recently used first
            if start in self._pins:
                continue
            if start + self.window <= self._pos:
                victim = start
                break
            if victim is None:
                victim = start
        if victim is None:
            return False
        self._evict(victim)
        return True

    # --- close ---------------------------------------------------------------------

    async def aclose(self) -> None:
        """Wait until the fetches in flight have ended (the source may be closed
        right after); then raise the first error of a read-ahead that no read
        received (the others are logged)."""
        if self._closed:
            return
        self._closed = True
        log.debug("%s read-ahead closed: %s", self.name, self.stats)
        with trio.CancelScope(shield=True):
            while self._inflight:
                await next(iter(self._inflight.values())).wait()
        if self._budget is not None:
            self._budget.leave(self)
        for start in list(self._windows):
            self._evict(start)
        failed, self._failed = list(self._failed.items()), OrderedDict()
        for start, exc in failed[1:]:
            log.warning("%s: read-ahead at %d failed, no read wanted it: %s",
                        self.name, start, exc)
        if failed:
            raise failed[0][1]


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The first exception of ``group`` that is not a cancellation (the group
    itself when all are: trio's own to unwind)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            inner = _first_error(exc)
            if inner is not exc:
                return inner
        elif not isinstance(exc, trio.Cancelled):
            return exc
    return group
