"""The image readers' one budget (snapfs.memory.BufferBudget) under the read-ahead
engine: many readers hold no more than it, a read that waits evicts the least
recently used reader's windows, read-ahead only takes free room or idle
readers' windows, a read nothing can make room for is served uncached, and
the spare pool is bounded."""

from __future__ import annotations

import mmap
import random

import pytest
import trio

from snapfs import memory
from snapfs.memory import BufferBudget
from snapfs.readahead import ReadAhead
from snapfs.service import Buffer

W = 1000  # window
SIZE = 40 * W
DATA = bytes(i * 7 % 251 for i in range(SIZE))


class Source:
    """Fetches from DATA; ``gate`` holds fetches until set."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.gate: trio.Event | None = None

    async def fetch(self, offset: int, length: int) -> Buffer:
        self.calls.append(offset)
        if self.gate is not None:
            await self.gate.wait()
        await trio.sleep(0)
        return DATA[offset:offset + length]


def engine(budget: BufferBudget, nursery: trio.Nursery | None = None,
           src: Source | None = None, **kw: object) -> ReadAhead:
    args: dict[str, object] = dict(window=W, ahead=2, cached=8, budget=budget)
    args.update(kw)
    return ReadAhead((src or Source()).fetch, SIZE, nursery, **args)  # type: ignore[arg-type]


def budget_of(windows: int, idle: float = 60.0) -> BufferBudget:
    return BufferBudget(windows * W, spare_bytes=0, idle=idle)


async def test_many_readers_hold_no_more_than_the_budget_and_read_right_bytes() -> None:
    budget = budget_of(10)
    readers = [engine(budget) for _ in range(50)]
    rng = random.Random(1)
    for _ in range(2000):
        ra = rng.choice(readers)
        off = rng.randrange(SIZE - 50)
        assert bytes(await ra.read_transient(off, 50)) == DATA[off:off + 50]
        assert budget.used <= budget.limit
        assert sum(len(r.cached_windows()) for r in readers) * W == budget.used
    assert budget.stats["evicted"] > 0
    for ra in readers:
        await ra.aclose()
    assert budget.used == 0


async def test_a_waiting_read_evicts_the_least_recently_used_readers_window_first() -> None:
    budget = budget_of(3)
    a, b, c = engine(budget), engine(budget), engine(budget)
    await a.read_transient(0, 10)
    await b.read_transient(5 * W, 10)
    await c.read_transient(9 * W, 10)
    await a.read_transient(1, 10)  # a is used again: b is now the least recent
    await c.read_transient(20 * W, 10)  # no room: b's window goes
    assert (a.cached_windows(), b.cached_windows(), c.cached_windows()) == \
        ([0], [], [9 * W, 20 * W])
    await c.read_transient(30 * W, 10)  # then a's (c's own last)
    assert (a.cached_windows(), c.cached_windows()) == ([], [9 * W, 20 * W, 30 * W])
    await c.read_transient(35 * W, 10)  # only c's left: its least recently used
    assert c.cached_windows() == [20 * W, 30 * W, 35 * W]
    for ra in (a, b, c):
        await ra.aclose()
    assert budget.used == 0


async def test_read_ahead_takes_free_room_or_idle_readers_windows_only(
        nursery: trio.Nursery) -> None:
    budget = budget_of(4)
    busy = engine(budget)
    for off in (10 * W, 20 * W, 30 * W):  # three random windows, just read
        await busy.read_transient(off, 10)
    src = Source()
    streamer = engine(budget, nursery, src)
    for off in (0, 100, 200):  # forward, in its first window (the last room)
        assert bytes(await streamer.read_transient(off, 100)) == DATA[off:off + 100]
        await trio.sleep(0.01)
    # Not ahead of itself with the busy reader's windows.
    assert src.calls == [0] and len(busy.cached_windows()) == 3
    budget.idle = 0.0  # the busy reader is now idle: its windows may go
    assert bytes(await streamer.read_transient(300, 100)) == DATA[300:400]
    await trio.sleep(0.01)
    assert sorted(src.calls) == [0, W, 2 * W] and len(busy.cached_windows()) == 1
    assert budget.used == budget.limit
    await streamer.aclose()
    await busy.aclose()
    assert budget.used == 0


async def test_a_read_nothing_can_make_room_for_is_served_uncached(
        nursery: trio.Nursery) -> None:
    budget = budget_of(1)
    src = Source()
    src.gate = trio.Event()
    a, b = engine(budget, src=src), engine(budget, src=src)
    got: dict[str, bytes] = {}

    async def read(name: str, ra: ReadAhead, off: int) -> None:
        got[name] = bytes(await ra.read_transient(off, 2 * W))  # spans two windows

    nursery.start_soon(read, "a", a, 3 * W)
    nursery.start_soon(read, "b", b, 7 * W + 500)
    await trio.sleep(0.01)
    src.gate.set()
    while len(got) < 2:
        await trio.sleep(0.001)
    assert got == {"a": DATA[3 * W:5 * W], "b": DATA[7 * W + 500:9 * W + 500]}
    assert budget.used <= budget.limit and budget.stats["refused"] > 0  # not cached
    assert sum(len(r.cached_windows()) for r in (a, b)) <= 1
    await a.aclose()
    await b.aclose()
    assert budget.used == 0


async def test_zero_cost_windows_are_cached_without_charge() -> None:
    budget = budget_of(1)
    ra = engine(budget, cost=lambda data: 0)
    for off in range(0, 8 * W, W):
        await ra.read_transient(off, 10)
    assert len(ra.cached_windows()) == 8 and budget.used == 0
    await ra.aclose()


def test_the_spare_pool_is_bounded_and_reuses_the_last_buffer_first() -> None:
    budget = BufferBudget(64 * 4096, spare_bytes=3 * 4096)
    bufs = [mmap.mmap(-1, 4096) for _ in range(5)]
    for buf in bufs:
        budget.give_spare(buf)
    assert budget.spare_used == 3 * 4096
    assert budget.take_spare(8192) is None  # no spare of that size
    assert budget.take_spare(4096) is bufs[2]
    assert budget.spare_used == 2 * 4096
    assert budget.limit == 61 * 4096  # the spares' share is kept apart


async def test_per_byte_sources_read_exactly_when_windows_would_thrash(
        nursery: trio.Nursery) -> None:
    """Twenty streams at once, each reading its windows a tenth at a time, over a
    budget of four windows: with a per-byte source (S3: exact_random) a stream
    whose window would only evict another's reads its bytes instead, so no more
    is fetched than is read (before: each read fetched its whole window again,
    ten times the bytes); every byte right, the budget kept."""
    budget = budget_of(4)
    src = Source()
    fetched: list[int] = []
    real = src.fetch

    async def counted(offset: int, length: int) -> Buffer:
        fetched.append(length)
        return await real(offset, length)
    readers = [ReadAhead(counted, SIZE, nursery, window=W, ahead=2, cached=4,  # type: ignore[arg-type]
                         exact_random=True, budget=budget) for _ in range(20)]
    step = W // 10
    for off in range(0, 4 * W, step):
        for ra in readers:
            assert bytes(await ra.read_transient(off, step)) == DATA[off:off + step]
            assert budget.used <= budget.limit
    read = 20 * 4 * W
    assert sum(fetched) <= 2 * read, (sum(fetched), read)
    for ra in readers:
        await ra.aclose()
    assert budget.used == 0


async def test_room_set_aside_for_a_capture_sheds_windows_and_is_given_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A capture's buffers come out of the readers' share while it runs (a capture
    beside busy readers took a daemon past its 200 MB); never below the floor,
    and a second or third capture gets what is left above it rather than waiting."""
    monkeypatch.setattr(memory, "READERS_FLOOR", 4 * W)
    budget = budget_of(20)
    readers = [engine(budget) for _ in range(5)]
    for i, ra in enumerate(readers):  # 4 windows each: the whole budget
        for w in range(4):
            await ra.read_transient((i * 4 + w) * W, 10)
    assert budget.used == 20 * W
    with budget.set_aside(10 * W) as first:
        assert first == 10 * W and budget.used <= budget.limit == 10 * W
        with budget.set_aside(10 * W) as second:
            assert second == 6 * W and budget.limit == 4 * W  # the floor kept
            with budget.set_aside(10 * W) as third:
                assert third == 0
            assert budget.used <= 4 * W
            for _ in range(20):  # readers go on inside what is left, bytes right
                off = random.randrange(SIZE - 50)
                assert bytes(await readers[0].read_transient(off, 50)) == DATA[off:off + 50]
                assert budget.used <= budget.limit
    assert budget.limit == 20 * W and budget.aside == 0
