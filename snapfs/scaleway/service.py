"""``--backend scaleway``: SnapshotService on the real Instance API through the
official SDK (``scaleway.instance.v1.InstanceV1API``, ``scaleway.account.v3``).

The SDK is synchronous (``requests``): every call runs in a worker thread under
one CapacityLimiter, so the trio thread never waits on the network; 429 and 5xx
answers (and connection failures) are retried with exponential backoff and
jitter, honouring Retry-After; what still fails becomes a domain error
(``snapfs.scaleway.errors``) and so one errno from the one table.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import functools
import logging
import random
from typing import Any, Callable, TypeVar

import requests
import trio
from scaleway import Client
from scaleway.account.v3 import AccountV3ProjectAPI
from scaleway.instance.v1 import InstanceV1API
from scaleway.instance.v1.marshalling import unmarshal_Task
from scaleway.instance.v1.types import SnapshotBaseVolume
from scaleway_core.api import ScalewayException

from ..errors import NotFound
from ..model import (MAX_PER_PAGE, Page, Project, Snapshot, Task, Volume, check_name,
                     check_paging, check_tag_filter, check_tags, check_zone)
from ..objects import ObjectStorage
from ..service import ImageReader, SnapshotService
from . import convert
from .errors import is_retryable, retry_after, to_domain
from .images import CloudImages

log = logging.getLogger("snapfs.scaleway")

T = TypeVar("T")

#: Concurrent SDK calls (threads). requests opens one connection per call.
MAX_THREADS = 8
RETRIES = 5
BACKOFF = 0.25  # seconds, doubled per attempt, capped at BACKOFF_CAP
BACKOFF_CAP = 8.0
#: One attempt of one call (the SDK's requests carry no timeout of their own).
CALL_TIMEOUT = 120.0

#: Exceptions an SDK call raises for API, transport or client-side validation
#: failures; anything else is a bug and propagates as is.
_SDK_ERRORS = (ScalewayException, requests.RequestException, ValueError)


class ScalewayService(SnapshotService):
    def __init__(self, client: Client, zones: list[str], *,
                 staging_bucket: str | None = None,
                 objects: ObjectStorage | None = None,
                 nursery: trio.Nursery | None = None) -> None:
        self.client = client
        self.nursery = nursery  # long-lived: image readers' read-ahead runs there
        self.zones = zones
        self.staging_bucket = staging_bucket
        self.objects = objects
        self.instance = InstanceV1API(client)
        # Lists must span every project the key sees: the SDK would otherwise add
        # the profile's default project/organization as filters to every List.
        unscoped = copy.copy(client)
        unscoped.default_project_id = None
        unscoped.default_organization_id = None
        self._lists = InstanceV1API(unscoped)
        self.account = AccountV3ProjectAPI(client)
        self._limiter = trio.CapacityLimiter(MAX_THREADS)
        self.retries = RETRIES
        self.backoff = BACKOFF
        self.call_timeout = CALL_TIMEOUT
        self.calls = 0  # SDK calls made (retries included); tests and benchmarks read it
        self._targets: dict[str, tuple[str, str]] = {}  # export task id -> (bucket, key)
        self._images: CloudImages | None = None  # made on first use

    async def call(self, what: str, fn: Callable[..., T], **kwargs: Any) -> T:
        """Run one SDK call in a worker thread with retries; domain errors out."""
        attempt = 0
        while True:
            self.calls += 1
            failure: BaseException
            try:
                # The SDK sets no timeout on its requests: give up on (abandon) an
                # attempt that hangs, so a stuck connection costs a retry, not a mount.
                with trio.move_on_after(self.call_timeout):
                    return await trio.to_thread.run_sync(
                        functools.partial(fn, **kwargs), limiter=self._limiter,
                        abandon_on_cancel=True)
                failure = requests.Timeout(f"no answer within {self.call_timeout:g}s")
            except _SDK_ERRORS as exc:
                failure = exc
            if attempt < self.retries and is_retryable(failure):
                delay = retry_after(failure)
                if delay is None:
                    delay = min(self.backoff * 2 ** attempt, BACKOFF_CAP)
                    delay *= 0.5 + random.random() / 2
                log.info("%s: %s; retry %d/%d in %.2fs", what, _short(failure), attempt + 1,
                         self.retries, delay)
                attempt += 1
                await trio.sleep(delay)
                continue
            err = to_domain(failure, what)
            log.info("%s refused: %s", what, err)
            raise err from None

    def _zone(self, zone: str) -> str:
        check_zone(zone)
        if zone not in self.zones:
            raise NotFound("zone", zone)
        return zone

    # --- hierarchy -----------------------------------------------------------------

    async def list_zones(self) -> list[str]:
        return list(self.zones)

    async def list_projects(self) -> list[Project]:
        """Every project of the organization (Account v3), all pages."""
        projects: list[Project] = []
        page = 1
        while True:
            res = await self.call("list projects", self.account.list_projects,
                                  page=page, page_size=MAX_PER_PAGE)
            projects += [convert.project(p) for p in res.projects]
            if not res.projects or len(projects) >= int(res.total_count or 0):
                return projects
            page += 1

    async def list_volumes(self, zone: str, *, project: str | None = None,
                           name: str | None = None, per_page: int | None = None,
                           page: int | None = None) -> Page[Volume]:
        per_page, page = check_paging(per_page, page)
        res = await self.call("list volumes", self._lists.list_volumes, zone=self._zone(zone),
                              project=project, name=name, per_page=per_page, page=page)
        return Page([convert.volume(v) for v in res.volumes], int(res.total_count or 0))

    async def get_volume(self, zone: str, volume_id: str) -> Volume:
        res = await self.call("get volume", self.instance.get_volume, zone=self._zone(zone),
                              volume_id=volume_id)
        return convert.volume(res.volume)

    # --- snapshots -----------------------------------------------------------------

    async def list_snapshots(self, zone: str, *, organization: str | None = None,
                             project: str | None = None, name: str | None = None,
                             tags: list[str] | None = None, base_volume_id: str | None = None,
                             per_page: int | None = None, page: int | None = None
                             ) -> Page[Snapshot]:
        per_page, page = check_paging(per_page, page)
        if tags is not None:
            check_tag_filter(tags)
        res = await self.call(
            "list snapshots", self._lists.list_snapshots, zone=self._zone(zone),
            organization=organization, project=project, name=name,
            tags=",".join(tags) if tags else None, base_volume_id=base_volume_id,
            per_page=per_page, page=page)
        return Page([convert.snapshot(s) for s in res.snapshots], int(res.total_count or 0))

    async def list_all_snapshots(self, zone: str, **filters: Any) -> list[Snapshot]:
        """Every page at per_page 100 (what a directory listing needs)."""
        out: list[Snapshot] = []
        page = 1
        while True:
            res = await self.list_snapshots(zone, per_page=MAX_PER_PAGE, page=page, **filters)
            out += res.items
            if not res.items or len(out) >= res.total_count:
                return out
            page += 1

    async def create_snapshot(self, zone: str, *, name: str, volume_id: str | None = None,
                              tags: list[str] | None = None, project: str | None = None,
                              organization: str | None = None, volume_type: str | None = None,
                              bucket: str | None = None, key: str | None = None,
                              size: int | None = None) -> Snapshot:
        check_name(name)
        if tags is not None:
            tags = check_tags(tags)
        res = await self.call(
            "create snapshot", self.instance.create_snapshot, zone=self._zone(zone), name=name,
            volume_id=volume_id, tags=tags, project=project, organization=organization,
            volume_type=volume_type, bucket=bucket, key=key, size=size)
        return convert.snapshot(res.snapshot)

    async def get_snapshot(self, zone: str, snapshot_id: str) -> Snapshot:
        res = await self.call("get snapshot", self.instance.get_snapshot,
                              zone=self._zone(zone), snapshot_id=snapshot_id)
        return convert.snapshot(res.snapshot)

    async def set_snapshot(self, zone: str, snapshot: Snapshot) -> Snapshot:
        check_name(snapshot.name)
        tags = check_tags(snapshot.tags)
        bv = snapshot.base_volume
        res = await self.call(
            "set snapshot", self.instance._set_snapshot, zone=self._zone(zone),
            snapshot_id=snapshot.id, id=snapshot.id, name=snapshot.name,
            organization=snapshot.organization, project=snapshot.project,
            volume_type=snapshot.volume_type, size=snapshot.size, state=snapshot.state,
            base_volume=None if bv is None else SnapshotBaseVolume(id=bv.id, name=bv.name),
            creation_date=_parse_date(snapshot.creation_date),
            modification_date=_parse_date(snapshot.modification_date), tags=tags)
        return convert.snapshot(res.snapshot)

    async def update_snapshot(self, zone: str, snapshot_id: str, *, name: str | None = None,
                              tags: list[str] | None = None) -> Snapshot:
        if name is not None:
            check_name(name)
        if tags is not None:
            tags = check_tags(tags)
        res = await self.call("update snapshot", self.instance.update_snapshot,
                              zone=self._zone(zone), snapshot_id=snapshot_id, name=name,
                              tags=tags)
        return convert.snapshot(res.snapshot)

    async def delete_snapshot(self, zone: str, snapshot_id: str) -> None:
        # With a staging bucket, image.raw may have exported the snapshot there:
        # that object (named from the snapshot's id and date) goes with it.
        snap = await self.get_snapshot(zone, snapshot_id) if self.staging_bucket else None
        await self.call("delete snapshot", self.instance.delete_snapshot,
                        zone=self._zone(zone), snapshot_id=snapshot_id)
        if snap is not None:
            await self._cloud_images().forget(snap)

    async def export_snapshot(self, zone: str, snapshot_id: str, *, bucket: str,
                              key: str) -> Task:
        res = await self.call("export snapshot", self.instance.export_snapshot,
                              zone=self._zone(zone), snapshot_id=snapshot_id, bucket=bucket,
                              key=key)
        task = convert.task(res.task, zone)
        # The API's Task does not say where it writes; remember it for get_task.
        self._targets[task.id] = (bucket, key)
        return dataclasses.replace(task, bucket=bucket, key=key)

    async def get_task(self, zone: str, task_id: str) -> Task:
        # The generated SDK has no Get Task; the Instance API serves it at /tasks/{id}.
        # The SDK's own transport is used so auth, URL and errors stay the SDK's.
        path = f"/instance/v1/zones/{self._zone(zone)}/tasks/{task_id}"

        def get() -> Any:
            res = self.instance._request("GET", path)
            self.instance._throw_on_error(res)
            return unmarshal_Task(res.json()["task"])

        task = convert.task(await self.call("get task", get), zone)
        bucket, key = self._targets.get(task.id, ("", ""))
        error = None
        if task.status == "failure":
            error = "the export failed (the API does not say why)"
        return dataclasses.replace(task, bucket=bucket, key=key, error=error)

    # --- data ----------------------------------------------------------------------

    async def open_image(self, zone: str, snapshot_id: str) -> ImageReader:
        return await self._cloud_images().open(self._zone(zone), snapshot_id)

    def _cloud_images(self) -> CloudImages:
        if self._images is None:
            self._images = CloudImages(self, self.staging_bucket, self.objects, self.nursery)
        return self._images

    async def aclose(self) -> None:
        # Worker threads are abandoned on cancel; nothing of ours is left half-done.
        if self._images is not None:
            await self._images.aclose()


def _parse_date(value: str) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(value)


def _short(exc: BaseException) -> str:
    if isinstance(exc, ScalewayException):
        return f"HTTP {exc.status_code}"
    return type(exc).__name__

