"""The Scaleway cloud backend (official SDK) against `snapfs serve` over HTTP:
the same operations and the same refusals (one errno each) as the local backend."""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
import trio

from fixtures_http import ACCESS_KEY, SECRET, Served
from fixtures_store import lssd_volume
from snapfs.errors import (InvalidArgument, NotConfigured, NotFound, PermissionDenied, SnapfsError,
                           Transient, errno_for)
from snapfs.local import open_local_service
from snapfs.scaleway import ScalewayService, open_scaleway_service
from snapfs.scaleway import service as scw_service
from snapfs.scaleway.config import load_client, zones_for


@pytest.fixture
def scw_env(served: Served, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Served:
    """SCW_* pointing at the served store; no config file."""
    monkeypatch.setenv("SCW_CONFIG_PATH", str(tmp_path / "absent.yaml"))
    monkeypatch.delenv("SCW_PROFILE", raising=False)
    for name, value in (("SCW_ACCESS_KEY", ACCESS_KEY), ("SCW_SECRET_KEY", SECRET),
                        ("SCW_API_URL", served.url), ("SCW_DEFAULT_ZONE", "fr-par-1"),
                        ("SCW_DEFAULT_PROJECT_ID", served.default_project),
                        ("SCW_DEFAULT_ORGANIZATION_ID", served.organization)):
        monkeypatch.setenv(name, value)
    return served


async def _wait_available(svc: Any, zone: str, sid: str) -> Any:
    with trio.fail_after(60):
        while True:
            snap = await svc.get_snapshot(zone, sid)
            if snap.state == "available":
                return snap
            await trio.sleep(0.05)


async def _refusal(fn: Callable[[], Awaitable[Any]]) -> SnapfsError:
    with pytest.raises(SnapfsError) as exc:
        await fn()
    return exc.value


def test_config_file_profiles_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SCW_"):
            monkeypatch.delenv(name)
    cfg = tmp_path / "config.yaml"
    org, proj = str(uuid.uuid4()), str(uuid.uuid4())
    cfg.write_text(f"""
access_key: {ACCESS_KEY}
secret_key: {uuid.uuid4()}
default_zone: nl-ams-1
default_organization_id: {org}
profiles:
  other:
    secret_key: {SECRET}
    default_project_id: {proj}
    default_zone: pl-waw-2
    api_url: http://127.0.0.1:1/
""")
    monkeypatch.setenv("SCW_CONFIG_PATH", str(cfg))
    top = load_client()
    assert (top.default_zone, top.default_organization_id) == ("nl-ams-1", org)
    assert top.api_url == "https://api.scaleway.com"
    other = load_client("other")
    assert (other.secret_key, other.default_project_id, other.default_zone) == (
        SECRET, proj, "pl-waw-2")
    assert other.api_url == "http://127.0.0.1:1" and other.access_key == ACCESS_KEY
    monkeypatch.setenv("SCW_PROFILE", "other")
    assert load_client().default_zone == "pl-waw-2"
    # The environment overrides the file.
    monkeypatch.setenv("SCW_DEFAULT_ZONE", "fr-par-2")
    monkeypatch.setenv("SCW_API_URL", "http://localhost:9")
    env = load_client("other")
    assert (env.default_zone, env.api_url) == ("fr-par-2", "http://localhost:9")
    assert zones_for(env, ["nl-ams-1", "fr-par-2", " pl-waw-1"]) == [
        "fr-par-2", "nl-ams-1", "pl-waw-1"]
    with pytest.raises(InvalidArgument, match="zone"):
        zones_for(env, ["mars-1"])
    with pytest.raises(InvalidArgument, match="nope"):
        load_client("nope")
    monkeypatch.setenv("SCW_SECRET_KEY", "not-a-uuid")
    with pytest.raises(InvalidArgument, match="secret key"):
        load_client("other")


@pytest.mark.s3
async def test_operations(scw_env: Served, s3_server: Any) -> None:
    served = scw_env
    tag = f"t{uuid.uuid4().hex[:10]}"
    # Object Storage on the client's side: a Block export has no task, its outcome is
    # checked there (the server below has none: its exports fail).
    objects = s3_server.objects()
    async with open_scaleway_service(["nl-ams-1", "fr-par-1"], objects=objects) as svc:
        assert await svc.list_zones() == ["fr-par-1", "nl-ams-1"]
        projects = {p.name: p for p in await svc.list_projects()}
        assert projects["default"].id == served.default_project
        assert projects["other"].id == served.other_project
        # Lists span every project, not just the profile's default one.
        vols = (await svc.list_volumes("fr-par-1")).items
        assert {v.name for v in vols} == {"vol-a", "vol-b"}
        a = served.volumes["vol-a"]
        vol = await svc.get_volume("fr-par-1", a["id"])
        assert (vol.name, vol.size, vol.project) == ("vol-a", a["size"], served.default_project)

        snap = await svc.create_snapshot("fr-par-1", name="cloud", volume_id=a["id"],
                                         tags=[tag])
        assert snap.base_volume is not None and snap.base_volume.id == a["id"]
        snap = await _wait_available(svc, "fr-par-1", snap.id)
        assert snap.size == a["size"] and snap.tags == [tag]
        other = await svc.create_snapshot("fr-par-1", name="cloud-other", tags=[tag],
                                          volume_id=served.volumes["vol-b"]["id"],
                                          project=served.other_project)
        await _wait_available(svc, "fr-par-1", other.id)
        page = await svc.list_snapshots("fr-par-1", tags=[tag], per_page=1, page=2)
        assert page.total_count == 2 and len(page.items) == 1
        every = await svc.list_all_snapshots("fr-par-1", tags=[tag])
        assert {s.id for s in every} == {snap.id, other.id}
        only = await svc.list_snapshots("fr-par-1", tags=[tag], project=served.other_project)
        assert [s.id for s in only.items] == [other.id]
        by_vol = await svc.list_snapshots("fr-par-1", base_volume_id=a["id"], name="cloud")
        assert snap.id in {s.id for s in by_vol.items}

        upd = await svc.update_snapshot("fr-par-1", snap.id, name="renamed", tags=[tag, "b"])
        assert (upd.name, upd.tags) == ("renamed", [tag, "b"])
        cur = await svc.get_snapshot("fr-par-1", snap.id)
        assert cur == upd
        replaced = await svc.set_snapshot(
            "fr-par-1", type(cur)(**{**cur.__dict__, "name": "set", "tags": ["c"]}))
        assert (replaced.name, replaced.tags, replaced.creation_date) == (
            "set", ["c"], cur.creation_date)

        # No Object Storage behind this server: the export is refused when asked,
        # saying so, and the snapshot stays available.
        err = await _refusal(lambda: svc.export_snapshot("fr-par-1", snap.id, bucket="bkt",
                                                         key="k.qcow2"))
        assert "Object Storage is not configured" in str(err)
        await _wait_available(svc, "fr-par-1", snap.id)

        for sid in (snap.id, other.id):
            await svc.delete_snapshot("fr-par-1", sid)
        err = await _refusal(lambda: svc.get_snapshot("fr-par-1", snap.id))
        assert isinstance(err, NotFound) and err.resource == "snapshot"
        assert errno_for(err) == errno.ENOENT
    await objects.aclose()


async def test_same_refusals_as_local(scw_env: Served) -> None:
    """Each refusal from the cloud backend (through HTTP and the SDK) is the same
    kind, with the same errno, as the local backend's own for the same call."""
    served = scw_env
    missing = str(uuid.uuid4())
    a = served.volumes["vol-a"]
    calls: list[tuple[str, Callable[[Any], Awaitable[Any]]]] = [
        ("unknown snapshot", lambda s: s.get_snapshot("fr-par-1", missing)),
        ("unknown volume", lambda s: s.get_volume("fr-par-1", missing)),
        ("snapshot of unknown volume",
         lambda s: s.create_snapshot("fr-par-1", name="x", volume_id=missing)),
        ("import size", lambda s: s.create_snapshot("fr-par-1", name="x", bucket="bkt",
                                                    key="k", size=1000)),
        ("import without key", lambda s: s.create_snapshot("fr-par-1", name="x",
                                                           bucket="bkt", key="")),
        # S3's bucket rules, checked before any call (the cloud's were not checked):
        ("import from an IP bucket", lambda s: s.create_snapshot(
            "fr-par-1", name="x", bucket="10.0.0.1", key="k")),
        ("export to an IP bucket", lambda s: s.export_snapshot(
            "fr-par-1", missing, bucket="10.0.0.1", key="k")),
        ("per_page", lambda s: s.list_snapshots("fr-par-1", per_page=101)),
        ("bad name", lambda s: s.create_snapshot("fr-par-1", name="a/b", volume_id=a["id"])),
        ("volume of another zone",
         lambda s: s.create_snapshot("nl-ams-1", name="x", volume_id=a["id"])),
        ("delete unknown", lambda s: s.delete_snapshot("fr-par-1", missing)),
        ("export unknown", lambda s: s.export_snapshot("fr-par-1", missing, bucket="bkt",
                                                       key="k")),
    ]
    async with open_local_service(served.store) as local, \
            open_scaleway_service(["nl-ams-1"]) as cloud:
        before = (await local.list_snapshots("fr-par-1", per_page=100)).total_count
        for what, call in calls:
            mine = await _refusal(lambda: call(local))
            theirs = await _refusal(lambda: call(cloud))
            assert (type(theirs), errno_for(theirs)) == (type(mine), errno_for(mine)), what
            if isinstance(mine, InvalidArgument):
                assert isinstance(theirs, InvalidArgument) and theirs.field == mine.field
        assert (await local.list_snapshots("fr-par-1", per_page=100)).total_count == before
        err = await _refusal(lambda: cloud.list_snapshots("pl-waw-3"))  # zone not shown
        assert isinstance(err, NotFound) and errno_for(err) == errno.ENOENT


async def test_a_server_without_object_storage_is_not_asked_again(scw_env: Served) -> None:
    """`snapfs serve` without Object Storage refuses an export with 501 (NotConfigured):
    the backend took that for a server fault and asked six times over ~5 s, then
    answered EBUSY; it is NotConfigured (ENXIO) at once, as the local backend's."""
    served = scw_env
    async with open_local_service(served.store) as local, \
            open_scaleway_service(["fr-par-1"]) as cloud:
        snap = await local.create_snapshot("fr-par-1", name="no-s3",
                                           volume_id=served.volumes["vol-a"]["id"])
        await _wait_available(local, "fr-par-1", snap.id)
        mine = await _refusal(lambda: local.export_snapshot("fr-par-1", snap.id,
                                                            bucket="bkt", key="k"))
        calls = cloud.calls
        with trio.fail_after(2):
            theirs = await _refusal(lambda: cloud.export_snapshot("fr-par-1", snap.id,
                                                                  bucket="bkt", key="k"))
        assert cloud.calls - calls <= 3  # which API owns it, its Get, the export: once each
        assert type(theirs) is type(mine) is NotConfigured
        assert errno_for(theirs) == errno.ENXIO
        assert (await local.get_snapshot("fr-par-1", snap.id)).state == "available"
        await local.delete_snapshot("fr-par-1", snap.id)


async def test_bookkeeping_stays_bounded(scw_env: Served,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Which API owns a resource is remembered for at most OWNER_MAX of them: one
    forgotten is asked again and still routed to its own API; a deleted snapshot is
    forgotten at once. (A mount that runs for months lists and deletes without bound.)"""
    served = scw_env
    monkeypatch.setattr(scw_service, "OWNER_MAX", 3)
    with lssd_volume(served.store) as (_, lssd):
        async with open_scaleway_service(["fr-par-1"]) as svc:
            made = {}
            for i, (vol, api) in enumerate([(served.volumes["vol-a"]["id"], "block")] * 3
                                           + [(lssd, "instance")] * 2):
                snap = await svc.create_snapshot("fr-par-1", name=f"bounded-{i}",
                                                 volume_id=vol)
                made[snap.id] = api
                await _wait_available(svc, "fr-par-1", snap.id)
            listed = await svc.list_all_snapshots("fr-par-1")
            assert set(made) <= {s.id for s in listed}
            assert len(svc._owner) <= 3
            for sid, api in made.items():  # forgotten or not, each goes to its own API
                renamed = await svc.update_snapshot("fr-par-1", sid, name=f"r-{sid[:8]}")
                assert (renamed.api, renamed.name) == (api, f"r-{sid[:8]}")
                assert len(svc._owner) <= 3
            calls = svc.calls
            for sid in made:
                await svc.delete_snapshot("fr-par-1", sid)
                assert sid not in svc._owner
            assert svc.calls > calls
            for sid in made:
                err = await _refusal(lambda: svc.get_snapshot("fr-par-1", sid))
                assert isinstance(err, NotFound)


async def test_wrong_credentials(scw_env: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCW_SECRET_KEY", str(uuid.uuid4()))
    async with open_scaleway_service() as svc:
        err = await _refusal(lambda: svc.list_snapshots("fr-par-1"))
    assert isinstance(err, PermissionDenied) and errno_for(err) == errno.EACCES


class Flaky:
    """ASGI middleware in front of the real app: answers the scripted statuses
    first (429 with Retry-After, 5xx), optionally slowly, then passes through."""

    def __init__(self, app: Any, script: list[int], delay: float = 0.0) -> None:
        self.app, self.script, self.delay = app, list(script), delay
        self.seen = 0
        self.retry_after = b"0"  # the Retry-After its 429s carry
        self.arrivals: list[float] = []  # trio.current_time() of each request

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.arrivals.append(trio.current_time())
        if scope["type"] != "http" or not self.script:
            if scope["type"] == "http":
                self.seen += 1
            await self.app(scope, receive, send)
            return
        self.seen += 1
        status = self.script.pop(0)
        await trio.sleep(self.delay)
        headers = [(b"content-type", b"application/json")]
        if status == 429:
            headers.append((b"retry-after", self.retry_after))
        body = b'{"type": "transient_error", "message": "try again"}'
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def flaky(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Flaky]:
    """A flaky front on an in-process server over its own store; SCW_* point at it."""
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    from snapfs.http.routes import make_app

    async with open_local_service(tmp_path / "store") as local:
        front = Flaky(make_app(local, SECRET), [])
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                lambda task_status: hypercorn_serve(front, config, task_status=task_status))
            monkeypatch.setenv("SCW_CONFIG_PATH", str(tmp_path / "absent.yaml"))
            monkeypatch.setenv("SCW_ACCESS_KEY", ACCESS_KEY)
            monkeypatch.setenv("SCW_SECRET_KEY", SECRET)
            monkeypatch.setenv("SCW_API_URL", binds[0])
            monkeypatch.delenv("SCW_DEFAULT_PROJECT_ID", raising=False)
            monkeypatch.delenv("SCW_DEFAULT_ORGANIZATION_ID", raising=False)
            yield front
            nursery.cancel_scope.cancel()


async def test_retries_429_and_5xx(flaky: Flaky) -> None:
    async with open_scaleway_service() as svc:
        svc.backoff = 0.01
        flaky.script = [503, 429, 502, 500]
        # (A call to one API: lists of snapshots ask two, Instance and Block, at once.)
        assert [p.name for p in await svc.list_projects()] == ["default"]
        assert flaky.seen == 5 and svc.calls == 5

        flaky.script = [503] * (svc.retries + 1)
        flaky.seen = 0
        err = await _refusal(svc.list_projects)
        assert isinstance(err, Transient) and errno_for(err) == errno.EAGAIN
        assert flaky.seen == svc.retries + 1

        # A 4xx is an answer, not a hiccup: never retried.
        flaky.seen = 0
        await _refusal(lambda: svc.get_snapshot("fr-par-1", str(uuid.uuid4())))
        assert flaky.seen == 2  # an unknown id is asked of Block, then Instance: once each

        # An attempt that hangs is abandoned after call_timeout and retried.
        svc.call_timeout = 0.3
        flaky.script, flaky.delay, flaky.seen = [503], 3.0, 0
        with trio.fail_after(2.5):
            assert len(await svc.list_projects()) == 1
        assert flaky.seen == 2


async def test_retry_after_is_honoured(flaky: Flaky) -> None:
    """A 429 carrying Retry-After: 2 is retried 2 s later, not after the (here
    0.01 s) backoff; measured between the two requests' arrivals at the server.
    Checked by breaking it: with retry_after() (scaleway/errors.py) returning
    None the retry comes after ~0.01 s and the lower bound fails."""
    async with open_scaleway_service() as svc:
        svc.backoff = 0.01
        flaky.script, flaky.retry_after = [429], b"2"
        flaky.arrivals.clear()
        await svc.list_projects()  # one API call (a snapshot list asks Instance and Block)
        assert len(flaky.arrivals) == 2 and svc.calls == 2
        waited = flaky.arrivals[1] - flaky.arrivals[0]
        assert 2.0 <= waited < 3.5, waited


async def test_sdk_calls_leave_the_trio_thread_free(flaky: Flaky) -> None:
    """While a slow API call is in flight the trio loop keeps running."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.01)

    async with open_scaleway_service() as svc:
        svc.backoff = 0.01
        flaky.script, flaky.delay = [503], 0.5
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await svc.list_projects()
            nursery.cancel_scope.cancel()
    assert ticks >= 20


def test_service_is_a_snapshot_service() -> None:
    from snapfs.service import SnapshotService

    assert issubclass(ScalewayService, SnapshotService)
    assert not getattr(ScalewayService, "__abstractmethods__", None)

