"""A volume is the file it was registered as.

``volume add`` (and ``volume repoint``) take a regular file or a block device
only, checked without blocking: the path is resolved (realpath) and stat'ed
before anything opens it, so a FIFO or a character device (``/dev/zero``,
``/dev/null``, a tape that rewinds on open) is never opened; the open that
follows uses ``O_NONBLOCK``. The size must be a positive multiple of 512, the
API's rule (a 1000-byte volume would export as a QCOW2 that its own import and
qemu-img reject or truncate). What is recorded is the resolved path and the
file's identity (:func:`identity_of`).

Every later open of the volume -- the probe of a new snapshot, the capture, the
read lease, the reflink clone -- goes through :func:`open_volume`: ``O_NOFOLLOW``
(the recorded path is resolved, so a symlink there now was put there since),
then an ``fstat`` of what was opened compared with the recorded identity. A
file swapped in behind the path (a symlink to ``/etc/shadow``, another file
renamed over it) fails the snapshot with a reason naming ``snapfs volume
repoint``, which re-points a volume on purpose. Volumes registered before
identities were recorded (schema v7) have none: their next snapshot records it
(trust on first use).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from ..errors import InvalidArgument, TooManyOpen, VolumeChanged
from ..procfs import SNAPFS_FSTYPE, mounts

#: The API's rule for volume and snapshot sizes.
SECTOR = 512


@dataclass(frozen=True)
class VolumeFile:
    """A registered volume's file as the captures must find it."""

    name: str  # the volume's name: refusals say which command fixes them
    path: str
    identity: str | None  # None: registered before schema v7 (trust on first use)


@dataclass(frozen=True)
class Inspected:
    """What a volume's file is, as an open of it showed."""

    path: str
    size: int
    identity: str
    uid: int
    gid: int
    mode: int  # permission bits


def identity_of(st: os.stat_result) -> str:
    """``file:<st_dev>:<st_ino>`` for a regular file; ``block:<major>:<minor>`` (its
    st_rdev) for a block device: the device it names, wherever its node is."""
    if stat.S_ISBLK(st.st_mode):
        return f"block:{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return f"file:{st.st_dev}:{st.st_ino}"


def _kind(mode: int) -> str | None:
    """What a file that may not be a volume is (None: a regular file or block device)."""
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return None
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return what
    return "not a regular file"




def snapfs_mount_of(st: os.stat_result) -> str | None:
    """The snapfs mount a file lies on, if it does. A volume there is refused: a
    mount capturing a file it serves itself waits on its own answers (a close is
    a FLUSH only it can answer) and hangs for good; and an image there is a
    snapshot already (``cp --sparse=always`` it out to make it a volume)."""
    if stat.S_ISBLK(st.st_mode):
        return None
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        for m in mounts():
            if m.device == dev:
                return m.mountpoint if m.fstype == SNAPFS_FSTYPE else None
    except OSError:
        return None
    return None


def _on_snapfs(shown: str, mount: str) -> str:
    return (f"{shown} is on the snapfs mount {mount}: an image there is a snapshot "
            "already; copy it out (cp --sparse=always) to make it a volume")


def _size(fd: int, st: os.stat_result) -> int:
    return st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(fd, 0, os.SEEK_END)


def _open_nofollow(path: str) -> int:
    # O_NONBLOCK: nothing that reaches here may block its open (a FIFO swapped in
    # after the stat); cleared below once the file is known to be a volume.
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)


def inspect_new(path: str | os.PathLike[str]) -> Inspected:
    """Check a file to register as a volume (``volume add``, ``volume repoint``);
    refusals are InvalidArgument naming the path and why. Blocking: for a
    worker thread."""
    given = os.fspath(path)
    real = os.path.realpath(given)
    shown = given if real == os.path.abspath(given) else f"{given} (= {real})"
    try:
        real.encode("utf-8")
    except UnicodeEncodeError:  # the store keeps paths as SQLite text
        raise InvalidArgument("path", f"{real!r} is not valid UTF-8: rename the file, or "
                              "link it under a UTF-8 name") from None
    try:
        before = os.lstat(real)
    except FileNotFoundError:
        raise InvalidArgument("path", f"{shown} does not exist") from None
    except OSError as exc:
        raise InvalidArgument("path", f"{shown}: {exc.strerror}") from None
    kind = _kind(before.st_mode)
    if kind is not None:
        raise InvalidArgument("path", f"{shown} is {kind}: a volume is a raw image file "
                                      "or a block device")
    mount = snapfs_mount_of(before)
    if mount is not None:
        raise InvalidArgument("path", _on_snapfs(shown, mount))
    try:
        fd = _open_nofollow(real)
    except OSError as exc:
        _no_descriptor(exc)
        raise InvalidArgument("path", f"{shown} is not readable: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if identity_of(st) != identity_of(before) or _kind(st.st_mode) is not None:
            raise InvalidArgument("path", f"{shown} changed while it was being checked")
        size = _size(fd, st)
    finally:
        os.close(fd)
    if size <= 0 or size % SECTOR:
        raise InvalidArgument("path", f"{shown} is {size} bytes: a volume's size must be "
                                      f"a positive multiple of {SECTOR}")
    return Inspected(real, size, identity_of(st), st.st_uid, st.st_gid,
                     stat.S_IMODE(st.st_mode))


def _no_descriptor(exc: OSError) -> None:
    """This process (or the system) out of descriptors is no fault of the path."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        raise TooManyOpen(f"cannot open a volume file: {exc.strerror}") from None


def open_volume(vf: VolumeFile) -> tuple[int, os.stat_result]:
    """A read-only descriptor of the volume's file and its fstat, once it is known
    to be the file registered (when an identity is recorded). Refuses with
    VolumeChanged whatever else is there now (a symlink, another file, a FIFO);
    a missing or unreadable file is InvalidArgument. Blocking: for a worker thread."""
    try:
        mount = snapfs_mount_of(os.lstat(vf.path))
    except OSError:
        mount = None  # the open below says what is wrong
    if mount is not None:  # before any open: see snapfs_mount_of
        # Not _changed(): `volume repoint` would refuse this path as well.
        raise VolumeChanged(f"volume {vf.name!r}: " + _on_snapfs(vf.path, mount)
                            + "; nothing was read")
    try:
        fd = _open_nofollow(vf.path)
    except FileNotFoundError:
        raise InvalidArgument("path", f"volume {vf.name!r}: {vf.path} does not exist") \
            from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _changed(vf, "is a symbolic link now") from None
        _no_descriptor(exc)
        raise InvalidArgument("path", f"volume {vf.name!r}: {vf.path} is not readable: "
                                      f"{exc.strerror}") from None
    try:
        st = os.fstat(fd)
        kind = _kind(st.st_mode)
        if kind is not None:
            raise _changed(vf, f"is {kind} now")
        if vf.identity is not None and identity_of(st) != vf.identity:
            raise _changed(vf, f"is another file now ({identity_of(st)}, registered as "
                               f"{vf.identity})")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def inspected(vf: VolumeFile, fd: int, st: os.stat_result) -> Inspected:
    """What the volume's file opened by open_volume is (for a new snapshot); a
    size that is no volume's now (the file was truncated to 0 or to a size no
    image format can hold) fails the snapshot, as at ``volume add``."""
    size = _size(fd, st)
    if size <= 0 or size % SECTOR:
        raise VolumeChanged(f"volume {vf.name!r}: {vf.path} is {size} bytes now: a "
                            f"volume's size must be a positive multiple of {SECTOR}; "
                            "nothing was read")
    return Inspected(vf.path, size, identity_of(st), st.st_uid, st.st_gid,
                     stat.S_IMODE(st.st_mode))


def _changed(vf: VolumeFile, what: str) -> VolumeChanged:
    return VolumeChanged(
        f"volume {vf.name!r}: {vf.path} {what}, not the file registered; nothing was "
        f"read. If that file is the volume now, run: snapfs volume repoint {vf.name} PATH")
