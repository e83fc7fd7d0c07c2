"""The Instance API v1 snapshot/volume routes and the Account v3 project list
(the Block Storage v1 routes are ``block_routes``),
each a thin translation between HTTP and ``SnapshotService``.

Validation is the service's (per_page, sizes, ids, zones): handlers only decode
JSON types and pass the API's argument names through, so the rules live in one
place whichever front end calls them.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidArgument
from ..model import (MAX_PAGE, MAX_PER_PAGE, Page, Project, Snapshot, Volume, check_paging,
                     check_zone)
from ..service import SnapshotService
from .asgi import App, Request, Response, Router, json_response
from .block_routes import BlockRoutes
from .paged import PagedLists

ZONE = "/instance/v1/zones/{zone}"

#: Fields the SDK may omit or send as null in a Set (PUT): it marshals only
#: the attributes it holds, so an absent one means "unchanged", as in the API.
_NULLABLE_ON_SET = ("base_volume", "error_reason")


#: The Instance API's snapshot volume types (its SnapshotVolumeType), the values of
#: List snapshots' ``volume_type`` filter.
SNAPSHOT_VOLUME_TYPES = ("l_ssd", "b_ssd", "unified")


def _list_headers(total: int) -> list[tuple[bytes, bytes]]:
    return [(b"x-total-count", str(total).encode())]


def _typed(body: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """body[name] if present and of the JSON type ``kind``; None when absent/null."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        kind_name = kind.__name__ if isinstance(kind, type) else kind[0].__name__
        raise InvalidArgument(name, f"must be of type {kind_name}")
    return value


def _only(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    for name in body:
        if name not in allowed:
            raise InvalidArgument(name, "unknown field")


class Routes:
    def __init__(self, service: SnapshotService, paged: PagedLists | None = None) -> None:
        self.svc = service
        self.paged = paged if paged is not None else PagedLists()

    def router(self) -> Router:
        r = Router()
        r.add("GET", f"{ZONE}/snapshots", self.list_snapshots)
        r.add("POST", f"{ZONE}/snapshots", self.create_snapshot)
        r.add("GET", f"{ZONE}/snapshots/{{snapshot_id}}", self.get_snapshot)
        r.add("PUT", f"{ZONE}/snapshots/{{snapshot_id}}", self.set_snapshot)
        r.add("PATCH", f"{ZONE}/snapshots/{{snapshot_id}}", self.update_snapshot)
        r.add("DELETE", f"{ZONE}/snapshots/{{snapshot_id}}", self.delete_snapshot)
        r.add("POST", f"{ZONE}/snapshots/{{snapshot_id}}/export", self.export_snapshot)
        r.add("GET", f"{ZONE}/tasks/{{task_id}}", self.get_task)
        r.add("GET", f"{ZONE}/volumes", self.list_volumes)
        r.add("GET", f"{ZONE}/volumes/{{volume_id}}", self.get_volume)
        r.add("GET", "/account/v3/projects", self.list_projects)
        return r

    # --- snapshots -------------------------------------------------------------------

    async def list_snapshots(self, req: Request) -> Response:
        zone = req.args["zone"]
        per_page, page = check_paging(req.int_param("per_page"), req.int_param("page"))
        organization = req.param("organization") or None
        project = req.uuid_param("project")
        name = req.param("name") or None
        tags = req.list_param("tags")
        base_volume_id = req.uuid_param("base_volume_id")
        # Scaleway's API takes a volume_type filter (the SDKs do not send it yet);
        # the cloud backend uses it to ask Instance only for what Instance owns.
        volume_type = req.param("volume_type") or None
        if volume_type is not None and volume_type not in SNAPSHOT_VOLUME_TYPES:
            raise InvalidArgument("volume_type", f"one of {', '.join(SNAPSHOT_VOLUME_TYPES)}")

        async def compute() -> list[Snapshot]:
            return await self.svc.list_all_snapshots(
                zone, organization=organization, project=project, name=name, tags=tags,
                base_volume_id=base_volume_id,
                volume_types=None if volume_type is None else (volume_type,))

        items = await self.paged.get(("instance snapshots", zone, organization, project, name,
                                      tuple(tags or ()), base_volume_id, volume_type),
                                     page, compute)
        return json_response(200, {"snapshots": [s.to_api() for s in
                                                 items[(page - 1) * per_page:page * per_page]],
                                   "total_count": len(items)},
                             _list_headers(len(items)))

    async def create_snapshot(self, req: Request) -> Response:
        body = req.json()
        _only(body, ("name", "volume_id", "tags", "project", "organization", "volume_type",
                     "bucket", "key", "size"))
        tags = _typed(body, "tags", list)
        snap = await self.svc.create_snapshot(
            req.args["zone"], name=_typed(body, "name", str) or "",
            volume_id=_typed(body, "volume_id", str), tags=tags,
            project=_typed(body, "project", str), organization=_typed(body, "organization", str),
            volume_type=_typed(body, "volume_type", str), bucket=_typed(body, "bucket", str),
            key=_typed(body, "key", str), size=_typed(body, "size", int))
        return json_response(201, {"snapshot": snap.to_api(), "task": None})

    async def get_snapshot(self, req: Request) -> Response:
        snap = await self.svc.get_snapshot(req.args["zone"], req.args["snapshot_id"])
        return json_response(200, {"snapshot": snap.to_api()})

    async def set_snapshot(self, req: Request) -> Response:
        zone, snapshot_id = req.args["zone"], req.args["snapshot_id"]
        body = req.json()
        current = (await self.svc.get_snapshot(zone, snapshot_id)).to_api()
        merged = dict(current)
        for name, value in body.items():
            if name not in current:
                raise InvalidArgument(name, "unknown field")
            if value is None and name not in _NULLABLE_ON_SET:
                continue
            merged[name] = value
        if merged["id"] != current["id"]:
            raise InvalidArgument("id", "must equal the snapshot ID in the path")
        snap = await self.svc.set_snapshot(zone, Snapshot.from_api(merged))
        return json_response(200, {"snapshot": snap.to_api()})

    async def update_snapshot(self, req: Request) -> Response:
        body = req.json()
        _only(body, ("name", "tags"))
        snap = await self.svc.update_snapshot(
            req.args["zone"], req.args["snapshot_id"], name=_typed(body, "name", str),
            tags=_typed(body, "tags", list))
        return json_response(200, {"snapshot": snap.to_api()})

    async def delete_snapshot(self, req: Request) -> Response:
        await self.svc.delete_snapshot(req.args["zone"], req.args["snapshot_id"])
        return Response(204)

    async def export_snapshot(self, req: Request) -> Response:
        body = req.json()
        _only(body, ("bucket", "key"))
        task = await self.svc.export_snapshot(
            req.args["zone"], req.args["snapshot_id"],
            bucket=_typed(body, "bucket", str) or "", key=_typed(body, "key", str) or "")
        return json_response(200, {"task": task.to_api()})

    async def get_task(self, req: Request) -> Response:
        task = await self.svc.get_task(req.args["zone"], req.args["task_id"])
        return json_response(200, {"task": task.to_api()})

    # --- volumes ---------------------------------------------------------------------

    async def list_volumes(self, req: Request) -> Response:
        for unsupported in ("tags", "volume_type"):
            if req.param(unsupported):
                raise InvalidArgument(unsupported, "filter not supported by this server")
        organization = req.param("organization") or None
        project = req.uuid_param("project")  # checked whichever branch answers
        per_page, page_no = req.int_param("per_page"), req.int_param("page")
        page: Page[Volume]
        if organization is not None and not await self._has_organization(organization):
            # A foreign organization owns nothing here: an empty page, still validated.
            check_zone(req.args["zone"])
            check_paging(per_page, page_no)
            page = Page([], 0)
        else:
            page = await self.svc.list_volumes(
                req.args["zone"], project=project,
                name=req.param("name") or None, per_page=per_page, page=page_no)
        return json_response(200, {"volumes": [v.to_api() for v in page.items],
                                   "total_count": page.total_count},
                             _list_headers(page.total_count))

    async def get_volume(self, req: Request) -> Response:
        volume = await self.svc.get_volume(req.args["zone"], req.args["volume_id"])
        return json_response(200, {"volume": volume.to_api()})

    async def _has_organization(self, organization: str) -> bool:
        return any(p.organization == organization for p in await self.svc.list_projects())

    # --- account ---------------------------------------------------------------------

    async def list_projects(self, req: Request) -> Response:
        page = _page_projects(await self.svc.list_projects(), req)
        return json_response(200, {"projects": [_project_api(p) for p in page.items],
                                   "total_count": page.total_count},
                             _list_headers(page.total_count))


_PROJECT_ORDER = {
    "created_at_asc": (lambda p: (p.created_at, p.id), False),
    "created_at_desc": (lambda p: (p.created_at, p.id), True),
    "name_asc": (lambda p: (p.name, p.id), False),
    "name_desc": (lambda p: (p.name, p.id), True),
}


def _page_projects(projects: list[Project], req: Request) -> Page[Project]:
    """The Account API's filters and paging over the service's (short) project list."""
    org = req.param("organization_id") or None
    name = req.param("name") or None
    ids = req.list_param("project_ids")
    order = req.param("order_by") or "created_at_asc"
    if order not in _PROJECT_ORDER:
        raise InvalidArgument("order_by", f"one of {', '.join(_PROJECT_ORDER)}")
    size = req.int_param("page_size")
    page = req.int_param("page")
    size = 50 if size is None else size  # 0 is refused below, not taken for the default
    page = 1 if page is None else page
    if not 1 <= size <= MAX_PER_PAGE:
        raise InvalidArgument("page_size", f"must be between 1 and {MAX_PER_PAGE}")
    if not 1 <= page <= MAX_PAGE:
        raise InvalidArgument("page", f"must be between 1 and {MAX_PAGE}")
    chosen = [p for p in projects
              if (org is None or p.organization == org)
              and (name is None or name in p.name)
              and (ids is None or p.id in ids)]
    key, reverse = _PROJECT_ORDER[order]
    chosen.sort(key=key, reverse=reverse)
    return Page(chosen[(page - 1) * size: page * size], len(chosen))


def _project_api(project: Project) -> dict[str, Any]:
    body = project.to_api()
    # The SDK parses dates strictly: an unknown date is null, never "".
    for name in ("created_at", "updated_at"):
        body[name] = body[name] or None
    return body


def make_app(service: SnapshotService, secret: str | None) -> App:
    """The ASGI app serving ``service``; ``secret`` is SCW_SECRET_KEY when set."""
    paged = PagedLists(version=service.store_version)
    router = Routes(service, paged).router()
    BlockRoutes(service, paged).add_to(router)
    return App(router, secret, on_change=paged.clear)
