"""What every node of a mount shares: the service, the caches, the inode table,
the background nursery, and the in-memory records of transfers started here."""

from __future__ import annotations

import datetime as dt
import os
import stat as stat_mod
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import trio

from ..errors import AlreadyExists
from ..service import SnapshotService
from .catalog import DEFAULT_TTL, Catalog
from .allocation import AllocationCache
from .inodes import InodeTable
from .transfer import Target

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


@dataclass
class ImportRecord:
    """An ``imports/<name>`` file made in this mount: what was written, and the
    snapshot the import created (None until the text was written)."""

    zone: str
    project: str
    name: str
    target: Target | None = None
    snapshot_id: str | None = None
    error: str | None = None


@dataclass
class FsContext:
    svc: SnapshotService
    catalog: Catalog
    inodes: InodeTable = field(default_factory=InodeTable)
    #: Background work of the mount (read-ahead); set when the mount runs.
    nursery: trio.Nursery | None = None
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    mounted_ns: int = field(default_factory=time.time_ns)
    #: Latest export task started through this mount, by snapshot ID.
    exports: dict[str, str] = field(default_factory=dict)
    #: (zone, project, name) of the snapshot names a mkdir, rename or import is
    #: taking right now: between its check that the name is free and the service's
    #: answer (claim()).
    claimed: set[tuple[str, str, str]] = field(default_factory=set)
    #: Open image.raw files of this mount, by snapshot ID (rmdir waits for none).
    open_images: Counter[str] = field(default_factory=Counter)
    #: Imports started through this mount, by (zone, project, name).
    imports: dict[tuple[str, str, str], ImportRecord] = field(default_factory=dict)
    #: Read-ahead depth in chunks for sequential readers of image.raw (0 = off).
    readahead: int = 0
    #: Serve image.raw with direct_io, or through the page cache (the default:
    #: README design notes, measured over backup tools' whole read matrix).
    direct_io: bool = False
    #: How often a wait (open of a snapshotting image, mkdir) polls the state.
    poll_interval: float = 0.2
    #: Mode and (uid, gid) of every image.raw, instead of its volume file's (access.py).
    image_mode: int | None = None
    image_owner: tuple[int, int] | None = None
    #: Stored bytes and rendered maps of snapshots (immutable once complete).
    allocation: AllocationCache = field(default_factory=AllocationCache)

    @contextmanager
    def claim(self, zone: str, project: str, name: str, where: str) -> Iterator[None]:
        """Hold snapshot name ``name`` in the project while a mkdir, rename or import
        checks that it is free and the service takes it: two at once would both
        find it free (the service allows duplicate names, as the API does; a
        directory may not). ``where``: the path the refusal names."""
        held = (zone, project, name)
        if held in self.claimed:
            raise AlreadyExists(f"{where}: another mkdir, rename or import is taking "
                                "this name right now")
        self.claimed.add(held)
        try:
            yield
        finally:
            self.claimed.discard(held)

    @classmethod
    def create(cls, svc: SnapshotService, ttl: float = DEFAULT_TTL) -> "FsContext":
        return cls(svc=svc, catalog=Catalog(svc, ttl))
