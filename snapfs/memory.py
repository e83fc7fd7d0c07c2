"""Memory: process-wide settings for the long-running commands (mount, serve),
and the buffers bulk bytes are read into.

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

_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas; call before worker threads start. False where
    the C library is not glibc (the setting is then simply not applied)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
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
