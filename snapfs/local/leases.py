"""Knowing, exactly, that a volume file was not opened for writing since a snapshot
began: read leases.

The kernel grants a read lease (``fcntl F_SETLEASE F_RDLCK``) on a read-only
descriptor only while nobody has the file open for writing, and breaks it when
anyone opens the file for writing or truncates it: it signals the holder (SIGIO)
and holds that open() back until the holder lets go (at most
/proc/sys/fs/lease-break-time). Writing a file -- write(2), a shared mapping, a
loop device, an NFS server -- always starts with such an open. So a lease taken
before a capture starts and still unbroken at the next snapshot proves that the
file holds exactly the bytes that capture read: the next snapshot reuses its map
and reads nothing (ZFS users expect a snapshot of an idle volume to cost nothing).

Exact where it exists, and simply absent elsewhere: a block device, a file on
NFS or FUSE, a file someone already has open for writing, a service not running
in the main thread (no signal handler) -- all mean an ordinary full capture,
never a wrong one. A lease is only taken on a filesystem that holds the file's
bytes itself (LEASED_FILESYSTEMS): overlayfs grants one on its own inode, which
a write to the layer's file underneath never breaks (the merged file shows the
write, and the next snapshot reused the old map: stale bytes, ``available``);
a network or FUSE filesystem may be written by another machine or daemon.

What it costs others: a process opening a leased volume for writing waits until
this process's main thread has run the handler (0.16 ms median with an idle
loop, against 0.007 ms unleased: scripts/bench/lease.py); an open with O_NONBLOCK
fails once with EWOULDBLOCK, as with any leased file. The lease goes away with
the next write open, so this happens at most once per snapshot.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import functools
import logging
import os
import signal
import struct
import threading
from dataclasses import dataclass
from functools import partial
from types import FrameType
from typing import Any

import trio

from ..errors import SnapfsError
from .volumefile import VolumeFile, open_volume

log = logging.getLogger(__name__)

#: statfs f_type of the filesystems on which every write to a file's bytes goes
#: through its inode here (and so breaks a lease): ext2/3/4, XFS, btrfs, tmpfs,
#: ramfs, f2fs. Elsewhere (overlayfs, NFS, CIFS, FUSE, 9p, ...) no lease is taken.
LEASED_FILESYSTEMS = {0xEF53, 0x58465342, 0x9123683E, 0x01021994, 0x858458F6, 0xF2F52010}

F_SETLEASE = 1024
F_GETLEASE = 1025
F_SETOWN_EX = 15
F_OWNER_TID = 0


@dataclass(eq=False)
class Lease:
    """A read lease on one volume file, held by this process."""
    path: str
    fd: int
    dev: int
    ino: int
    size: int
    #: The snapshot (map key) whose capture started under this lease; None until
    #: such a capture has succeeded.
    base: int | None = None
    broken: bool = False


# Process-wide, as SIGIO is: every held lease by descriptor.
_held: dict[int, Lease] = {}
_previous: Any = None
_installed = False


def _release(lease: Lease) -> None:
    """Idempotent, and only ever this lease's descriptor: once a broken lease's
    descriptor is closed its number is reused by the next open, and a second
    release by number (a broken lease is forgotten by the next capture of its
    volume) closed another volume's lease -- whose kernel lease went with it,
    unnoticed, and a later lease reusing that number again made that volume's
    next snapshot copy an old map (wrong bytes, fsck clean)."""
    lease.broken = True
    if _held.get(lease.fd) is lease and _held.pop(lease.fd, None) is lease:
        os.close(lease.fd)  # closing the descriptor lets the waiting open() go on


def _on_sigio(signum: int, frame: FrameType | None) -> None:
    # Runs in the main thread between bytecodes. A lease being broken reports its
    # target type (F_UNLCK) here; mark it broken *before* letting the opener go.
    for lease in list(_held.values()):
        try:
            still = fcntl.fcntl(lease.fd, F_GETLEASE) == fcntl.F_RDLCK
        except OSError:
            still = False
        if not still:
            log.info("volume %s opened for writing: its next snapshot reads it all",
                     lease.path)
            _release(lease)
    if callable(_previous):
        _previous(signum, frame)


def _install() -> bool:
    global _installed, _previous
    if _installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    _previous = signal.signal(signal.SIGIO, _on_sigio)
    _installed = True
    return True


def _open(volume: VolumeFile) -> tuple[int, os.stat_result] | None:
    try:
        fd, st = open_volume(volume)
    except (OSError, SnapfsError):  # the capture that follows says why
        return None
    kind = filesystem_type(fd)
    if kind not in LEASED_FILESYSTEMS:
        log.debug("volume %s: no lease on this filesystem (statfs type %#x): every "
                  "snapshot reads it", volume.path, kind or 0)
        os.close(fd)
        return None
    return fd, st


def filesystem_type(fd: int) -> int | None:
    """statfs(2)'s f_type of the filesystem holding ``fd`` (the first field of
    struct statfs on Linux), None if it cannot be told."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit
    try:
        if _libc().fstatfs(fd, buf) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return int(ctypes.c_long.from_buffer(buf).value) & 0xFFFFFFFF


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


async def take(volume: VolumeFile, size: int) -> Lease | None:
    """A read lease on the volume's file (``size`` bytes; opened only if it is
    the file registered, volumefile.py), or None where there can be none (see
    the module docstring). From the main thread's trio
    loop: the signal that breaks a lease must reach the thread that can hand it
    back. (The path is looked up in a worker: a volume may sit on a slow mount.)"""
    if not _install():
        return None
    opened = await trio.to_thread.run_sync(_open, volume)
    if opened is None:
        return None
    fd, st = opened
    lease = Lease(volume.path, fd, st.st_dev, st.st_ino, size)
    _held[fd] = lease  # before F_SETLEASE: a break must find it
    try:
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)
        # The break's SIGIO goes to this (the main) thread, so that an open() of
        # the volume made by this very thread is interrupted to run the handler
        # instead of waiting out the lease-break time.
        fcntl.fcntl(fd, F_SETOWN_EX, struct.pack("ii", F_OWNER_TID, threading.get_native_id()))
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EINVAL, errno.ENOLCK, errno.EACCES):
            log.warning("cannot lease volume %s: %s", volume.path, exc)
        _release(lease)
        return None
    return lease


async def unchanged(lease: Lease, path: str, size: int) -> bool:
    """True if the file at ``path`` is still the leased one (not a symlink to it),
    of the same size, and nobody opened it for writing since the lease was taken."""
    try:
        st = await trio.to_thread.run_sync(partial(os.stat, path, follow_symlinks=False))
    except OSError:
        return False
    if lease.broken:  # checked after the await: a break may have come meanwhile
        return False
    try:
        if fcntl.fcntl(lease.fd, F_GETLEASE) != fcntl.F_RDLCK:
            return False
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (lease.dev, lease.ino) and size == lease.size


class VolumeLeases:
    """One service's leases, at most one per volume. Every lease stays in here
    across awaits, so that close() (a service closing) never misses one."""

    def __init__(self) -> None:
        self._by_volume: dict[str, Lease] = {}

    async def before_capture(self, volume_id: str, volume: VolumeFile, size: int
                             ) -> tuple[Lease | None, int | None]:
        """For a new snapshot of the volume: the lease it runs under, and the map
        key of the snapshot it may copy instead of reading (None: read it all).
        Set the lease's ``base`` once the snapshot is available."""
        lease = self._by_volume.get(volume_id)
        if lease is not None and lease.base is not None and \
                await unchanged(lease, volume.path, size):
            return lease, lease.base
        if lease is not None:
            self.forget(volume_id, lease)
        lease = await take(volume, size)  # before the capture reads a byte
        if lease is not None:
            self.forget(volume_id)  # a concurrent capture's: the newer one wins
            self._by_volume[volume_id] = lease
        return lease, None

    def forget(self, volume_id: str, lease: Lease | None = None) -> None:
        """Drop the volume's lease (only if it is still ``lease``, when given)."""
        held = self._by_volume.get(volume_id)
        if held is not None and (lease is None or held is lease):
            del self._by_volume[volume_id]
            _release(held)
        elif lease is not None:
            _release(lease)

    def close(self) -> None:
        for lease in self._by_volume.values():
            _release(lease)
        self._by_volume.clear()
