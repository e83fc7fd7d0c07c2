"""Dropping one file's pages from the kernel page cache, for the benchmarks'
first reads: only the files named, so other work on the machine keeps its cache
(unlike ``echo 3 > /proc/sys/vm/drop_caches``)."""

from __future__ import annotations

import argparse
import mmap
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def evict(path: Path, *, write_back: bool = False) -> None:
    """Drop ``path``'s cached pages. Dirty pages stay unless ``write_back``
    (fsync first): a file just written needs it, a read-only one cannot."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if write_back:
            os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


#: DAMON's sysfs interface: a VM (firecracker here) may run a kdamond whose scheme
#: pages out memory idle for about a minute, page cache included.
KDAMONDS = Path("/sys/kernel/mm/damon/admin/kdamonds")
#: Free page reporting (virtio-balloon): free blocks of this order and up are
#: handed back to the host, which must fault them in again when they are reused.
REPORTING_ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")


def _pageout_kdamonds() -> list[Path]:
    """The running kdamonds with a ``pageout`` scheme."""
    found = []
    for state in KDAMONDS.glob("*/state"):
        try:
            if state.read_text().strip() != "on":
                continue
            actions = {a.read_text().strip()
                       for a in state.parent.glob("contexts/*/schemes/*/action")}
        except OSError:
            continue
        if "pageout" in actions:
            found.append(state)
    return found


def _above_max_order() -> int:
    """An order no free block reaches (one above the buddy allocator's largest)."""
    with open("/proc/buddyinfo") as f:
        return max(len(line.split()) - 4 for line in f)


#: Free memory left unbacked by back_free_memory(), and the most it backs.
HEADROOM = 2 << 30
BACK_AT_MOST = 16 << 30


def back_free_memory() -> tuple[int, float]:
    """Have the host back the guest's free memory again (touch it all once, then
    free it), with reporting held off so that it stays backed: (bytes, seconds).

    Pausing reporting does not bring back what was reported before it: the first
    round of a run still paid for every page it allocated. cloud_read.py's first
    round took 4.4-5.5 s (daemon 4.0-5.2 CPU-s, most of it kernel time in the
    FUSE reply filling fresh page-cache pages) against 1.6-2.2 s for the next
    rounds; with 8 GiB backed first by hand, 1.75 s and 1.77 s (daemon 1.16 and
    1.11 CPU-s). Touching 8 GiB took 26 s the first time and 6.5 s the next (by
    hand; each run prints its own time)."""
    with open("/proc/meminfo") as f:
        free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemFree:"))
    n = min(BACK_AT_MOST, free - HEADROOM) // mmap.PAGESIZE * mmap.PAGESIZE
    if n <= 0:
        return 0, 0.0
    t = time.perf_counter()
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    m.close()
    return n, time.perf_counter() - t


def file_refaults() -> int:
    """Page-cache pages read back after an eviction, since boot."""
    with open("/proc/vmstat") as f:
        for line in f:
            if line.startswith("workingset_refault_file "):
                return int(line.split()[1])
    return 0


def add_reclaim_option(parser: argparse.ArgumentParser) -> None:
    """``--leave-reclaim``: the one flag every benchmark's ``__main__`` reads
    (``reclaim_paused("--leave-reclaim" not in sys.argv)``, before parsing)."""
    parser.add_argument("--leave-reclaim", action="store_true",
                        help="leave the VM's memory reclaim on (default: held off for "
                             "the run: DAMON pageout, free page reporting; pagecache.py)")


@contextmanager
def reclaim_paused(pause: bool = True) -> Iterator[None]:
    """The VM's memory reclaim held off for the run (``pause``) and restored after:
    DAMON's proactive pageout, and free page reporting. One line says what was
    found; one at the end how many cached pages were read back after an eviction.

    Measured on this VM (kernel 6.18, 2 cores): a kdamond pages out cache its
    sampling finds idle for a minute (3.8 GB in the first 30 minutes after boot),
    and every free 2 MiB block is reported to the host at once (145 GB in the
    first hour), so the pages a page-cache read allocates must be faulted in by
    the host again: the same `dd bs=1M` first read of a 2 GiB image.raw took
    0.59-2.62 s (5 of 22 reads over 0.9 s, kernel time 0.9-3.0 s) with reporting
    on and 0.57-0.63 s in 8 of 8 with it off. Direct I/O allocates no pages, so
    reporting weighed on one side of every page cache vs direct I/O figure. The
    free memory reported before the pause is backed again first
    (back_free_memory)."""
    paused: list[tuple[Path, str]] = []
    if pause:
        for state in _pageout_kdamonds():
            try:
                state.write_text("off")
                paused.append((state, "on"))
            except OSError as exc:
                print(f"cannot pause {state.parent.name}: {exc}", flush=True)
        try:
            order = REPORTING_ORDER.read_text().strip()
            off = str(_above_max_order())
            if order != off:
                REPORTING_ORDER.write_text(off)
                paused.append((REPORTING_ORDER, order))
        except OSError:
            pass  # no free page reporting here (or not ours to change)
        if paused:
            print("held off for the run: "
                  + ", ".join("DAMON pageout" if p.name == "state" else "free page reporting"
                              for p, _ in paused), flush=True)
        if any(p == REPORTING_ORDER for p, _ in paused):
            n, took = back_free_memory()
            print(f"free memory backed by the host again: {n / (1 << 30):.1f} GiB in "
                  f"{took:.1f} s", flush=True)
    else:
        print("memory reclaim left as it is (--leave-reclaim)", flush=True)
    before = file_refaults()
    try:
        yield
    finally:
        for path, value in paused:
            try:
                path.write_text(value)
            except OSError as exc:  # said, not raised: the run's own outcome stands
                print(f"could not restore {path} to {value}: {exc}", flush=True)
        if paused:
            print("memory reclaim restored", flush=True)
        print(f"page-cache refaults during the run: {file_refaults() - before}", flush=True)
