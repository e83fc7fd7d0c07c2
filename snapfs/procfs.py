"""/proc read safely. A mount point's path and a process's name are chosen by
users and may hold bytes that are not UTF-8 (or spaces, escaped as ``\\040``):
read as text, one such mount anywhere on the machine made every ``snapfs
mount`` fail with a traceback. So /proc is read as bytes, octal escapes are
undone, and paths are decoded as file names are (os.fsdecode)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Iterator

_OCTAL = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    device: str  # "major:minor", as st_dev gives it
    mountpoint: str  # as a path: os.fsdecode'd, escapes undone
    fstype: str


def unescape(field: bytes) -> bytes:
    """A /proc/self/mountinfo field with its octal escapes (space, tab, newline,
    backslash) undone."""
    return _OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), field)


def mounts() -> Iterator[MountEntry]:
    """The mounts of this process's namespace, in /proc/self/mountinfo's order."""
    with open("/proc/self/mountinfo", "rb") as f:
        data = f.read()
    for line in data.splitlines():
        left, sep, right = line.partition(b" - ")
        fields, tail = left.split(), right.split()
        if sep and len(fields) > 4 and tail:
            yield MountEntry(fields[2].decode("ascii", "replace"),
                             os.fsdecode(unescape(fields[4])), os.fsdecode(tail[0]))


#: The filesystem type mountinfo shows for a snapfs mount.
SNAPFS_FSTYPE = "fuse.snapfs"


def mount_at(path: str | os.PathLike[str]) -> MountEntry | None:
    """The mount on ``path`` (the topmost, if several are stacked there)."""
    target = os.path.realpath(path)
    found = None
    for m in mounts():
        if m.mountpoint == target:
            found = m
    return found


def is_mounted(path: str | os.PathLike[str]) -> bool:
    return mount_at(path) is not None


def mount_device(mountpoint: str) -> str | None:
    """The device number ("0:45") of the last mount on ``mountpoint``."""
    dev = None
    for m in mounts():
        if m.mountpoint == mountpoint:
            dev = m.device
    return dev


def read_text(path: str) -> str:
    """A /proc file as text whatever bytes a process name put in it."""
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "surrogateescape")
