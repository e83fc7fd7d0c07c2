"""Dropping one file's pages from the kernel page cache, for the benchmarks'
first reads: only the files named, so other work on the machine keeps its cache
(unlike ``echo 3 > /proc/sys/vm/drop_caches``)."""

from __future__ import annotations

import os
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


def file_refaults() -> int:
    """Page-cache pages read back after an eviction, since boot."""
    with open("/proc/vmstat") as f:
        for line in f:
            if line.startswith("workingset_refault_file "):
                return int(line.split()[1])
    return 0


@contextmanager
def reclaim_paused(pause: bool = True) -> Iterator[None]:
    """DAMON's proactive pageout paused for the run (``pause``) and turned back on
    after; either way one line says what was found, and one at the end how many
    cached pages were read back after an eviction meanwhile. On this VM a
    kdamond pages out what its sampling (one page per region every 0.5 s) finds
    idle for a minute: 3.8 GB in the first 30 minutes after boot, 2.4 GB of them
    read back, much of it the packs and volume files the benchmarks warm and
    read. Whether a warmed file stays cached until its timed read then depends
    on how the sampling went, which no run controls."""
    states = _pageout_kdamonds()
    paused = []
    if states and pause:
        for state in states:
            try:
                state.write_text("off")
                paused.append(state)
            except OSError as exc:
                print(f"cannot pause {state.parent.name}: {exc}", flush=True)
        print(f"DAMON pageout paused for the run ({len(paused)} kdamond)", flush=True)
    elif states:
        print("DAMON pageout left on: warmed bytes may be evicted before a timed read",
              flush=True)
    before = file_refaults()
    try:
        yield
    finally:
        for state in paused:
            state.write_text("on")
        if paused:
            print("DAMON pageout turned back on", flush=True)
        print(f"page-cache refaults during the run: {file_refaults() - before}", flush=True)
