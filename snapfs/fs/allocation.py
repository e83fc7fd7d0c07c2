"""What backup tools need of the tree besides bytes: how much of an image is
stored (st_blocks, so cp, tar --sparse, rsync and du see its holes), how many
places list a snapshot (st_nlink, so du counts it once), and the rendered
``map.json``/``changes/<other>`` documents.

A complete snapshot never changes its bytes, so its stored size and documents
are kept for the mount's life (documents: a few, most recently used).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from ..model import Snapshot

if TYPE_CHECKING:
    from .context import FsContext

#: Rendered documents kept (a million-extent map is tens of MB).
DOCUMENTS = 8


class AllocationCache:
    def __init__(self) -> None:
        self.stored: dict[str, int] = {}
        self._docs: OrderedDict[tuple[str, str], bytes] = OrderedDict()

    def document(self, snapshot_id: str, which: str) -> bytes | None:
        doc = self._docs.get((snapshot_id, which))
        if doc is not None:
            self._docs.move_to_end((snapshot_id, which))
        return doc

    def keep(self, snapshot_id: str, which: str, doc: bytes) -> None:
        self._docs[(snapshot_id, which)] = doc
        self._docs.move_to_end((snapshot_id, which))
        while len(self._docs) > DOCUMENTS:
            self._docs.popitem(last=False)

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
