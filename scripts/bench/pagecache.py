"""Dropping one file's pages from the kernel page cache, for the benchmarks'
first reads: only the files named, so other work on the machine keeps its cache
(unlike ``echo 3 > /proc/sys/vm/drop_caches``)."""

from __future__ import annotations

import os
from pathlib import Path


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
