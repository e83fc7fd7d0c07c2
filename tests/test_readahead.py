"""The one read-ahead engine (snapfs/readahead.py) over a fetch that records what
it is asked: sequential, random and backwards readers, failing fetches, a close
with fetches in flight, cancellation, and the cache bound."""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio

from snapfs.readahead import ReadAhead
from snapfs.service import Buffer

W = 1000  # window
SIZE = 20 * W + 123
DATA = bytes(i * 7 % 251 for i in range(SIZE))


class Source:
    """Fetches from DATA; ``gate`` holds fetches until set; ``fail`` names
    window starts whose fetch raises."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.gate: trio.Event | None = None
        self.fail: set[int] = set()
        self.running = 0

    async def fetch(self, offset: int, length: int) -> Buffer:
        self.calls.append((offset, length))
        self.running += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            await trio.sleep(0)
            if offset in self.fail:
                raise OSError(5, f"bad window at {offset}")
            return DATA[offset:offset + length]
        finally:
            self.running -= 1

    def starts(self) -> list[int]:
        return [o for o, _ in self.calls]


def engine(src: Source, nursery: trio.Nursery | None, **kw: object) -> ReadAhead:
    args: dict[str, object] = dict(window=W, ahead=2, cached=4)
    args.update(kw)
    return ReadAhead(src.fetch, SIZE, nursery, **args)  # type: ignore[arg-type]


async def test_a_sequential_reader_is_served_ahead_each_window_fetched_once(
        nursery: trio.Nursery) -> None:
    src = Source()
    ra = engine(src, nursery)
    got = []
    for off in range(0, SIZE, 300):
        got.append(bytes(await ra.read_transient(off, 300)))
        await trio.sleep(0)  # a consumer: lets the read-ahead run
    assert b"".join(got) == DATA
    assert sorted(src.starts()) == list(range(0, SIZE, W))  # each window once
    assert ra.stats["on_demand"] == 1 and ra.stats["ahead"] == 20
    assert len(ra.cached_windows()) <= 4
    await ra.aclose()


async def test_random_and_backwards_readers_get_no_read_ahead(nursery: trio.Nursery) -> None:
    src = Source()
    ra = engine(src, nursery)
    offsets = [15 * W + 5, 3 * W + 17, 9 * W, 12 * W + 900, 1]
    for off in offsets:
        assert bytes(await ra.read_transient(off, 10)) == DATA[off:off + 10]
    await trio.sleep(0.01)
    assert src.starts() == [o - o % W for o in offsets]  # just the windows read
    src.calls.clear()
    for off in range(19 * W, -1, -W):  # backwards, a window at a time
        assert bytes(await ra.read_transient(off, W)) == DATA[off:off + W]
        await trio.sleep(0)
    assert ra.stats["ahead"] == 0
    assert len(src.calls) == len(set(src.calls))
    await ra.aclose()


async def test_exact_random_reads_fetch_just_their_bytes(nursery: trio.Nursery) -> None:
    src = Source()
    ra = engine(src, nursery, exact_random=True)
    await ra.read_transient(0, 10)  # forward from 0: windows
    assert await ra.read(7 * W + 3, 50) == DATA[7 * W + 3:7 * W + 53]
    assert (7 * W + 3, 50) in src.calls
    await ra.aclose()


async def test_a_failed_read_ahead_is_the_error_of_the_read_that_wants_it(
        nursery: trio.Nursery) -> None:
    src = Source()
    src.fail = {2 * W}
    ra = engine(src, nursery)
    assert await ra.read(0, W) == DATA[:W]  # windows 1 and 2 read ahead; 2 fails
    assert await ra.read(W, W) == DATA[W:2 * W]
    with pytest.raises(OSError, match="bad window at 2000"):
        await ra.read(2 * W, 10)
    src.fail.clear()
    assert await ra.read(2 * W, 10) == DATA[2 * W:2 * W + 10]  # tried again: fine now
    await ra.aclose()  # the error was received: close is clean


async def test_a_failure_no_read_received_is_raised_at_close(nursery: trio.Nursery) -> None:
    src = Source()
    src.fail = {2 * W}
    ra = engine(src, nursery)
    assert await ra.read(0, W) == DATA[:W]
    await trio.sleep(0.01)
    with pytest.raises(OSError, match="bad window at 2000"):
        await ra.aclose()


async def test_an_on_demand_failure_is_the_reads_and_waiters_try_again(
        nursery: trio.Nursery) -> None:
    src = Source()
    src.fail = {5 * W}
    ra = engine(src, nursery)
    with pytest.raises(OSError, match="bad window at"):
        await ra.read(5 * W + 1, 10)
    src.fail.clear()
    assert await ra.read(5 * W + 1, 10) == DATA[5 * W + 1:5 * W + 11]
    await ra.aclose()


async def test_close_waits_for_fetches_in_flight(nursery: trio.Nursery) -> None:
    src = Source()
    ra = engine(src, nursery)
    assert await ra.read(0, 10) == DATA[:10]
    src.gate = trio.Event()
    await ra.read(10, W - 10)  # reads on: windows 1, 2 started, held at the gate
    await trio.sleep(0.01)
    assert ra.in_flight() == [W, 2 * W] and src.running == 2
    closed = trio.Event()

    async def close() -> None:
        await ra.aclose()
        closed.set()
    nursery.start_soon(close)
    await trio.sleep(0.05)
    assert not closed.is_set()  # still waiting for them
    src.gate.set()
    with trio.fail_after(5):
        await closed.wait()
    assert src.running == 0 and ra.in_flight() == [] and ra.cached_windows() == []


async def test_cancelling_the_owners_nursery_ends_read_ahead_and_reads_go_on() -> None:
    src = Source()
    src.gate = trio.Event()
    async with trio.open_nursery() as owner:
        ra = engine(src, owner)
        src.gate.set()
        await ra.read(0, W)
        src.gate = trio.Event()  # the read-ahead of windows 1, 2 waits
        await trio.sleep(0.01)
        assert ra.in_flight() == [W, 2 * W]
        owner.cancel_scope.cancel()  # the service closes
    assert ra.in_flight() == []  # ended, no error escaped into the owner's nursery
    src.gate.set()
    assert await ra.read(W, W) == DATA[W:2 * W]  # fetched on demand instead
    await ra.aclose()  # cancellation is not an error to report


async def test_a_cancelled_read_leaves_the_engine_usable(nursery: trio.Nursery) -> None:
    src = Source()
    src.gate = trio.Event()
    ra = engine(src, nursery)
    with trio.move_on_after(0.02):
        await ra.read(4 * W, 10)
    assert ra.in_flight() == []
    src.gate.set()
    assert await ra.read(4 * W, 10) == DATA[4 * W:4 * W + 10]
    await ra.aclose()


async def test_the_cache_is_bounded_and_drops_go_back_to_the_owner(
        nursery: trio.Nursery) -> None:
    src = Source()
    dropped: list[int] = []
    ra = engine(src, nursery, cached=5, on_drop=lambda b: dropped.append(len(b)))
    for off in [3 * W, 11 * W, 17 * W, 0, 8 * W, 5 * W, 14 * W, 19 * W]:  # random
        await ra.read(off + 1, 5)
        assert len(ra.cached_windows()) <= 5
    for off in range(0, SIZE, 500):  # and a stream with read-ahead
        await ra.read(off, 500)
        await trio.sleep(0)
        assert len(ra.cached_windows()) <= 5
    n = len(ra.cached_windows())
    await ra.aclose()
    assert len(dropped) == len(src.calls)  # every buffer fetched was handed back once
    assert n and ra.cached_windows() == []


async def test_concurrent_readers_cannot_evict_each_others_windows_forever(
        nursery: trio.Nursery) -> None:
    src = Source()
    ra = engine(src, nursery, ahead=1, cached=3)

    async def client(seed: int) -> None:
        for i in range(20):
            off = (seed * 7919 + i * 104729) % SIZE
            assert bytes(await ra.read_transient(off, 2 * W)) == DATA[off:off + 2 * W]
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            for seed in range(12):
                n.start_soon(client, seed)
    await ra.aclose()


async def test_a_burst_of_kernel_read_ahead_requests_is_fetched_concurrently_once(
        nursery: trio.Nursery) -> None:
    """The kernel's read-ahead on the mount sends several consecutive requests at
    once (fs/daemon.py): more than the engine caches. Each window is fetched once,
    all at the same time, and every request gets its bytes."""
    src = Source()
    src.gate = trio.Event()
    ra = engine(src, nursery, ahead=2, cached=4)
    burst = 8
    got: dict[int, bytes] = {}

    async def request(i: int) -> None:
        got[i] = bytes(await ra.read_transient(i * W, W))

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            for i in range(burst):
                n.start_soon(request, i)
                await trio.sleep(0)  # arrival order, as pyfuse3's tasks start them
            await trio.sleep(0.01)
            assert src.running == burst  # all in flight together, none waits its turn
            src.gate.set()
    assert [got[i] for i in range(burst)] == [DATA[i * W:(i + 1) * W] for i in range(burst)]
    await trio.sleep(0.01)
    starts = src.starts()
    assert len(starts) == len(set(starts))  # never fetched twice (read-ahead included)
    assert sorted(starts)[:burst] == [i * W for i in range(burst)]
    assert len(ra.cached_windows()) <= 4
    await ra.aclose()


async def test_without_a_nursery_reads_are_served_on_demand() -> None:
    src = Source()
    ra = engine(src, None)
    assert await ra.read(0, SIZE + 50) == DATA  # longer than the cache: in parts
    assert ra.stats["ahead"] == 0
    await ra.aclose()


def test_mount_readahead_option_is_retired_with_one_clear_line(tmp_path: object) -> None:
    res = subprocess.run([sys.executable, "-m", "snapfs", "mount", str(tmp_path),
                          "--readahead", "2"], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "--readahead" in res.stderr and "retired" in res.stderr
    assert "Traceback" not in res.stderr
