"""The Block Storage API v1 routes (``/block/v1/zones/{zone}/...``) over the same
``SnapshotService`` as the Instance routes.

The Block API shows only volumes of block types and their snapshots
(``snapfs.block_model`` holds the mapping and says which); anything else is a
404 here, as a local SSD is to Scaleway's Block API. Its lists have filters the
service has not (tags match if ANY is present, volume types, ordering by
name), so they are applied here over the service's pages.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, TypeVar

from .. import block_model as bm
from ..errors import InvalidArgument, NotFound
from ..model import (MAX_PAGE, MAX_PER_PAGE, Page, Snapshot, Volume, check_tags, check_uuid,
                     check_zone, new_id)
from ..service import SnapshotService
from .asgi import Request, Response, Router, json_response
from .paged import PagedLists

ZONE = "/block/v1/zones/{zone}"
DEFAULT_PAGE_SIZE = 50

T = TypeVar("T")

_ORDER = ("created_at_asc", "created_at_desc", "name_asc", "name_desc")


def _typed(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise InvalidArgument(name, f"must be of type {kind.__name__}")
    return value


def _only(body: dict[str, Any], allowed: tuple[str, ...], within: str = "") -> None:
    for name in body:
        if name not in allowed:
            raise InvalidArgument(within + name, "unknown field")


def _project_id(body: dict[str, Any]) -> str | None:
    """Checked here, under Block's name for it (the service would say ``project``)."""
    value = _typed(body, "project_id", str)
    return None if value is None else check_uuid("project_id", value)


def _block_not_found(exc: NotFound) -> NotFound:
    return NotFound(bm.BLOCK_RESOURCE.get(exc.resource, exc.resource), exc.ident)


def _paging(req: Request) -> tuple[int, int]:
    size = req.int_param("page_size")
    page = req.int_param("page")
    size = DEFAULT_PAGE_SIZE if size is None else size
    page = 1 if page is None else page
    if not 1 <= size <= MAX_PER_PAGE:
        raise InvalidArgument("page_size", f"must be between 1 and {MAX_PER_PAGE}")
    if not 1 <= page <= MAX_PAGE:
        raise InvalidArgument("page", f"must be between 1 and {MAX_PAGE}")
    return size, page


def _order(req: Request) -> str:
    order = req.param("order_by") or "created_at_asc"
    if order not in _ORDER:
        raise InvalidArgument("order_by", f"one of {', '.join(_ORDER)}")
    return order


def _sorted(items: list[T], order: str, created: Callable[[T], str],
            name: Callable[[T], str], ident: Callable[[T], str]) -> list[T]:
    if order.startswith("name"):
        return sorted(items, key=lambda x: (name(x), ident(x)), reverse=order.endswith("desc"))
    return sorted(items, key=lambda x: (created(x), ident(x)), reverse=order.endswith("desc"))


def _page(items: list[T], size: int, page: int) -> list[T]:
    return items[(page - 1) * size: page * size]


async def _all(fetch: Callable[[int], Awaitable[Page[T]]]) -> list[T]:
    """Every item of a service list, page by page (the service's pages are bounded)."""
    out: list[T] = []
    page = 1
    while True:
        got = await fetch(page)
        out.extend(got.items)
        if not got.items or len(out) >= got.total_count:
            return out
        page += 1


def _list_response(key: str, items: list[dict[str, Any]], total: int) -> Response:
    return json_response(200, {key: items, "total_count": total},
                         [(b"x-total-count", str(total).encode())])


class BlockRoutes:
    def __init__(self, service: SnapshotService, paged: PagedLists) -> None:
        self.svc = service
        self.paged = paged  # shared with the Instance routes; cleared by App on changes

    def add_to(self, r: Router) -> None:
        r.add("GET", f"{ZONE}/volume-types", self.list_volume_types)
        r.add("GET", f"{ZONE}/volumes", self.list_volumes)
        r.add("GET", f"{ZONE}/volumes/{{volume_id}}", self.get_volume)
        r.add("POST", f"{ZONE}/volumes", self.create_volume)
        r.add("PATCH", f"{ZONE}/volumes/{{volume_id}}", self.update_volume)
        r.add("DELETE", f"{ZONE}/volumes/{{volume_id}}", self.delete_volume)
        r.add("GET", f"{ZONE}/snapshots", self.list_snapshots)
        r.add("POST", f"{ZONE}/snapshots", self.create_snapshot)
        r.add("POST", f"{ZONE}/snapshots/import-from-object-storage", self.import_snapshot)
        r.add("GET", f"{ZONE}/snapshots/{{snapshot_id}}", self.get_snapshot)
        r.add("PATCH", f"{ZONE}/snapshots/{{snapshot_id}}", self.update_snapshot)
        r.add("DELETE", f"{ZONE}/snapshots/{{snapshot_id}}", self.delete_snapshot)
        r.add("POST", f"{ZONE}/snapshots/{{snapshot_id}}/export-to-object-storage",
              self.export_snapshot)

    # --- lookups owned by the Block API ------------------------------------------------

    async def _snapshot(self, zone: str, snapshot_id: str) -> Snapshot:
        try:
            snap = await self.svc.get_snapshot(zone, snapshot_id)
        except NotFound as exc:
            raise _block_not_found(exc) from None
        if not bm.is_block_type(snap.volume_type):
            raise NotFound("block_snapshot", snapshot_id)
        return snap

    async def _volume(self, zone: str, volume_id: str) -> Volume:
        try:
            vol = await self.svc.get_volume(zone, volume_id)
        except NotFound as exc:
            raise _block_not_found(exc) from None
        if not bm.is_block_type(vol.volume_type):
            raise NotFound("block_volume", volume_id)
        return vol

    async def _render(self, zone: str, snaps: list[Snapshot]) -> list[dict[str, Any]]:
        """Block's Snapshot JSON, each parent volume as it is now (looked up once
        per answer): its Block type, and ``deleted`` once it is gone."""
        parents: dict[str, tuple[str | None, str]] = {}
        out = []
        for s in snaps:
            vid = s.base_volume.id if s.base_volume is not None else None
            if vid is not None and vid not in parents:
                try:
                    vol = await self.svc.get_volume(zone, vid)
                except NotFound:
                    parents[vid] = (None, "deleted")
                else:
                    # A volume Block does not show (an l_ssd whose snapshot was
                    # made unified through Instance) is named by its own type.
                    parents[vid] = (bm.BLOCK_VOLUME_TYPE.get(vol.volume_type,
                                                             vol.volume_type),
                                    bm.volume_status(vol))
            ptype, pstatus = parents[vid] if vid is not None else (None, "available")
            out.append(bm.snapshot_to_block(s, ptype, pstatus))
        return out

    async def _one(self, zone: str, snap: Snapshot) -> Response:
        return json_response(200, (await self._render(zone, [snap]))[0])

    # --- volumes -----------------------------------------------------------------------

    async def list_volume_types(self, req: Request) -> Response:
        check_zone(req.args["zone"])
        size, page = _paging(req)
        types = [{"type": t, "zone": req.args["zone"], "pricing": None,
                  "snapshot_pricing": None,
                  "specs": {"class": bm.BLOCK_CLASS[m], "perf_iops": bm.PERF_IOPS[t]}}
                 for m, t in bm.BLOCK_VOLUME_TYPE.items()]
        return _list_response("volume_types", _page(types, size, page), len(types))

    async def list_volumes(self, req: Request) -> Response:
        zone = req.args["zone"]
        size, page = _paging(req)
        order = _order(req)
        project = req.uuid_param("project_id")
        org = req.param("organization_id") or None
        name = req.param("name") or None
        tags = req.list_param("tags")
        vtype = req.param("volume_type") or None
        if vtype is not None and vtype not in bm.BLOCK_VOLUME_TYPE.values():
            raise InvalidArgument("volume_type",
                                  f"one of {', '.join(bm.BLOCK_VOLUME_TYPE.values())}")
        ids = req.list_param("volume_ids")
        if req.param("product_resource_id"):
            raise InvalidArgument("product_resource_id", "filter not supported by this server")
        req.bool_param("include_deleted")  # deleted volumes are gone at once: none either way

        async def compute() -> list[Volume]:
            vols = await _all(lambda p: self.svc.list_volumes(
                zone, project=project, name=name, per_page=MAX_PER_PAGE, page=p))
            orgs = {p.id: p.organization for p in await self.svc.list_projects()}
            chosen = [v for v in vols
                      if bm.is_block_type(v.volume_type)
                      and (org is None or orgs.get(v.project) == org)
                      and (tags is None or set(tags) & set(v.tags))
                      and (vtype is None or bm.BLOCK_VOLUME_TYPE[v.volume_type] == vtype)
                      and (ids is None or v.id in ids)]
            return _sorted(chosen, order, lambda v: v.creation_date, lambda v: v.name,
                           lambda v: v.id)

        chosen = await self.paged.get(("volumes", zone, order, project, org, name,
                                     tuple(tags or ()), vtype, tuple(ids or ())), page, compute)
        return _list_response("volumes", [bm.volume_to_block(v) for v in
                                          _page(chosen, size, page)], len(chosen))

    async def get_volume(self, req: Request) -> Response:
        vol = await self._volume(req.args["zone"], req.args["volume_id"])
        return json_response(200, bm.volume_to_block(vol))

    async def create_volume(self, req: Request) -> Response:
        """An empty volume (``from_empty``), made by the store as ``snapfs volume
        create`` makes one: a sparse file in the store, of type ``unified`` (Block's
        sbs_5k, the class ``sbs``). Restoring a snapshot into a new volume
        (``from_snapshot``), other IOPS and KMS keys are refused (400)."""
        zone = req.args["zone"]
        body = req.json()
        _only(body, ("name", "perf_iops", "project_id", "from_empty", "from_snapshot", "tags",
                     "kms_key_id"))
        if body.get("from_snapshot") is not None:
            raise InvalidArgument("from_snapshot", "creating a volume from a snapshot is not "
                                                   "supported by this server (from_empty only)")
        if body.get("kms_key_id") is not None:
            raise InvalidArgument("kms_key_id", "not supported by this server")
        iops = _typed(body, "perf_iops", int)
        if iops not in (None, bm.PERF_IOPS[bm.BLOCK_VOLUME_TYPE[bm.IMPORT_VOLUME_TYPE]]):
            raise InvalidArgument("perf_iops", "this server makes sbs_5k volumes (5000) only")
        empty = _typed(body, "from_empty", dict)
        if empty is None:
            raise InvalidArgument("from_empty", "required (with its size)")
        _only(empty, ("size",), within="from_empty.")
        size = _typed(empty, "size", int)
        if size is None:
            raise InvalidArgument("from_empty.size", "required")
        tags = _typed(body, "tags", list)
        if tags is not None:  # checked before the volume is made, not after
            tags = check_tags(tags)
        # The API names a volume left unnamed; the store needs a name.
        name = _typed(body, "name", str) or f"volume-{new_id()[:8]}"
        vol = await self.svc.create_volume(name, size, zone=zone,
                                           project=_project_id(body),
                                           volume_type=bm.IMPORT_VOLUME_TYPE)
        if tags:
            vol = await self.svc.update_volume(zone, vol.id, tags=tags)
        return json_response(200, bm.volume_to_block(vol))

    async def update_volume(self, req: Request) -> Response:
        """Name and tags; a new size or IOPS is refused (400)."""
        zone, volume_id = req.args["zone"], req.args["volume_id"]
        body = req.json()
        _only(body, ("name", "size", "tags", "perf_iops"))
        vol = await self._volume(zone, volume_id)
        size = _typed(body, "size", int)
        if size is not None and size != vol.size:
            raise InvalidArgument("size", "resizing is not supported by this server")
        iops = _typed(body, "perf_iops", int)
        if iops is not None and iops != bm.PERF_IOPS[bm.BLOCK_VOLUME_TYPE[vol.volume_type]]:
            raise InvalidArgument("perf_iops", "changing IOPS is not supported by this server")
        vol = await self.svc.update_volume(zone, vol.id, name=_typed(body, "name", str),
                                           tags=_typed(body, "tags", list))
        return json_response(200, bm.volume_to_block(vol))

    async def delete_volume(self, req: Request) -> Response:
        zone, volume_id = req.args["zone"], req.args["volume_id"]
        vol = await self._volume(zone, volume_id)
        await self.svc.delete_volume(zone, vol.id)
        return Response(204)

    # --- snapshots ---------------------------------------------------------------------

    async def list_snapshots(self, req: Request) -> Response:
        zone = req.args["zone"]
        size, page = _paging(req)
        order = _order(req)
        project = req.uuid_param("project_id")
        org = req.param("organization_id") or None
        name = req.param("name") or None
        volume_id = req.uuid_param("volume_id")
        tags = req.list_param("tags")
        # Deleted snapshots are gone at once here: none to include either way.
        req.bool_param("include_deleted")

        async def compute() -> list[Snapshot]:
            snaps = await self.svc.list_all_snapshots(
                zone, organization=org, project=project, name=name, base_volume_id=volume_id,
                volume_types=tuple(bm.BLOCK_CLASS))
            # Block's tag filter: a snapshot with ANY of the tags (the service's needs all).
            chosen = [s for s in snaps if tags is None or set(tags) & set(s.tags)]
            return _sorted(chosen, order, lambda s: s.creation_date, lambda s: s.name,
                           lambda s: s.id)

        chosen = await self.paged.get(("snapshots", zone, order, project, org, name, volume_id,
                                     tuple(tags or ())), page, compute)
        return _list_response("snapshots", await self._render(zone, _page(chosen, size, page)),
                              len(chosen))

    async def get_snapshot(self, req: Request) -> Response:
        zone = req.args["zone"]
        return await self._one(zone, await self._snapshot(zone, req.args["snapshot_id"]))

    async def create_snapshot(self, req: Request) -> Response:
        zone = req.args["zone"]
        body = req.json()
        _only(body, ("volume_id", "public", "name", "project_id", "tags"))
        volume_id = _typed(body, "volume_id", str)
        if not volume_id:
            raise InvalidArgument("volume_id", "required")
        check_uuid("volume_id", volume_id)  # 400 for a malformed one, as Instance's
        if _typed(body, "public", bool):
            raise InvalidArgument("public", "public snapshots are not supported by this server")
        vol = await self._volume(zone, volume_id)
        snap = await self.svc.create_snapshot(
            zone, name=_typed(body, "name", str) or "", volume_id=vol.id,
            tags=_typed(body, "tags", list), project=_project_id(body))
        return await self._one(zone, snap)

    async def import_snapshot(self, req: Request) -> Response:
        body = req.json()
        _only(body, ("bucket", "key", "name", "project_id", "tags", "size"))
        snap = await self.svc.create_snapshot(
            req.args["zone"], name=_typed(body, "name", str) or "",
            tags=_typed(body, "tags", list), project=_project_id(body),
            volume_type=bm.IMPORT_VOLUME_TYPE, bucket=_typed(body, "bucket", str) or "",
            key=_typed(body, "key", str) or "", size=_typed(body, "size", int))
        return await self._one(req.args["zone"], snap)

    async def update_snapshot(self, req: Request) -> Response:
        zone, snapshot_id = req.args["zone"], req.args["snapshot_id"]
        body = req.json()
        _only(body, ("name", "tags", "public"))
        if _typed(body, "public", bool):
            raise InvalidArgument("public", "public snapshots are not supported by this server")
        await self._snapshot(zone, snapshot_id)
        snap = await self.svc.update_snapshot(zone, snapshot_id, name=_typed(body, "name", str),
                                              tags=_typed(body, "tags", list))
        return await self._one(zone, snap)

    async def delete_snapshot(self, req: Request) -> Response:
        zone, snapshot_id = req.args["zone"], req.args["snapshot_id"]
        await self._snapshot(zone, snapshot_id)
        await self.svc.delete_snapshot(zone, snapshot_id)
        return Response(204)

    async def export_snapshot(self, req: Request) -> Response:
        zone, snapshot_id = req.args["zone"], req.args["snapshot_id"]
        body = req.json()
        _only(body, ("bucket", "key"))
        await self._snapshot(zone, snapshot_id)
        # No task in Block's answer: the snapshot, now ``exporting`` (or already
        # back to ``available`` when the export was quick).
        await self.svc.export_snapshot(zone, snapshot_id,
                                       bucket=_typed(body, "bucket", str) or "",
                                       key=_typed(body, "key", str) or "")
        snap = await self._snapshot(zone, snapshot_id)
        return await self._one(zone, snap)
