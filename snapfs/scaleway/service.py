"""``--backend scaleway``: SnapshotService on the real Instance and Block Storage
APIs through the official SDK (``scaleway.instance.v1.InstanceV1API``,
``scaleway.block.v1.BlockV1API`` in ``.block``, ``scaleway.account.v3``).

Both APIs in one tree: lists merge the two (a snapshot or volume the Block API
knows is the Block one, even when the Instance API lists it too, as Scaleway's
does), and every operation goes to the API that owns the resource -- learnt from
listings and gets, else asked of Block first (where Scaleway keeps block
volumes since 2025), then Instance. A merged list is fetched whole at page 1 and
later pages of the same query are cut from it (merged.py), so the
pages of one listing are consistent and a listing costs one pass over each API.

The SDK is synchronous (``requests``): every call runs in a worker thread under
one CapacityLimiter, so the trio thread never waits on the network; 429 and 5xx
answers (and connection failures) are retried with exponential backoff and
jitter, honouring Retry-After up to RETRY_AFTER_CAP, each attempt bounded by
CALL_TIMEOUT and the whole call by CALL_DEADLINE; what still fails becomes a
domain error (``snapfs.scaleway.errors``) and so one errno from the one table.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import functools
import logging
import random
from typing import Any, Awaitable, Callable, TypeVar

import requests
import trio
from scaleway import Client
from scaleway.account.v3 import AccountV3ProjectAPI
from scaleway.instance.v1 import InstanceV1API
from scaleway.instance.v1.marshalling import unmarshal_Task
from scaleway.instance.v1.types import SnapshotBaseVolume
from scaleway_core.api import ScalewayException

from ..errors import NotFound, PermissionDenied
from ..lru import LRUDict
from ..model import (MAX_PER_PAGE, Page, Project, Snapshot, Task, Volume, check_name,
                     check_paging, check_tag_filter, check_tags, check_zone, new_id)
from ..objects import ObjectStorage, check_object_target
from ..service import ImageReader, SnapshotService
from . import convert
from .block import BlockSide
from .errors import (GuardedAPI, is_not_found, is_retryable, retry_after, to_domain,
                     unanswered_safely)
from .images import STAGING_PREFIX, CloudImages
from .merged import MergedLists
from .outcomes import BlockOutcomes, InstanceExports
from .timeouts import attempt_timeout, install as install_timeouts

log = logging.getLogger("snapfs.scaleway")
install_timeouts()  # the SDK's requests carry none of their own


class _InstanceAPI(GuardedAPI, InstanceV1API):
    """Instance's SDK API; error answers that are not JSON judged by status."""


class _AccountAPI(GuardedAPI, AccountV3ProjectAPI):
    """Account's SDK API; error answers that are not JSON judged by status."""

T = TypeVar("T")

#: Concurrent SDK calls (threads). requests opens one connection per call.
MAX_THREADS = 8
RETRIES = 5
BACKOFF = 0.25  # seconds, doubled per attempt, capped at BACKOFF_CAP
BACKOFF_CAP = 8.0
#: Longest wait a server's Retry-After gets: one asking an hour would hold a `ls`
#: (and a worker thread's caller) for an hour; the call's deadline bounds the rest.
RETRY_AFTER_CAP = 8.0
#: One attempt of one call (the SDK's requests carry no timeout of their own).
CALL_TIMEOUT = 20.0
#: One call, every attempt and wait included: a filesystem request is answered
#: (EAGAIN: try again) by then, whatever the API does.
CALL_DEADLINE = 30.0
#: The Instance API's own snapshot types since 2025 (block snapshots are the Block
#: API's): its List is asked for these only (its ``volume_type`` filter), one list
#: each, so its pages do not repeat the Block snapshots. An API that ignored the
#: filter would answer every snapshot to each: still merged once, only slower.
INSTANCE_SNAPSHOT_TYPES = ("l_ssd", "unified")
#: Resources whose owning API is remembered (most recent first): one forgotten is
#: asked of Block, then Instance, again -- a call more, never a wrong route.
OWNER_MAX = 100_000
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
        self.instance = _InstanceAPI(client)
        # Lists must span every project the key sees: the SDK would otherwise add
        # the profile's default project/organization as filters to every List.
        unscoped = copy.copy(client)
        unscoped.default_project_id = None
        unscoped.default_organization_id = None
        self._lists = _InstanceAPI(unscoped)
        self.account = _AccountAPI(client)
        self._limiter = trio.CapacityLimiter(MAX_THREADS)
        self.retries = RETRIES
        self.backoff = BACKOFF
        self.call_timeout = CALL_TIMEOUT
        self.call_deadline = CALL_DEADLINE
        self.retry_after_cap = RETRY_AFTER_CAP
        self.calls = 0  # SDK calls made (retries included); tests and benchmarks read it
        #: Instance exports: where each task writes, its status checked (outcomes.py).
        self._exports = InstanceExports(objects)
        self._images: CloudImages | None = None  # made on first use
        self.block = BlockSide(self, client)
        #: snapshot or volume id -> "block" | "instance": the API that owns it.
        self._owner: LRUDict[str, str] = LRUDict(OWNER_MAX)
        #: query -> (fetched at, merged items) for paging through a merged list.
        self._merged = MergedLists(self._owner)  # merged.py
        #: Block exports (no task: made up) and imports (no reason when they fail).
        self.outcomes = BlockOutcomes(objects)

    async def call(self, what: str, fn: Callable[..., T], *, creates: bool = False,
                   deletes: bool = False, **kwargs: Any) -> T:
        """Run one SDK call in a worker thread with retries; domain errors out.
        The whole call, retries and waits included, ends by ``call_deadline``:
        a retry that would not fit is not made, and what failed last decides
        the error (EAGAIN for a timeout, a 429 or a 5xx).

        ``creates``: a POST that makes something (a snapshot, an export) is
        tried again only when the failed attempt surely did nothing (errors.
        unanswered_safely): a late answer retried made two snapshots of one
        mkdir. ``deletes``: a retried DELETE answered 404 was done by an earlier
        attempt whose answer was lost (rmdir said ENOENT after deleting)."""
        deadline = trio.current_time() + self.call_deadline
        attempt = 0
        while True:
            self.calls += 1
            failure: BaseException
            timeout = max(0.0, min(self.call_timeout, deadline - trio.current_time()))
            try:
                # The SDK sets no timeout on its requests: give up on (abandon) an
                # attempt that hangs, so a stuck connection costs a retry, not a mount.
                attempt_timeout.set(max(timeout, 0.1))  # the worker's sockets too
                with trio.move_on_after(timeout):
                    return await trio.to_thread.run_sync(
                        functools.partial(fn, **kwargs), limiter=self._limiter,
                        abandon_on_cancel=True)
                failure = requests.Timeout(f"no answer within {timeout:g}s")
            except _SDK_ERRORS as exc:
                failure = exc
            if deletes and attempt > 0 and is_not_found(failure):
                log.info("%s: gone on retry %d: an earlier attempt did it", what, attempt)
                return None  # type: ignore[return-value]
            if attempt < self.retries and is_retryable(failure) and \
                    (not creates or unanswered_safely(failure)):
                delay = retry_after(failure)
                if delay is None:
                    delay = min(self.backoff * 2 ** attempt, BACKOFF_CAP)
                    delay *= 0.5 + random.random() / 2
                delay = min(delay, self.retry_after_cap)
                if trio.current_time() + delay < deadline:
                    log.info("%s: %s; retry %d/%d in %.2fs", what, _short(failure),
                             attempt + 1, self.retries, delay)
                    attempt += 1
                    await trio.sleep(delay)
                    continue
            err = to_domain(failure, what)
            # DEBUG: the filesystem's errno line (fs/ops.py) or the HTTP front end
            # reports the refusal; one line per refusal, not one per layer.
            log.debug("%s refused: %s", what, err)
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
        self._zone(zone)

        async def instance_page(p: int) -> Page[Volume]:
            res = await self.call("list volumes", self._lists.list_volumes, zone=zone,
                                  project=project, name=name, per_page=MAX_PER_PAGE, page=p)
            return Page([convert.volume(v) for v in res.volumes], int(res.total_count or 0))

        return await self._merged.page(
            ("volumes", zone, project, name), per_page, page, [instance_page],
            lambda p: self.block.list_volumes(zone, project=project, name=name, page=p),
            lambda v: (v.creation_date, v.id))

    async def get_volume(self, zone: str, volume_id: str) -> Volume:
        zone = self._zone(zone)

        async def instance() -> Volume:
            res = await self.call("get volume", self.instance.get_volume, zone=zone,
                                  volume_id=volume_id)
            return convert.volume(res.volume)

        return await self._routed(volume_id, lambda: self.block.get_volume(zone, volume_id),
                                  instance)

    # --- routing between the two APIs ------------------------------------------------

    async def _routed(self, ident: str, block: Callable[[], Awaitable[T]],
                      instance: Callable[[], Awaitable[T]]) -> T:
        """Run the owning API's call; an unknown owner is asked of Block, then Instance."""
        owner = self._owner.get(ident)
        if owner == "instance":
            return await instance()
        if owner == "block":
            return await block()
        try:
            result = await block()
        except NotFound:
            result = await instance()
            self._owner[ident] = "instance"
        else:
            self._owner[ident] = "block"
        return result

    async def _list_json(self, what: str, api: Any, path: str, params: dict[str, Any],
                         key: str, convert_item: Callable[[dict[str, Any]], T]) -> Page[T]:
        """One page of a List through the SDK's transport (auth, URL, errors), its
        JSON turned into the model in the worker thread: the SDK's unmarshalling
        (dateutil per date) and ours back were most of the mount's listing time."""
        def get() -> Page[T]:
            res = api._request("GET", path, params=params)
            api._throw_on_error(res)
            data = res.json()
            total = res.headers.get("x-total-count") or data.get("total_count") or 0
            return Page([convert_item(d) for d in data.get(key) or []], int(total))

        return await self.call(what, get)

    async def _is_block(self, zone: str, snapshot_id: str) -> bool:
        if snapshot_id not in self._owner:
            await self.get_snapshot(zone, snapshot_id)
        return self._owner.get(snapshot_id) == "block"

    # --- snapshots -----------------------------------------------------------------

    async def list_snapshots(self, zone: str, *, organization: str | None = None,
                             project: str | None = None, name: str | None = None,
                             tags: list[str] | None = None, base_volume_id: str | None = None,
                             per_page: int | None = None, page: int | None = None
                             ) -> Page[Snapshot]:
        per_page, page = check_paging(per_page, page)
        if tags is not None:
            check_tag_filter(tags)
        self._zone(zone)

        def instance_pages(volume_type: str) -> Callable[[int], Awaitable[Page[Snapshot]]]:
            async def instance_page(p: int) -> Page[Snapshot]:
                return await self._list_json(
                    "list snapshots", self._lists, f"/instance/v1/zones/{zone}/snapshots",
                    {"organization": organization, "project": project, "name": name,
                     "tags": ",".join(tags) if tags else None,
                     "base_volume_id": base_volume_id, "volume_type": volume_type,
                     "per_page": MAX_PER_PAGE, "page": p},
                    "snapshots", lambda d: _instance(convert.snapshot_json(d)))
            return instance_page

        res = await self._merged.page(
            ("snapshots", zone, organization, project, name, tuple(tags or ()), base_volume_id),
            per_page, page, [instance_pages(t) for t in INSTANCE_SNAPSHOT_TYPES],
            lambda p: self.block.list_snapshots(
                zone, organization=organization, project=project, name=name, tags=tags,
                base_volume_id=base_volume_id, page=p),
            lambda s: (s.creation_date, s.id))
        if self.outcomes.imports:  # failed imports of ours: say why (looked up once)
            res = Page([await self.outcomes.explained(s) for s in res.items],
                       res.total_count)
        return res


    async def create_snapshot(self, zone: str, *, name: str, volume_id: str | None = None,
                              tags: list[str] | None = None, project: str | None = None,
                              organization: str | None = None, volume_type: str | None = None,
                              bucket: str | None = None, key: str | None = None,
                              size: int | None = None, unique_name: bool = False) -> Snapshot:
        # unique_name: the cloud has no atomic check; the caller's listing is all.
        check_name(name)
        if tags is not None:
            tags = check_tags(tags)
        zone = self._zone(zone)
        if volume_id is None:  # an import: S3's rules checked here, as the local store's
            bucket, key = check_object_target(bucket, key)
        snap: Snapshot | None = None
        if volume_id is not None:
            await self.get_volume(zone, volume_id)  # learns which API owns the volume
            if self._owner.get(volume_id) == "block":
                snap = await self.block.create_snapshot(zone, name=name, volume_id=volume_id,
                                                        tags=tags, project=project)
        elif volume_type != "l_ssd" and bucket is not None and key is not None:
            # The Instance API no longer makes block snapshots: imports go to Block
            # (an l_ssd import still goes to Instance, should the API accept it).
            snap = await self.block.import_snapshot(zone, name=name, bucket=bucket, key=key,
                                                    tags=tags, project=project, size=size)
            self.outcomes.imports[snap.id] = (bucket, key, size)
        if snap is not None:
            self._owner[snap.id] = "block"
            self._merged.clear()
            return snap
        res = await self.call(
            "create snapshot", self.instance.create_snapshot, creates=True, zone=zone, name=name,
            volume_id=volume_id, tags=tags, project=project, organization=organization,
            volume_type=volume_type, bucket=bucket, key=key, size=size)
        self._owner[res.snapshot.id] = "instance"
        self._merged.clear()
        return _instance(convert.snapshot(res.snapshot))

    async def get_snapshot(self, zone: str, snapshot_id: str) -> Snapshot:
        zone = self._zone(zone)

        async def instance() -> Snapshot:
            res = await self.call("get snapshot", self.instance.get_snapshot, zone=zone,
                                  snapshot_id=snapshot_id)
            return _instance(convert.snapshot(res.snapshot))

        return await self.outcomes.explained(await self._routed(
            snapshot_id, lambda: self.block.get_snapshot(zone, snapshot_id), instance))

    async def set_snapshot(self, zone: str, snapshot: Snapshot) -> Snapshot:
        check_name(snapshot.name)
        tags = check_tags(snapshot.tags)
        if await self._is_block(zone, snapshot.id):
            # Block has no Set: the read-only fields must be unchanged, then an Update.
            snapshot.check_set(await self.get_snapshot(zone, snapshot.id))
            return await self.update_snapshot(zone, snapshot.id, name=snapshot.name, tags=tags)
        bv = snapshot.base_volume
        res = await self.call(
            "set snapshot", self.instance._set_snapshot, zone=self._zone(zone),
            snapshot_id=snapshot.id, id=snapshot.id, name=snapshot.name,
            organization=snapshot.organization, project=snapshot.project,
            volume_type=snapshot.volume_type, size=snapshot.size, state=snapshot.state,
            base_volume=None if bv is None else SnapshotBaseVolume(id=bv.id, name=bv.name),
            creation_date=_parse_date(snapshot.creation_date),
            modification_date=_parse_date(snapshot.modification_date), tags=tags)
        self._merged.clear()
        return _instance(convert.snapshot(res.snapshot))

    async def update_snapshot(self, zone: str, snapshot_id: str, *, name: str | None = None,
                              tags: list[str] | None = None,
                              unique_name: bool = False) -> Snapshot:
        # unique_name: the cloud has no atomic check; the caller's listing is all.
        if name is not None:
            check_name(name)
        if tags is not None:
            tags = check_tags(tags)
        zone = self._zone(zone)
        self._merged.clear()
        if await self._is_block(zone, snapshot_id):
            return await self.block.update_snapshot(zone, snapshot_id, name=name, tags=tags)
        res = await self.call("update snapshot", self.instance.update_snapshot,
                              zone=zone, snapshot_id=snapshot_id, name=name, tags=tags)
        return _instance(convert.snapshot(res.snapshot))

    async def delete_snapshot(self, zone: str, snapshot_id: str) -> None:
        # With a staging bucket, image.raw may have exported the snapshot there:
        # that object (named from the snapshot's id and date) goes with it.
        snap = await self.get_snapshot(zone, snapshot_id) if self.staging_bucket else None
        self._merged.clear()
        if await self._is_block(zone, snapshot_id):
            await self.block.delete_snapshot(self._zone(zone), snapshot_id)
        else:
            await self.call("delete snapshot", self.instance.delete_snapshot, deletes=True,
                            zone=self._zone(zone), snapshot_id=snapshot_id)
        self._forget(snapshot_id)
        if snap is not None:
            await self._cloud_images().forget(snap)

    def _forget(self, snapshot_id: str) -> None:
        """A deleted snapshot's bookkeeping goes with it."""
        self._owner.pop(snapshot_id, None)
        self.outcomes.forget(snapshot_id)

    async def export_snapshot(self, zone: str, snapshot_id: str, *, bucket: str,
                              key: str) -> Task:
        await self._is_block(zone, snapshot_id)  # an unknown snapshot: NotFound first
        bucket, key = check_object_target(bucket, key)
        if bucket == self.staging_bucket and key.startswith(STAGING_PREFIX):
            # The staged images reads are served from: an export written there
            # under another snapshot's key made that snapshot read these bytes.
            raise PermissionDenied(f"s3://{bucket}/{STAGING_PREFIX} holds this mount's "
                                   "staged images: export somewhere else")
        return await self._export_snapshot(zone, snapshot_id, bucket=bucket, key=key)

    async def _export_snapshot(self, zone: str, snapshot_id: str, *, bucket: str,
                               key: str) -> Task:
        """Any export, the staging ones (images.py) included."""
        block = await self._is_block(zone, snapshot_id)  # an unknown snapshot: NotFound
        bucket, key = check_object_target(bucket, key)
        if block:
            # Before the request: an object written by this export is dated after it.
            started = dt.datetime.now(dt.timezone.utc)
            snap = await self.block.export_snapshot(self._zone(zone), snapshot_id,
                                                    bucket=bucket, key=key)
            # Block answers the snapshot, no task: one is made up here, whose
            # status get_task derives from the snapshot's.
            task_id = new_id()
            self.outcomes.export_started(task_id, zone, snapshot_id, bucket, key, started)
            return await self.outcomes.task(task_id, zone, snap, bucket, key)
        size = (await self.get_snapshot(zone, snapshot_id)).size if self.objects else 0
        started = dt.datetime.now(dt.timezone.utc)
        res = await self.call("export snapshot", self.instance.export_snapshot, creates=True,
                              zone=self._zone(zone), snapshot_id=snapshot_id, bucket=bucket,
                              key=key)
        task = convert.task(res.task, zone)
        # The API's Task does not say where it writes; remembered for get_task.
        self._exports.started(task.id, bucket, key, size, started)
        return await self._exports.checked(task)

    async def latest_export(self, zone: str, snapshot_id: str) -> Task | None:
        """A Block snapshot's export: the one asked for in this process, else one
        under way (its status says ``exporting``), derived from the snapshot."""
        if not await self._is_block(zone, snapshot_id):
            return None
        known = self.outcomes.last_export.get(snapshot_id)
        if known is not None:
            return await self.get_task(zone, known)
        snap = await self.get_snapshot(zone, snapshot_id)
        if snap.state != "exporting":
            return None
        return await self.outcomes.task(snapshot_id, zone, snap, "", "")

    async def get_task(self, zone: str, task_id: str) -> Task:
        block_export = self.outcomes.exports.get(task_id)
        if block_export is not None:
            _, snapshot_id, bucket, key, _ = block_export
            snap = await self.get_snapshot(zone, snapshot_id)
            return await self.outcomes.task(task_id, zone, snap, bucket, key)
        # The generated SDK has no Get Task; the Instance API serves it at /tasks/{id}.
        # The SDK's own transport is used so auth, URL and errors stay the SDK's.
        path = f"/instance/v1/zones/{self._zone(zone)}/tasks/{task_id}"

        def get() -> Any:
            res = self.instance._request("GET", path)
            self.instance._throw_on_error(res)
            return unmarshal_Task(res.json()["task"])

        return await self._exports.checked(convert.task(await self.call("get task", get),
                                                        zone))

    # --- data ----------------------------------------------------------------------

    async def open_image(self, zone: str, snapshot_id: str) -> ImageReader:
        return await self._cloud_images().open(self._zone(zone), snapshot_id)

    def _cloud_images(self) -> CloudImages:
        if self._images is None:
            self._images = CloudImages(self, self.staging_bucket, self.objects, self.nursery,
                                       self._export_snapshot)
        return self._images

    async def aclose(self) -> None:
        # Worker threads are abandoned on cancel; nothing of ours is left half-done.
        if self._images is not None:
            await self._images.aclose()


def _instance(snap: Snapshot) -> Snapshot:
    return dataclasses.replace(snap, api="instance")


def _parse_date(value: str) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(value)


def _short(exc: BaseException) -> str:
    if isinstance(exc, ScalewayException):
        return f"HTTP {exc.status_code}"
    return type(exc).__name__

