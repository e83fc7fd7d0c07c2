"""Directories whose entries are snapshots: ``snapshots/``, ``volumes/<volume>/``
and ``tags/<tag>/``. mkdir (in a volume's directory only) creates a snapshot,
rmdir deletes one, a rename within the directory changes its name."""

from __future__ import annotations

import logging
from typing import ContextManager

import trio

from ...errors import AlreadyExists, NotFound, NotPermitted, PreconditionFailed
from ...logtext import esc
from ...model import Snapshot, check_name
from ..attributes import Stat, dir_stat, ns
from ..context import FsContext
from ..forget import forget_names
from ..keys import Key, Kind, View, may_create_snapshot_in, same_place, snapshot_dir
from .base import Entry, Node
from .hierarchy import (ProjectNode, section_stat, tag_stat, tag_times, volume_stat,
                        volume_xattrs)

log = logging.getLogger(__name__)

#: Seconds rmdir waits for the RELEASE of an image.raw closed just before.
RELEASE_GRACE = 1.0


def snapshot_stat(s: Snapshot) -> Stat:
    # Writable: its name and tags change through rename and setfattr.
    return dir_stat(True, ns(s.modification_date), ns(s.creation_date))


class ViewNode(Node):
    @property
    def view(self) -> View:
        assert self.key.view is not None
        return self.key.view

    def describe(self) -> str:
        if self.key.kind is Kind.VOLUME:
            return f"volumes/{self.view.arg}/"
        if self.key.kind is Kind.TAG:
            return f"tags/{esc(self.view.arg)}/"
        return "snapshots/"

    async def stat(self) -> Stat:
        if self.key.kind is Kind.VOLUME:
            vol = await self.ctx.catalog.volume(self.key.zone, self.key.project, self.view.arg)
            return volume_stat(vol)
        if self.key.kind is Kind.TAG:
            times = await tag_times(self.ctx, self.key.zone, self.key.project)
            return tag_stat(times.get(self.view.arg, 0))
        return section_stat(self.key, await ProjectNode(self.ctx, self.key.parent()).stat())

    async def xattrs(self) -> dict[str, str]:
        if self.key.kind is Kind.VOLUME:
            return volume_xattrs(await self.ctx.catalog.volume(
                self.key.zone, self.key.project, self.view.arg))
        if self.key.kind is Kind.TAG:
            return {"name": self.view.arg}
        return {}

    async def entries(self) -> list[Entry]:
        listing = await self.ctx.catalog.snapshots(self.key.zone, self.key.project, self.view)
        return [(label, snapshot_dir(self.key, s.id), snapshot_stat(s))
                for label, s in listing.by_label.items()]

    async def find(self, name: str) -> Snapshot:
        snap = await self.ctx.catalog.find_snapshot(self.key.zone, self.key.project,
                                                    self.view, name)
        if snap is None:
            raise NotFound("snapshot", esc(name))
        return snap

    async def lookup(self, name: str) -> Entry:
        snap = await self.find(name)
        return name, snapshot_dir(self.key, snap.id), snapshot_stat(snap)

    async def _check_free(self, name: str) -> None:
        """Refuse a name the project's snapshots/ already lists (as a name, label or
        ID): a name is the project's, whichever view the mkdir came through, or
        two of one name would both be listed there as labels."""
        taken = await self.ctx.catalog.taken(self.key.zone, self.key.project,
                                             View(Kind.SNAPSHOTS), name)
        if taken is not None:
            raise AlreadyExists(f"{self.describe()}{esc(name)} already exists "
                                f"(snapshot {taken.id})")

    def _claim(self, name: str) -> ContextManager[None]:
        return self.ctx.claim(self.key.zone, self.key.project, name, self.describe() + name)

    async def mkdir(self, name: str) -> Entry:
        if not may_create_snapshot_in(self.key):
            raise NotPermitted(f"mkdir {esc(name)} in {self.describe()}: snapshots are made "
                               "only in volumes/<volume>/")
        check_name(name)
        with self._claim(name):
            await self._check_free(name)
            # unique_name: another process on the store may take it meanwhile.
            snap = await self.ctx.svc.create_snapshot(
                self.key.zone, name=name, volume_id=self.view.arg, project=self.key.project,
                unique_name=True)
            # create_snapshot returns once the snapshot exists (snapshotting or later).
            self.ctx.catalog.invalidate()
            self.ctx.catalog.remember(snap)
        log.info("mkdir %s%s: snapshot %s created (%s)", self.describe(), esc(name), snap.id,
                 snap.state)
        return name, snapshot_dir(self.key, snap.id), snapshot_stat(snap)

    async def rmdir(self, name: str) -> None:
        snap = await self.find(name)
        # close(2) returns before the kernel sends RELEASE: give a reader that
        # just closed the image a moment to be counted out.
        with trio.move_on_after(RELEASE_GRACE):
            while self.ctx.open_images.get(snap.id, 0):
                await trio.sleep(0.01)
        readers = self.ctx.open_images.get(snap.id, 0)
        if readers:
            # Deleting would pull the bytes from under a reader (a backup in
            # progress): refuse, like the service does while exporting.
            raise PreconditionFailed(f"image.raw of snapshot {snap.id} is open "
                                     f"({readers} open file{'s' if readers > 1 else ''}); "
                                     "close it first")
        await self.ctx.svc.delete_snapshot(self.key.zone, snap.id)
        self.ctx.catalog.invalidate()
        self.ctx.catalog.forget(snap.id)
        forget_names(self.ctx, snap, None)
        log.info("rmdir %s%s: snapshot %s deleted", self.describe(), esc(name), snap.id)

    async def rename(self, old: str, new_parent: Key, new: str) -> None:
        if not same_place(self.key, new_parent):
            raise NotPermitted(f"rename {self.describe()}{esc(old)}: a snapshot can only be "
                               "renamed within its directory (zone, project and view stay)")
        snap = await self.find(old)
        if new == old:
            return
        check_name(new)
        catalog = self.ctx.catalog
        with self._claim(new):
            taken = await catalog.taken(self.key.zone, self.key.project,
                                        View(Kind.SNAPSHOTS), new, other_than=snap.id)
            if taken is not None:
                raise AlreadyExists(f"{self.describe()}{esc(new)} already exists (snapshot "
                                    f"{taken.id}); a rename never replaces a snapshot")
            # unique_name: another process on the store may take it meanwhile.
            updated = await self.ctx.svc.update_snapshot(self.key.zone, snap.id, name=new,
                                                         unique_name=True)
            catalog.invalidate()
            catalog.remember(updated)
        forget_names(self.ctx, snap, updated)
        log.info("rename %s%s -> %s: snapshot %s", self.describe(), esc(old), esc(new), snap.id)


async def snapshot_at(ctx: FsContext, key: Key, max_age: float | None = None) -> Snapshot:
    """The snapshot of the snapshot directory ``key`` (ENOENT when it is not in
    that project). For the snapshot directory and the files in it."""
    snap = await ctx.catalog.snapshot(key.zone, key.snapshot, max_age)
    if snap.project != key.project:
        raise NotFound("snapshot", key.snapshot)
    return snap
