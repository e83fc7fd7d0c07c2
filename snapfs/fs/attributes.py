"""The attributes of a node of the mount (``Stat``, before it has an inode
number) and how directories, files and API dates become them."""

from __future__ import annotations

import datetime as dt
import stat as stat_mod
from dataclasses import dataclass

#: Reported as st_blksize of image.raw: cp/cat size their buffers from it, so
#: sequential readers reach the daemon with 1 MiB requests (one chunk each).
IMAGE_BLKSIZE = 1 << 20


@dataclass
class Stat:
    """The attributes of a node, before it has an inode number."""

    mode: int
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    blksize: int = 4096
    #: How long the kernel may keep these attributes (and the entry).
    timeout: float = 1.0
    #: Owner and group (None: the mount's owner's; image.raw: access.py).
    uid: int | None = None
    gid: int | None = None
    #: Places the node is listed in (image.raw: every view of its snapshot), and
    #: 512-byte blocks stored (None: the size's): see fs/allocation.py.
    nlink: int | None = None
    blocks: int | None = None

    @property
    def is_dir(self) -> bool:
        return stat_mod.S_ISDIR(self.mode)


def dir_stat(writable: bool, mtime_ns: int = 0, ctime_ns: int = 0,
             timeout: float = 1.0) -> Stat:
    return Stat(stat_mod.S_IFDIR | (0o755 if writable else 0o555), 0, mtime_ns, ctime_ns,
                timeout=timeout)


def file_stat(writable: bool, size: int, mtime_ns: int = 0, ctime_ns: int = 0,
              blksize: int = 4096, timeout: float = 1.0) -> Stat:
    return Stat(stat_mod.S_IFREG | (0o644 if writable else 0o444), size, mtime_ns, ctime_ns,
                blksize, timeout)


def ns(rfc3339: str | None, default: int = 0) -> int:
    """An API date as nanoseconds since the epoch (0 when absent or unparsable)."""
    if not rfc3339:
        return default
    try:
        when = dt.datetime.fromisoformat(rfc3339.replace("Z", "+00:00"))
    except ValueError:
        return default
    return int(when.timestamp() * 1_000_000_000)


def xattr_value(text: str) -> bytes:
    """An attribute's value as UTF-8. A cloud API's JSON may hold lone surrogates
    ("\\udcff" in a name) that UTF-8 cannot encode: getfattr failed with EIO and a
    "bug" log line; they are given as backslash escapes instead."""
    return text.encode("utf-8", "backslashreplace")
