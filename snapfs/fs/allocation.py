"""What backup tools need of the tree besides bytes: how much of an image is
stored (st_blocks, so cp, tar --sparse, rsync and du see its holes), how many
places list a snapshot (st_nlink, so du counts it once), and the rendered
``map.json``/``changes/<other>`` documents, and where lseek's SEEK_DATA and
SEEK_HOLE land (so cp, tar --sparse and qemu-img skip holes without reading them).

A complete snapshot never changes its bytes, so its stored size and documents
are kept for the mount's life (documents: a few, most recently used).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Awaitable, Callable

from ..errors import InvalidArgument, NoMoreData
from ..lru import LRUDict
from ..model import Snapshot

if TYPE_CHECKING:
    from .context import FsContext

#: Rendered documents kept (a million-extent map is tens of MB).
DOCUMENTS = 8


class AllocationCache:
    def __init__(self) -> None:
        self.stored: dict[str, int] = {}
        self._docs: LRUDict[tuple[str, str], bytes] = LRUDict(DOCUMENTS)

    def document(self, snapshot_id: str, which: str) -> bytes | None:
        return self._docs.get((snapshot_id, which))

    def keep(self, snapshot_id: str, which: str, doc: bytes) -> None:
        self._docs[(snapshot_id, which)] = doc

    def forget(self, snapshot_id: str) -> None:
        self.stored.pop(snapshot_id, None)
        for k in [k for k in self._docs if k[0] == snapshot_id]:
            del self._docs[k]


def places(s: Snapshot) -> int:
    """The directories listing snapshot ``s``: snapshots/, volumes/<its volume>/
    and tags/<t>/ for each tag -- st_nlink of its files (one inode in all)."""
    return 1 + (1 if s.base_volume is not None else 0) + len(set(s.tags))


async def image_blocks(ctx: "FsContext", s: Snapshot) -> int | None:
    """st_blocks of ``s``'s image.raw: its stored bytes in 512-byte units (None:
    not known, so the size's). Asked once per snapshot and mount."""
    cache = ctx.allocation
    stored = cache.stored.get(s.id)
    if stored is None:
        stored = await ctx.svc.stored_bytes(s.zone, s.id)
        if stored is None:
            return None
        cache.stored[s.id] = stored
    return (stored + 511) // 512


async def seek(offset: int, whence: int, size: int,
               next_data: Callable[[int], Awaitable[int]],
               next_hole: Callable[[int], Awaitable[int]]) -> int:
    """lseek(2)'s SEEK_DATA / SEEK_HOLE from ``offset`` in a file of ``size``
    bytes, given where data and holes start from an offset (each ``size`` when
    none follows; the end counts as a hole). The kernel answers other seeks."""
    if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
        raise InvalidArgument("whence", f"{whence} is neither SEEK_DATA nor SEEK_HOLE")
    if not 0 <= offset < size:
        raise NoMoreData(f"offset {offset} is not before the end ({size})")
    found = await (next_data if whence == os.SEEK_DATA else next_hole)(offset)
    if whence == os.SEEK_DATA and found >= size:
        raise NoMoreData(f"only holes from {offset} to the end ({size})")
    return min(max(found, offset), size)
