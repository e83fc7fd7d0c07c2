"""What every node of a mount shares: the service, the caches, the inode table,
and the in-memory records of transfers started here."""

from __future__ import annotations

import os
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from ..errors import AlreadyExists
from ..service import SnapshotService
from .catalog import DEFAULT_TTL, Catalog
from .allocation import AllocationCache
from .inodes import InodeTable
from .transfer import Target

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
    #: Handles open for writing: a file that started no import goes with the last.
    writers: int = 0


#: pyfuse3's request tasks at most (its default): a request beyond waits for one.
MAX_TASKS = 99
#: Of those, opens waiting for their snapshot to be made at most (the rest keep
#: answering everything else).
MAX_WAITING_OPENS = 48


@dataclass
class FsContext:
    svc: SnapshotService
    catalog: Catalog
    inodes: InodeTable = field(default_factory=InodeTable)
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
    #: Serve image.raw with direct_io, or through the page cache (the default:
    #: README design notes, measured over backup tools' whole read matrix).
    direct_io: bool = False
    #: How often a wait (open of a snapshotting image, mkdir) polls the state.
    poll_interval: float = 0.2
    #: Opens of image.raw waiting for their snapshot to be made, now.
    waiting_opens: int = 0
    #: Mode and (uid, gid) of every image.raw, instead of its volume file's (access.py).
    image_mode: int | None = None
    image_owner: tuple[int, int] | None = None
    #: A kernel session is live: stale names may be invalidated (fs/forget.py).
    notify_kernel: bool = False
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
