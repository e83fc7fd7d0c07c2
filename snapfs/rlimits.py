"""The process's limit on open descriptors.

Every open ``image.raw`` of the local store holds a descriptor or two (its
reader lock; its shadow's file while its chunks are stored), and every pack read
keeps one. Under the soft limit a login shell or a service manager gives (1024),
a user holding ~1000 images open made the next pack open fail: reads of files
already open answered EIO, and captures failed as "not readable". So the mount
and ``serve`` raise the soft limit to the hard one, as Go's runtime and most
servers do (nothing here uses select(2) past descriptor 1024), and the local
store refuses an open of an image that would leave too few descriptors for its
own files (``images_allowed``): EMFILE at open, never EIO after it.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

#: Descriptors an open image holds at most: its reader lock and its shadow.
PER_IMAGE = 2
#: Descriptors kept for the rest of the process: SQLite, sockets, the log, FUSE,
#: worker threads' files, and packs beyond those already open.
KEPT = 256


def raise_open_files_limit() -> int:
    """The soft limit raised to the hard one (at most the kernel's nr_open);
    returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard
    if want == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open", "rb") as f:
                want = int(f.read())
        except (OSError, ValueError):
            return soft
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return want
        except (OSError, ValueError) as exc:
            log.warning("the limit on open files stays %d (raising it to %d failed: %s)",
                        soft, want, exc)
    return soft


def images_allowed(other_descriptors: int) -> int:
    """How many images may be open at once beside ``other_descriptors`` the
    process keeps open anyway (packs), under the current soft limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(0, (soft - KEPT - other_descriptors) // PER_IMAGE)
