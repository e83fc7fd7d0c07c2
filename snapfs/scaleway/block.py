"""The cloud backend's side of the Block Storage API v1 (``scaleway.block.v1``).

Every call goes through ``ScalewayService.call`` (worker thread, limiter,
retries, domain errors). The SDK's dataclasses are turned back into the API's
JSON here and mapped to the model by ``snapfs.block_model`` (the one mapping);
this module only adds what the backend needs around it: the organization of a
project (Block names only the project) and the ``user.api`` marking.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
from typing import TYPE_CHECKING, Any

from scaleway import Client
from scaleway.block.v1 import BlockV1API

from .. import block_model as bm
from . import convert
from .errors import GuardedAPI
from ..model import MAX_PER_PAGE, Page, Snapshot, Volume

if TYPE_CHECKING:
    from .service import ScalewayService


class _BlockAPI(GuardedAPI, BlockV1API):
    """Block's SDK API; error answers that are not JSON judged by status."""


def _date(value: dt.datetime | str | None) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, dt.datetime) else str(value)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def snapshot_json(s: Any) -> dict[str, Any]:
    """An SDK Block Snapshot back as the API's JSON (what block_model reads)."""
    pv = s.parent_volume
    return {
        "id": s.id, "name": s.name, "size": s.size, "project_id": s.project_id,
        "references": [{"id": r.id} for r in s.references or []],
        "status": _text(s.status),
        "parent_volume": None if pv is None else {"id": pv.id, "name": pv.name,
                                                  "type": _text(pv.type_),
                                                  "status": _text(pv.status)},
        "created_at": _date(s.created_at), "updated_at": _date(s.updated_at),
        "tags": list(s.tags or []), "zone": _text(s.zone), "class": _text(s.class_),
        "public": bool(s.public),
    }


def volume_json(v: Any) -> dict[str, Any]:
    specs = v.specs
    return {
        "id": v.id, "name": v.name, "type": _text(v.type_), "size": v.size,
        "project_id": v.project_id, "created_at": _date(v.created_at),
        "updated_at": _date(v.updated_at), "status": _text(v.status),
        "tags": list(v.tags or []), "zone": _text(v.zone),
        "specs": None if specs is None else {"class": _text(specs.class_),
                                             "perf_iops": specs.perf_iops},
    }


def mark(snap: Snapshot, extra: bm.BlockExtra) -> Snapshot:
    """A Block snapshot carries ``user.api`` = block and the Block-only fields."""
    return dataclasses.replace(snap, api="block", api_xattrs=(
        ("public", "true" if extra.public else "false"),
        ("references", str(extra.references)), ("class", extra.storage_class),
        ("status", extra.status)),
        progress=convert.progress_of(snap.state))


class BlockSide:
    def __init__(self, service: "ScalewayService", client: Client) -> None:
        self.svc = service
        self.api = _BlockAPI(client)
        # Lists span every project the key sees (as the Instance side's do).
        unscoped = copy.copy(client)
        unscoped.default_project_id = None
        unscoped.default_organization_id = None
        self._lists = _BlockAPI(unscoped)
        self._default_org = client.default_organization_id or ""
        self._orgs: dict[str, str] = {}

    async def _organization(self, project: str) -> str:
        if project not in self._orgs:
            self._orgs.update({p.id: p.organization for p in await self.svc.list_projects()})
        return self._orgs.get(project, self._default_org)

    async def _snapshot(self, s: Any) -> Snapshot:
        data = snapshot_json(s)
        snap, extra = bm.snapshot_from_block(data, await self._organization(s.project_id or ""))
        return mark(snap, extra)

    async def _volume(self, v: Any) -> Volume:
        return bm.volume_from_block(volume_json(v), await self._organization(v.project_id or ""))

    # --- reads -------------------------------------------------------------------------

    async def list_snapshots(self, zone: str, *, organization: str | None, project: str | None,
                             name: str | None, tags: list[str] | None,
                             base_volume_id: str | None, page: int) -> Page[Snapshot]:
        if not self._orgs:
            await self._organization("")
        orgs, unknown = dict(self._orgs), set()

        def from_json(d: dict[str, Any]) -> Snapshot:
            for field in ("created_at", "updated_at"):
                d[field] = convert.json_date(d.get(field)) or None
            proj = str(d.get("project_id") or "")
            if proj not in orgs:
                unknown.add(proj)
            return mark(*bm.snapshot_from_block(d, orgs.get(proj, self._default_org)))

        res = await self.svc._list_json(
            "list block snapshots", self._lists, f"/block/v1/zones/{zone}/snapshots",
            {"include_deleted": "false", "organization_id": organization,
             "project_id": project, "name": name, "tags": tags or None,
             "volume_id": base_volume_id, "page": page, "page_size": MAX_PER_PAGE},
            "snapshots", from_json)
        items = res.items
        if unknown:  # a project created since the projects were listed
            self._orgs.clear()
            items = [dataclasses.replace(s, organization=await self._organization(s.project))
                     for s in items]
        # Block's tag filter matches ANY tag; the model's needs every one.
        if tags:
            items = [s for s in items if set(tags) <= set(s.tags)]
        return Page(items, int(res.total_count or 0))

    async def get_snapshot(self, zone: str, snapshot_id: str) -> Snapshot:
        return await self._snapshot(await self.svc.call(
            "get block snapshot", self.api.get_snapshot, zone=zone, snapshot_id=snapshot_id))

    async def list_volumes(self, zone: str, *, project: str | None, name: str | None,
                           page: int) -> Page[Volume]:
        res = await self.svc.call(
            "list block volumes", self._lists.list_volumes, include_deleted=False, zone=zone,
            project_id=project, name=name, page=page, page_size=MAX_PER_PAGE)
        return Page([await self._volume(v) for v in res.volumes], int(res.total_count or 0))

    async def get_volume(self, zone: str, volume_id: str) -> Volume:
        return await self._volume(await self.svc.call(
            "get block volume", self.api.get_volume, zone=zone, volume_id=volume_id))

    # --- changes -----------------------------------------------------------------------

    async def create_snapshot(self, zone: str, *, name: str, volume_id: str,
                              tags: list[str] | None, project: str | None) -> Snapshot:
        return await self._snapshot(await self.svc.call(
            "create block snapshot", self.api.create_snapshot, creates=True, zone=zone,
            volume_id=volume_id,
            public=False, name=name, project_id=project, tags=tags))

    async def import_snapshot(self, zone: str, *, name: str, bucket: str, key: str,
                              tags: list[str] | None, project: str | None,
                              size: int | None) -> Snapshot:
        return await self._snapshot(await self.svc.call(
            "import block snapshot", self.api.import_snapshot_from_object_storage,
            creates=True, zone=zone,
            bucket=bucket, key=key, name=name, project_id=project, tags=tags, size=size))

    async def update_snapshot(self, zone: str, snapshot_id: str, *, name: str | None,
                              tags: list[str] | None) -> Snapshot:
        return await self._snapshot(await self.svc.call(
            "update block snapshot", self.api.update_snapshot, zone=zone,
            snapshot_id=snapshot_id, name=name, tags=tags))

    async def delete_snapshot(self, zone: str, snapshot_id: str) -> None:
        await self.svc.call("delete block snapshot", self.api.delete_snapshot, deletes=True,
                            zone=zone, snapshot_id=snapshot_id)

    async def export_snapshot(self, zone: str, snapshot_id: str, *, bucket: str,
                              key: str) -> Snapshot:
        return await self._snapshot(await self.svc.call(
            "export block snapshot", self.api.export_snapshot_to_object_storage,
            creates=True, zone=zone,
            snapshot_id=snapshot_id, bucket=bucket, key=key))
