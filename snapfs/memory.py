"""Memory: process-wide settings for the long-running commands (mount, serve),
the buffers bulk bytes are read into, and the one budget of the image readers
(BufferBudget, READERS): what a process caches for its open images is bounded
however many are open.

Chunk buffers (1 MiB) are allocated in many worker threads; glibc gives each
thread its own malloc arena, and freed chunk buffers stay spread over all of
them. Two arenas keep the daemon's peak RSS well inside its 200 MB budget
(measured with scripts/bench/export.py: import 215 -> 156 MiB, export 162 ->
146 MiB) for no measurable cost in time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator, Protocol

_M_ARENA_MAX = -8
_M_MMAP_THRESHOLD = -3
#: Allocations of at least this many bytes are mapped of their own, and unmapped
#: when freed (see limit_malloc_arenas).
MMAP_THRESHOLD = 2 << 20


def limit_malloc_arenas(arenas: int = 2, mmap_threshold: int = MMAP_THRESHOLD) -> bool:
    """Cap glibc's malloc arenas and fix its mmap threshold; call before worker
    threads start. False where the C library is not glibc (the settings are then
    simply not applied).

    glibc raises its mmap threshold to the size of each mapped block freed (up to
    32 MiB), so after the first 4 MiB shadow window was freed every later one came
    from the heap, where freed windows fragment and stay: a daemon reading images
    whose chunks were being stored peaked at 234 MB and idled at 112 MB after
    every file was closed. Fixed at 2 MiB (which also turns the dynamic raise
    off), the same run peaks at ~150 MB and idles at ~55 MB; chunk buffers (1 MiB)
    stay on the heap, as they were once the threshold had risen."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = [bool(libc.mallopt(_M_ARENA_MAX, arenas)),  # each, whatever the other did
                bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold))]
        return all(done)
    except (OSError, AttributeError):
        return False


def aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned, writable buffer for the kernel to copy bulk bytes into
    (chunks read from packs, GET bodies read from sockets).

    Page alignment is not cosmetic: a destination just past a page boundary --
    where malloc puts a large bytearray's bytes, page + 16 -- runs the kernel's
    copy at half speed or worse on this class of machine (4K aliasing;
    scripts/bench/alignment.py: 120-350 vs 50-70 us per MiB)."""
    return mmap.mmap(-1, size)


# --- the image readers' budget ------------------------------------------------------

#: Default bytes all image readers of a process may hold (cached windows, windows
#: in flight, spare buffers): a daemon's peak RSS must not grow with the number of
#: open files, and must stay inside its 200 MB budget. The daemon itself is ~60
#: MiB; with 128 MiB here 300 open images peaked at 187 MiB (196 MB), too close.
#: A streaming reader needs ~8 MiB of it.
READER_BYTES = 96 << 20
#: Of those, the spare (released, reusable) buffers at most: a streaming reader
#: reuses one or two, warm in the CPU cache; the rest are unmapped.
SPARE_BYTES = 8 << 20
#: A cache unused this long gives its windows to another's read-ahead (a read
#: that waits takes them from any cache, least recently used first).
IDLE_SECONDS = 1.0
#: What a capture (or import) holds while it runs: its three stages' batches of
#: 1 MiB chunks and their compressed frames (capture.py; ~38 MB of a daemon's
#: RSS for a capture of incompressible data), set aside from the readers' share
#: for its duration: most of it, so that two captures fit above READERS_FLOOR.
CAPTURE_BYTES = 32 << 20
#: The readers' share never goes below this (two streams' read-ahead): two
#: captures at once (capturequeue.RUNNING) are set aside whole.
READERS_FLOOR = 16 << 20


class Cache(Protocol):
    """A holder of budgeted windows (a reader's read-ahead engine)."""

    def shed(self) -> bool:
        """Drop the window it needs least (none a read waits for), which gives
        its bytes back to the budget (``release``, maybe ``give_spare``, nothing
        else of it); False when it has none to drop."""


class BufferBudget:
    """One process-wide bound on the bytes image readers hold, however many are
    open: every window a reader caches or fetches ahead is charged here first.

    A read that waits for its bytes gets them charged by evicting windows of
    other readers (the least recently used reader first), then its own; when
    nothing can be evicted (every window is wanted by a read in progress), its
    bytes are read uncharged, served to that read and not cached. Read-ahead is
    charged only from free room or from readers idle for IDLE_SECONDS: it is a
    bet, and must not evict what active readers are about to read. So memory is
    bounded by the budget plus what the reads in progress hold (bounded by the
    kernel's outstanding requests); with many readers only speed degrades.

    Everything runs on the trio thread (no lock): reserve/shed/release are plain
    calls, with no await in between."""

    def __init__(self, capacity: int = READER_BYTES, spare_bytes: int | None = None,
                 idle: float = IDLE_SECONDS) -> None:
        self.capacity = capacity
        self.spare_limit = min(SPARE_BYTES, capacity // 8) if spare_bytes is None \
            else spare_bytes
        #: The windows' share (the spares' is kept apart: no churn between them).
        self.limit = capacity - self.spare_limit
        self.aside = 0  # of it, set aside for other work now (set_aside)
        self.idle = idle
        self.used = 0  # bytes charged to windows (cached or being fetched)
        self._caches: OrderedDict[Cache, float] = OrderedDict()  # -> last use; LRU first
        self.last: Cache | None = None  # the one touched last
        self._spares: list[mmap.mmap] = []
        self.spare_used = 0
        #: windows evicted for another reader, reservations refused: a tuning aid
        self.stats = {"evicted": 0, "refused": 0}

    # --- caches --------------------------------------------------------------------

    def join(self, cache: Cache) -> None:
        self._caches[cache] = time.monotonic()

    @property
    def members(self) -> int:
        """Caches joined and not yet left (each open reader's one)."""
        return len(self._caches)

    def leave(self, cache: Cache) -> None:
        self._caches.pop(cache, None)
        if self.last is cache:
            self.last = None

    def touch(self, cache: Cache) -> None:
        """``cache`` was just read: the last one to be evicted from."""
        self._caches[cache] = time.monotonic()
        self._caches.move_to_end(cache)
        self.last = cache

    # --- charges -------------------------------------------------------------------

    def reserve(self, n: int, cache: Cache, urgent: bool) -> bool:
        """Charge ``n`` bytes for a window of ``cache``, evicting to make room
        (see the class); False: not charged, nothing of ``cache``'s evicted."""
        if self.used + n <= self.limit:
            self.used += n
            return True
        if n > self.limit:
            self.stats["refused"] += 1
            return False
        idle_before = time.monotonic() - self.idle
        # (Iterated as it is: shed() never joins, leaves or touches a cache.)
        for victim, last in self._caches.items():  # least recently used first
            if victim is cache:
                continue
            if not urgent and last > idle_before:
                break  # the rest were used more recently still
            while self.used + n > self.limit and victim.shed():
                self.stats["evicted"] += 1
            if self.used + n <= self.limit:
                break
        if urgent:
            while self.used + n > self.limit and cache.shed():
                pass
        if self.used + n > self.limit:
            self.stats["refused"] += 1
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used -= n
        assert self.used >= 0, "released more than was charged"

    # --- room set aside for other work ------------------------------------------------

    @contextmanager
    def set_aside(self, n: int) -> Iterator[int]:
        """``n`` bytes of the budget for other work of the process (a capture's
        buffers) while the block runs: the readers' share shrinks by as much,
        their windows shed at once (least recently used reader first; none a
        read waits for), and grows back after. Never below READERS_FLOOR: past
        it, less is set aside (yielded), rather than a capture waiting behind an
        import that may take hours; the process then holds the budget plus the
        pipelines beyond the first two."""
        n = max(0, min(n, self.capacity - self.spare_limit - READERS_FLOOR - self.aside))
        self.aside += n
        self.limit -= n
        try:
            for victim in list(self._caches):
                while self.used > self.limit and victim.shed():
                    self.stats["evicted"] += 1
                if self.used <= self.limit:
                    break
            yield n
        finally:
            self.aside -= n
            self.limit += n

    # --- spare buffers -------------------------------------------------------------

    def take_spare(self, size: int) -> mmap.mmap | None:
        """A released buffer of ``size`` bytes, the last one released first (the
        warmest in the CPU cache); None if there is none."""
        for i in range(len(self._spares) - 1, -1, -1):
            if len(self._spares[i]) == size:
                self.spare_used -= size
                return self._spares.pop(i)
        return None

    def give_spare(self, buf: mmap.mmap) -> None:
        """Keep ``buf`` for reuse if the spares' share has room; else it is let go
        (unmapped once nothing refers to it)."""
        if self.spare_used + len(buf) <= self.spare_limit:
            self._spares.append(buf)
            self.spare_used += len(buf)


#: The one budget of the process's image readers.
READERS = BufferBudget()
