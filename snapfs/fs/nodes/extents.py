"""``map.json`` and ``changes/<other>`` of a snapshot: its allocated extents, and
the extents that differ from another snapshot of the same volume, in the format
of ``qemu-img map --output=json`` (see snapfs/local/extents.py). Computed from
the chunk maps, without reading data; backends that cannot know answer ENOTSUP.
``changes/`` lists nothing: ``changes/<name or ID>`` is looked up."""

from __future__ import annotations

from ...errors import NotFound, NotSupported, PreconditionFailed, ReadOnly
from ...extentmap import render
from ...logtext import esc
from ...model import Snapshot
from ..access import image_access
from ..allocation import places
from ..attributes import Stat, dir_stat, file_stat, ns
from ..context import FsContext
from ..keys import MAP, Key, Kind, View, change_file
from .base import BufferHandle, Entry, Handle, Node
from .files import FileNode, file_node, wants_write
from .views import snapshot_at


class DocumentHandle(BufferHandle):
    """A read-only document rendered at open."""

    async def apply(self, data: bytes) -> None:
        raise AssertionError("read-only")  # never reached: writes are refused at open


class ExtentsFile(FileNode):
    """A document about a complete (immutable) snapshot: rendered once, kept."""

    async def render(self) -> bytes:
        raise NotImplementedError

    async def document(self) -> bytes:
        which = self.key.name if self.key.kind is Kind.FILE else "changes/" + self.key.name
        cache = self.ctx.allocation
        doc = cache.document(self.key.snapshot, which)
        if doc is None:
            doc = await self.render()
            cache.keep(self.key.snapshot, which, doc)
        return doc

    async def stat(self) -> Stat:
        s = await self.snapshot()
        try:
            size = len(await self.document())
        except PreconditionFailed:
            # Still being captured: listed, empty, and opening says why (EBUSY).
            st = file_stat(False, 0, ns(s.creation_date), ns(s.creation_date), timeout=0)
        else:
            st = file_stat(False, size, ns(s.creation_date), ns(s.creation_date))
        st.nlink = places(s)
        # Where the data lies is the data's: readable by whom image.raw is.
        ctx = self.ctx
        st.uid, st.gid, st.mode = image_access(s, ctx.uid, ctx.gid, ctx.image_mode,
                                               ctx.image_owner)
        return st

    async def open(self, flags: int, pid: int) -> Handle:
        if wants_write(flags):
            raise ReadOnly(f"{self.describe()} is read-only")
        return DocumentHandle(self, await self.document(), False)


class MapNode(ExtentsFile):
    async def render(self) -> bytes:
        s = await self.snapshot()
        return render(await self.ctx.svc.allocated_extents(s.zone, s.id))


class ChangeNode(ExtentsFile):
    def describe(self) -> str:
        return f"changes/{self.key.name} of snapshot {self.key.snapshot}"

    async def snapshot(self, max_age: float | None = None) -> Snapshot:
        return await snapshot_at(self.ctx, self.key.parent().parent(), max_age)

    async def render(self) -> bytes:
        s = await self.snapshot()
        return render(await self.ctx.svc.changed_extents(s.zone, s.id, self.key.name))


class ChangesNode(Node):
    def describe(self) -> str:
        return f"changes/ of snapshot {self.key.snapshot}"

    async def snapshot(self) -> Snapshot:
        return await snapshot_at(self.ctx, self.key.parent())

    async def stat(self) -> Stat:
        s = await self.snapshot()
        if not self.ctx.svc.knows_allocation:
            raise NotSupported(f"snapshot {s.id}: this backend does not know which "
                               "blocks changed")
        return dir_stat(False, ns(s.creation_date), ns(s.creation_date))

    async def entries(self) -> list[Entry]:
        return []  # one entry per snapshot of the volume would be a quadratic tree

    async def lookup(self, name: str) -> Entry:
        s = await self.snapshot()
        other = await self.ctx.catalog.find_snapshot(s.zone, s.project,
                                                     View(Kind.SNAPSHOTS), name)
        if other is None:
            raise NotFound("snapshot", esc(name))
        key = change_file(self.key, other.id)
        return name, key, await ChangeNode(self.ctx, key).stat()


def snapshot_file(ctx: FsContext, key: Key) -> FileNode:
    """The node of a file in a snapshot directory: map.json here, the others in
    files.py (which this module builds on)."""
    return MapNode(ctx, key) if key.name == MAP else file_node(ctx, key)
