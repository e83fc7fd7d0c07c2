"""The directories above the snapshots: root, zones, projects, and a project's
``volumes/`` and ``tags/`` sections (whose entries are views of snapshots)."""

from __future__ import annotations

import os

from ...errors import NotFound
from ...model import Project, Volume
from .. import names
from ..attributes import Stat, dir_stat, ns
from ..context import FsContext
from ..keys import (SECTIONS, Key, Kind, View, project_dir, static_child, tag_dir,
                    volume_dir, zone_dir)
from .base import Entry, Node

#: The tree's fixed directories change only with the resources below them.
STRUCTURE_TIMEOUT = 60.0


class RootNode(Node):
    def describe(self) -> str:
        return "the mount's root"

    async def stat(self) -> Stat:
        return await structure_stat(self.ctx)

    async def entries(self) -> list[Entry]:
        return [(z, zone_dir(z), await ZoneNode(self.ctx, zone_dir(z)).stat())
                for z in await self.ctx.catalog.zones()]

    async def lookup(self, name: str) -> Entry:
        if name in await self.ctx.catalog.zones():
            key = zone_dir(name)
            return name, key, await ZoneNode(self.ctx, key).stat()
        raise NotFound("zone", name)

    async def xattrs(self) -> dict[str, str]:
        return {"pid": str(os.getpid()), "backend": type(self.ctx.svc).__name__}


class ZoneNode(Node):
    def describe(self) -> str:
        return f"zone {self.key.zone}"

    async def stat(self) -> Stat:
        return await structure_stat(self.ctx)

    async def entries(self) -> list[Entry]:
        listing = await self.ctx.catalog.projects()
        return [(label, project_dir(self.key.zone, p.id), project_stat(p))
                for label, p in listing.by_label.items()]

    async def lookup(self, name: str) -> Entry:
        listing = await self.ctx.catalog.projects()
        p = names.resolve(name, listing.items)
        if p is None:
            raise NotFound("project", name)
        return name, project_dir(self.key.zone, p.id), project_stat(p)

    async def xattrs(self) -> dict[str, str]:
        # A zone has no ID in the API: its name is its identifier.
        return {"id": self.key.zone, "name": self.key.zone, "zone": self.key.zone}


async def structure_stat(ctx: FsContext) -> Stat:
    """The root's and a zone's times: the newest change among the projects (the
    same across remounts, unlike the mount's own time, which is the fallback
    only where a backend dates no project)."""
    when = max((ns(p.updated_at) for p in (await ctx.catalog.projects()).items), default=0)
    when = when or ctx.mounted_ns
    return dir_stat(False, when, when, STRUCTURE_TIMEOUT)


def project_stat(p: Project) -> Stat:
    return dir_stat(False, ns(p.updated_at), ns(p.created_at))


class ProjectNode(Node):
    def describe(self) -> str:
        return f"project {self.key.project}"

    async def project(self) -> Project:
        return await self.ctx.catalog.project(self.key.project)

    async def stat(self) -> Stat:
        return project_stat(await self.project())

    async def entries(self) -> list[Entry]:
        st = await self.stat()
        out = []
        for name in SECTIONS:
            key = static_child(self.key, name)
            assert key is not None
            out.append((name, key, section_stat(key, st)))
        return out

    async def lookup(self, name: str) -> Entry:
        key = static_child(self.key, name)
        if key is None:
            raise NotFound("entry", name)
        return name, key, section_stat(key, await self.stat())

    async def xattrs(self) -> dict[str, str]:
        p = await self.project()
        return {"id": p.id, "name": p.name, "organization": p.organization,
                "zone": self.key.zone, "creation_date": p.created_at,
                "modification_date": p.updated_at}


def section_stat(key: Key, project: Stat) -> Stat:
    # snapshots/ renames entries; imports/ gets new files: both writable.
    writable = key.kind in (Kind.SNAPSHOTS, Kind.IMPORTS)
    return dir_stat(writable, project.mtime_ns, project.ctime_ns, STRUCTURE_TIMEOUT)


def volume_stat(v: Volume) -> Stat:
    # Writable: mkdir here is Create snapshot.
    return dir_stat(True, ns(v.modification_date), ns(v.creation_date))


def volume_xattrs(v: Volume) -> dict[str, str]:
    attrs = {"id": v.id, "name": v.name, "size": str(v.size), "volume_type": v.volume_type,
             "zone": v.zone, "project": v.project, "organization": v.organization,
             "state": v.state, "creation_date": v.creation_date,
             "modification_date": v.modification_date, "tags": ",".join(v.tags)}
    if v.path is not None:
        attrs["path"] = v.path
    return attrs


class VolumesNode(Node):
    def describe(self) -> str:
        return "volumes/"

    async def stat(self) -> Stat:
        project = await ProjectNode(self.ctx, self.key.parent()).stat()
        return section_stat(self.key, project)

    async def entries(self) -> list[Entry]:
        listing = await self.ctx.catalog.volumes(self.key.zone, self.key.project)
        return [(label, volume_dir(self.key.zone, self.key.project, v.id), volume_stat(v))
                for label, v in listing.by_label.items()]

    async def lookup(self, name: str) -> Entry:
        listing = await self.ctx.catalog.volumes(self.key.zone, self.key.project)
        v = names.resolve(name, listing.items)
        if v is None:
            ident = names.as_uuid(name)
            if ident is None:
                raise NotFound("volume", name)
            v = await self.ctx.catalog.volume(self.key.zone, self.key.project, ident)
        return name, volume_dir(self.key.zone, self.key.project, v.id), volume_stat(v)


class TagsNode(Node):
    def describe(self) -> str:
        return "tags/"

    async def stat(self) -> Stat:
        project = await ProjectNode(self.ctx, self.key.parent()).stat()
        return section_stat(self.key, project)

    async def _labels(self) -> dict[str, str]:
        return names.tag_labels(await self.ctx.catalog.tags(self.key.zone, self.key.project))

    async def entries(self) -> list[Entry]:
        times = await tag_times(self.ctx, self.key.zone, self.key.project)
        return [(label, tag_dir(self.key.zone, self.key.project, t), tag_stat(times[t]))
                for label, t in (await self._labels()).items()]

    async def lookup(self, name: str) -> Entry:
        tag = (await self._labels()).get(name)
        if tag is None:
            raise NotFound("tag", name)
        times = await tag_times(self.ctx, self.key.zone, self.key.project)
        return name, tag_dir(self.key.zone, self.key.project, tag), tag_stat(times[tag])


async def tag_times(ctx: FsContext, zone: str, project: str) -> dict[str, int]:
    """Per tag, the newest change among its snapshots (a tag exists only while a
    snapshot carries it): the time of its directory."""
    listing = await ctx.catalog.snapshots(zone, project, View(Kind.SNAPSHOTS))
    times: dict[str, int] = {}
    for s in listing.items:
        when = ns(s.modification_date)
        for t in s.tags:
            times[t] = max(times.get(t, 0), when)
    return times


def tag_stat(when: int) -> Stat:
    return dir_stat(False, when, when)
