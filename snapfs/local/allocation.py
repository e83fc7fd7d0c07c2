"""Where a stored snapshot holds data: what an export walks instead of the
address space (a 64 TiB volume with 1 GiB of data costs the 1 GiB).

The chunk map (absent entries are holes) answers for stored snapshots, the
file's own holes (SEEK_DATA/SEEK_HOLE) for one still read from its shadow.
"""

from __future__ import annotations

import errno
import os


def seek_data(fd: int, offset: int, size: int) -> int:
    """The first offset >= ``offset`` of ``fd`` that may hold data (``size`` when
    none). A filesystem without SEEK_DATA: everything may."""
    if offset >= size:
        return size
    try:
        return min(size, os.lseek(fd, offset, os.SEEK_DATA))
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # nothing but holes from offset on
            return size
        if exc.errno == errno.EINVAL:  # no SEEK_DATA here
            return offset
        raise


def seek_hole(fd: int, offset: int, size: int) -> int:
    """The first offset >= ``offset`` of ``fd`` in a hole (``size`` when none,
    or on a filesystem without SEEK_HOLE)."""
    if offset >= size:
        return size
    try:
        return min(size, os.lseek(fd, offset, os.SEEK_HOLE))
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.EINVAL):
            return size
        raise


def data_bytes(fd: int, size: int) -> int:
    """Bytes of ``fd``'s first ``size`` bytes not in holes (one lseek pair per
    extent: a sparse file costs its extents, not its size)."""
    total, pos = 0, 0
    while pos < size:
        start = seek_data(fd, pos, size)
        if start >= size:
            break
        try:
            end = min(size, os.lseek(fd, start, os.SEEK_HOLE))
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            end = size
        total += end - start
        pos = end
    return total
