"""Reflink shadows: exact change tracking for volumes on XFS and btrfs.

Before a capture reads a volume that sits on the store's own XFS or btrfs
filesystem, the volume is cloned (FICLONE) into
``<store>/shadows/<volume id>/<key>.<snapshot id>.<boot id>``: a copy that shares
every block with the volume and costs only metadata. It is of one instant even
while a VM writes (the filesystem holds writers off during the clone and flushes
their dirty pages into it), and once fsynced it is a durable copy: the snapshot is
available at once, read from its shadow (ShadowReader, image.py) while its chunks are stored
from the shadow in the background (jobs.py; schema v5). A shadow is kept while it
is a snapshot's data, and until the volume's next snapshot is stored.

Why comparing two shadows' extents is exact: a shadow is never written and
outlives the next clone, so each block it maps stays shared, and the filesystem
never writes a shared block in place -- a write to it (through write(2), a shared
mapping, a loop device, O_DIRECT alike) goes to a new block (copy on write). So a
range that maps to the same physical bytes in the previous shadow and in the new
one holds the same bytes in both, and the previous snapshot's map entries for it
are reused; only the other chunks are read. Extents without a stable physical
place (delayed allocation, inline, encoded or compressed, unknown) count as
changed; a size change means a full read; a shadow from another boot is not used
(one full read after a reboot: a crash may have lost writes it saw).

Where no clone is possible (ext4, a block device, a volume on another filesystem
than the store) a capture reads the volume itself, as before.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Collection


from ..errors import SnapfsError
from .chunks import fsync_dir, libc
from .volumefile import VolumeFile, open_volume

log = logging.getLogger(__name__)

FICLONE = 0x40049409
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800
#: Extents whose physical address does not name stable bytes on the device:
#: UNKNOWN, DELALLOC, ENCODED, DATA_ENCRYPTED, NOT_ALIGNED, DATA_INLINE, DATA_TAIL.
UNTRUSTED = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400
#: statfs f_type of the filesystems whose clones are known to behave as above.
XFS_MAGIC, BTRFS_MAGIC = 0x58465342, 0x9123683E

_HEADER = struct.Struct("=QQIIII")  # struct fiemap
_EXTENT = struct.Struct("=QQQQQIIII")  # struct fiemap_extent
_BATCH = 512
#: Chunk index ranges, first..last inclusive, sorted and disjoint.
Ranges = list[tuple[int, int]]


@dataclass(frozen=True)
class Extent:
    logical: int
    physical: int
    length: int
    flags: int


def fiemap(fd: int, size: int) -> list[Extent]:
    """The file's extents over [0, size), after flushing its dirty pages
    (FIEMAP_FLAG_SYNC: delayed allocations get their final place first)."""
    out: list[Extent] = []
    start = 0
    while start < size:
        buf = bytearray(_HEADER.size + _BATCH * _EXTENT.size)
        _HEADER.pack_into(buf, 0, start, size - start, FIEMAP_FLAG_SYNC, 0, _BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        mapped = _HEADER.unpack_from(buf)[3]
        if not mapped:
            break
        for i in range(mapped):
            logical, physical, length, _, _, flags, *_ = _EXTENT.unpack_from(
                buf, _HEADER.size + i * _EXTENT.size)
            out.append(Extent(logical, physical, length, flags))
        if out[-1].flags & FIEMAP_EXTENT_LAST:
            break
        start = out[-1].logical + out[-1].length
    return out


def _merge(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for first, last in sorted(ranges):
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return out


def changed_chunks(old: list[Extent], new: list[Extent], size: int, chunk: int) -> Ranges:
    """Chunks of ``chunk`` bytes (over ``size`` bytes) that may differ between two
    files of one filesystem, given their extents: a chunk is unchanged only if each
    of its bytes is a hole in both, or maps to the same physical byte in both
    through trusted extents of the same written/unwritten state."""
    cuts = {0, size}
    for e in old + new:
        cuts.update(x for x in (e.logical, e.logical + e.length) if 0 < x < size)
    edges = sorted(cuts)
    olds, news = sorted(old, key=lambda e: e.logical), sorted(new, key=lambda e: e.logical)
    io = inew = 0
    changed: Ranges = []

    def at(extents: list[Extent], i: int, pos: int) -> tuple[int, tuple[int, int] | None | bool]:
        """(cursor, place): None for a hole, False for untrusted, else (byte, state)."""
        while i < len(extents) and extents[i].logical + extents[i].length <= pos:
            i += 1
        if i == len(extents) or extents[i].logical > pos:
            return i, None
        e = extents[i]
        if e.flags & UNTRUSTED:
            return i, False
        return i, (e.physical + pos - e.logical, e.flags & FIEMAP_EXTENT_UNWRITTEN)

    for a, b in zip(edges, edges[1:]):
        io, p_old = at(olds, io, a)
        inew, p_new = at(news, inew, a)
        if p_old is False or p_new is False or p_old != p_new:
            changed.append((a // chunk, (b - 1) // chunk))
    return _merge(changed)


def complement(ranges: Ranges, count: int) -> Ranges:
    """The chunk ranges of 0..count-1 not in ``ranges``."""
    out: Ranges = []
    nxt = 0
    for first, last in ranges:
        if first > nxt:
            out.append((nxt, first - 1))
        nxt = max(nxt, last + 1)
    if nxt < count:
        out.append((nxt, count - 1))
    return out


def in_ranges(ranges: Ranges, idx: int) -> int | None:
    """The first chunk index >= idx inside ``ranges``, or None."""
    i = bisect.bisect_right(ranges, (idx, 1 << 62)) - 1
    if i >= 0 and ranges[i][0] <= idx <= ranges[i][1]:
        return idx
    return ranges[i + 1][0] if i + 1 < len(ranges) else None


def _fs_type(fd: int) -> int:
    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type comes first
    if libc.fstatfs(fd, buf) != 0:
        return 0
    return int.from_bytes(buf.raw[:8], "little")


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")


@dataclass(frozen=True)
class Shadow:
    path: Path
    key: int  # the map key of the snapshot captured from it
    snapshot_id: str


class Shadows:
    """The store's shadows. Synchronous (clone, fiemap, unlink): for worker threads."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.boot = _boot_id()

    def _dir(self, volume_id: str) -> Path:
        return self.root / volume_id

    def possible(self, fd: int, st: os.stat_result) -> bool:
        """Whether the volume open as ``fd`` is a file on the store's own XFS or
        btrfs filesystem (its captures then go through shadows)."""
        try:
            return (stat.S_ISREG(st.st_mode) and _fs_type(fd) in (XFS_MAGIC, BTRFS_MAGIC)
                    and st.st_dev == os.stat(self.root.parent).st_dev)
        except OSError:
            return False

    def clone(self, volume_id: str, key: int, snapshot_id: str, volume: VolumeFile,
              size: int) -> Shadow | None:
        """A durable clone of ``volume`` (at least ``size`` bytes) for the capture of
        snapshot ``key``, or None where there can be none (the capture then reads
        the volume, and says so if it is not the file registered)."""
        try:
            src, _ = open_volume(volume)
        except (OSError, SnapfsError):
            return None
        path = self._dir(volume_id) / f"{key}.{snapshot_id}.{self.boot}"
        try:
            if _fs_type(src) not in (XFS_MAGIC, BTRFS_MAGIC):
                return None
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            dst = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)
            try:
                fcntl.ioctl(dst, FICLONE, src)
                if os.fstat(dst).st_size < size:  # shrunk meanwhile: the capture says so
                    raise OSError(errno.EINVAL, "volume shrank")
                os.fsync(dst)  # the clone and the bytes it shares, before anyone trusts it
            finally:
                os.close(dst)
            fsync_dir(path.parent)
            return Shadow(path, key, snapshot_id)
        except OSError as exc:
            with contextlib.suppress(OSError):  # ENOTDIR: its directory could not be made
                path.unlink(missing_ok=True)
            if exc.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY):
                log.warning("cannot clone volume %s (its snapshot reads it): %s", volume.path,
                            exc)
            return None
        finally:
            os.close(src)

    def all(self) -> dict[str, list[tuple[Shadow, str]]]:
        """Every shadow with its boot id, by volume id, oldest first."""
        out: dict[str, list[tuple[Shadow, str]]] = {}
        if not self.root.is_dir():
            return out
        for vdir in self.root.iterdir():
            found = []
            for p in vdir.iterdir():
                parts = p.name.split(".")
                if len(parts) == 3 and parts[0].isascii() and parts[0].isdigit():
                    found.append((Shadow(p, int(parts[0]), parts[1]), parts[2]))
                # else: not a shadow's name; never deleted (fsck reports it)
            out[vdir.name] = sorted(found, key=lambda s: s[0].key)
        return out

    def of_volume(self, volume_id: str) -> list[Shadow]:
        """The volume's shadows from this boot, oldest first."""
        return [s for s, boot in self.all().get(volume_id, []) if boot == self.boot]

    def changed(self, old: Shadow, new: Shadow, size: int, chunk: int) -> Ranges | None:
        """The chunks of ``new`` that may differ from ``old`` (None: compare nothing,
        read everything)."""
        fds: list[int] = []
        try:
            for s in (old, new):
                fds.append(os.open(s.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))
            if any(os.fstat(fd).st_size != size for fd in fds):
                return None
            return changed_chunks(fiemap(fds[0], size), fiemap(fds[1], size), size, chunk)
        except FileNotFoundError as exc:  # its snapshot deleted meanwhile (any process)
            log.info("shadow %s is gone (its snapshot was deleted): %s read whole",
                     exc.filename, new.path)
            return None
        except OSError as exc:
            log.warning("cannot compare shadows %s and %s: %s", old.path, new.path, exc)
            return None
        finally:
            for fd in fds:
                os.close(fd)

    def drop(self, shadow: Shadow) -> None:
        shadow.path.unlink(missing_ok=True)

    def name(self, shadow: Shadow) -> str:
        """How the metadata names it (schema v5): relative to the shadows root."""
        return str(shadow.path.relative_to(self.root))

    def named(self, name: str, key: int, snapshot_id: str) -> Shadow:
        return Shadow(self.root / name, key, snapshot_id)

    def drop_older(self, volume_id: str, key: int, keep: set[int],
                   known: Collection[tuple[int, str]] | None = None) -> None:
        """After the capture of ``key`` is stored: the volume's earlier shadows, but
        those in ``keep`` (the data of snapshots not stored yet) and, given
        ``known`` (the metadata's (map key, id) pairs), those of unknown snapshots."""
        for s, _ in self.all().get(volume_id, []):
            if s.key < key and s.key not in keep and _accounted(s, known):
                self.drop(s)

    def drop_snapshot(self, snapshot_id: str) -> None:
        """A deleted snapshot's shadow: it pins blocks the volume rewrote since."""
        for shadows in self.all().values():
            for s, _ in shadows:
                if s.snapshot_id == snapshot_id:
                    self.drop(s)

    def drop_volume(self, volume_id: str, keep: Collection[int] = (),
                    known: Collection[tuple[int, str]] | None = None) -> None:
        """A removed volume's shadows, but those in ``keep`` (the data of snapshots
        not stored yet: snapshots outlive their volume) and, given ``known``, those
        of snapshots the metadata does not know."""
        for s, _ in self.all().get(volume_id, []):
            if s.key not in keep and _accounted(s, known):
                self.drop(s)
        try:
            self._dir(volume_id).rmdir()
        except OSError:
            pass

    def tidy(self, usable: dict[int, str], backing: set[int],
             known: Collection[tuple[int, str]]) -> None:
        """At an exclusive open: keep the shadows that are still snapshots' data
        (map keys in ``backing``, whatever their boot) and each volume's newest
        shadow of this boot whose snapshot (map key -> volume id in ``usable``) is
        available; drop the rest -- but only the shadows of snapshots the metadata
        knows ((map key, id) in ``known``): one of a snapshot it does not know is
        kept (fsck reports it), as the metadata may be what is wrong."""
        for volume_id, shadows in self.all().items():
            newest = [s for s, boot in shadows
                      if boot == self.boot and usable.get(s.key) == volume_id]
            kept = 0
            for s, _ in shadows:
                if s.key in backing or (newest and s is newest[-1]):
                    kept += 1
                elif not _accounted(s, known):
                    log.warning("shadow %s: no snapshot of the metadata is its; left in "
                                "place ('snapfs fsck --repair' moves it to lost+found)",
                                s.path)
                    kept += 1
                else:
                    self.drop(s)
            if not kept:
                self.drop_volume(volume_id, (), known)


def _accounted(s: Shadow, known: Collection[tuple[int, str]] | None) -> bool:
    """Whether the metadata knows the shadow's snapshot (None: not asked): only
    then may the shadow be dropped, never because no row refers to it."""
    return known is None or (s.key, s.snapshot_id) in known
