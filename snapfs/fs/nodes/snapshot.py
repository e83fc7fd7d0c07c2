"""A snapshot's directory: its files, and its properties as extended attributes
(``user.name`` and ``user.tags`` writable = Update; the rest read-only)."""

from __future__ import annotations

import logging

from ...errors import NotFound, NotPermitted
from ...logtext import esc
from ...model import Snapshot, check_name, check_tags
from ..forget import forget_names
from ..keys import (ALLOCATION_ENTRIES, CHANGES_DIR, SNAPSHOT_FILES, Key, Kind,
                    static_child)
from ..attributes import Stat
from .base import Entry, Node
from .extents import ChangesNode, snapshot_file
from .views import snapshot_at, snapshot_stat

log = logging.getLogger(__name__)

#: How old the snapshot behind its extended attributes may be, in seconds.
XATTR_MAX_AGE = 0.25


def snapshot_xattrs(s: Snapshot) -> dict[str, str]:
    # A cloud snapshot also says which API owns it, and what only that API has.
    api = {"api": s.api, **dict(s.api_xattrs)} if s.api else {}
    return api | {
        "id": s.id, "name": s.name, "tags": ",".join(s.tags), "state": s.state,
        "size": str(s.size), "volume_type": s.volume_type,
        "base_volume_id": s.base_volume.id if s.base_volume else "",
        "base_volume_name": s.base_volume.name if s.base_volume else "",
        "organization": s.organization, "project": s.project, "zone": s.zone,
        "creation_date": s.creation_date, "modification_date": s.modification_date,
        "error_reason": s.error_reason or "", "progress": str(s.progress),
        "warning": s.warning or "",
    }


def parse_tags(value: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]`` in that order; the empty string clears them."""
    return [] if value == "" else value.split(",")


class SnapshotNode(Node):
    writable_xattrs = frozenset({"name", "tags"})

    def describe(self) -> str:
        return f"snapshot {self.key.snapshot}"

    async def snapshot(self, max_age: float | None = None) -> Snapshot:
        return await snapshot_at(self.ctx, self.key, max_age)

    async def stat(self) -> Stat:
        return snapshot_stat(await self.snapshot())

    def _child(self, key: Key) -> Node:
        return ChangesNode(self.ctx, key) if key.kind is Kind.CHANGES else \
            snapshot_file(self.ctx, key)

    async def entries(self) -> list[Entry]:
        out = []
        for name in (*SNAPSHOT_FILES, CHANGES_DIR):
            if name in ALLOCATION_ENTRIES and not self.ctx.svc.knows_allocation:
                continue  # the backend cannot know: looked up, they answer ENOTSUP
            key = static_child(self.key, name)
            assert key is not None
            out.append((name, key, await self._child(key).stat()))
        return out

    async def lookup(self, name: str) -> Entry:
        key = static_child(self.key, name)
        if key is None:
            await self.snapshot()  # a gone snapshot answers ENOENT for itself first
            raise NotFound("file", name)
        return name, key, await self._child(key).stat()

    async def xattrs(self) -> dict[str, str]:
        # Fresher than listings: user.state and user.progress are what `snapfs wait`
        # and scripts poll; a burst (getfattr -d) still costs one Get.
        return snapshot_xattrs(await self.snapshot(max_age=XATTR_MAX_AGE))

    async def setxattr(self, name: str, value: str) -> None:
        if name not in self.writable_xattrs:
            await self._refuse_xattr(name)
        # The rules are checked here too, whichever backend is behind the mount.
        if name == "name":
            check_name(value, "user.name")
        else:
            check_tags(parse_tags(value))
        snap = await self.snapshot(max_age=0)
        if name == "name":
            updated = await self.ctx.svc.update_snapshot(snap.zone, snap.id, name=value)
        else:
            updated = await self.ctx.svc.update_snapshot(snap.zone, snap.id,
                                                         tags=parse_tags(value))
        self._changed(updated)
        forget_names(self.ctx, snap, updated)
        log.info("setfattr user.%s on snapshot %s: set to %s", name, snap.id, esc(value))

    async def removexattr(self, name: str) -> None:
        if name != "tags":
            if name == "name":
                raise NotPermitted("user.name cannot be removed: a snapshot always has a name")
            await self._refuse_xattr(name, removing=True)
        snap = await self.snapshot(max_age=0)
        updated = await self.ctx.svc.update_snapshot(snap.zone, snap.id, tags=[])
        self._changed(updated)
        forget_names(self.ctx, snap, updated)
        log.info("setfattr -x user.tags on snapshot %s: tags removed", snap.id)

    def _changed(self, snap: Snapshot) -> None:
        self.ctx.catalog.invalidate()
        self.ctx.catalog.remember(snap)

