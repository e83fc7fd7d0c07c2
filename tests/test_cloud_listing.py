"""Cloud listing (issue 15): serve's Instance List filtered by volume_type and its
pages cut from one scan, the cloud backend asking Instance only for its own
snapshot types, and the mount's catalog answering a stale listing while it
refreshes it in the background."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests
import trio
import trio.testing

from fixtures_http import SECRET, Served, write_volume
from fixtures_store import MiB, ZONE, wait_state
from snapfs.fs.catalog import Catalog
from snapfs.fs.keys import Kind, View
from snapfs.local import LocalService, open_local_service
from snapfs.model import Page, Snapshot
from snapfs.scaleway import open_scaleway_service

SNAPSHOTS = View(Kind.SNAPSHOTS)


@pytest.fixture(scope="module")
def mixed(served: Served, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The served store (this module's own) plus a local SSD volume, and one
    available snapshot of it (Instance's) and of vol-a (b_ssd: Block's)."""
    path = tmp_path_factory.mktemp("lssd") / "lssd.raw"
    write_volume(path, 2 * MiB, [(0, MiB)], 9)

    async def populate() -> dict[str, str]:
        async with open_local_service(served.store) as svc:
            vol = await svc.add_volume("lssd", path, volume_type="l_ssd")
            local = await svc.create_snapshot(ZONE, name="on-lssd", volume_id=vol.id)
            block = await svc.create_snapshot(ZONE, name="on-bssd",
                                              volume_id=served.volumes["vol-a"]["id"])
            for snap in (local, block):
                await wait_state(svc, snap.id)
            return {"lssd": vol.id, "local": local.id, "block": block.id}
    return trio.run(populate)


def _get(served: Served, path: str, **params: Any) -> requests.Response:
    return requests.get(f"{served.url}/instance/v1/zones/{ZONE}{path}", params=params,
                        headers={"X-Auth-Token": SECRET}, timeout=30)


def test_instance_list_filters_by_volume_type(served: Served, mixed: dict[str, str]) -> None:
    every = _get(served, "/snapshots").json()["snapshots"]
    assert {mixed["local"], mixed["block"]} <= {s["id"] for s in every}
    for vtype, expected in (("l_ssd", mixed["local"]), ("b_ssd", mixed["block"])):
        res = _get(served, "/snapshots", volume_type=vtype)
        assert res.status_code == 200
        got = res.json()["snapshots"]
        assert expected in {s["id"] for s in got}
        assert {s["volume_type"] for s in got} == {vtype}
        assert res.headers["x-total-count"] == str(len(got))
    assert _get(served, "/snapshots", volume_type="unified").json()["snapshots"] == []
    bad = _get(served, "/snapshots", volume_type="sbs_5k")
    assert bad.status_code == 400 and bad.json()["type"] == "invalid_arguments"
    assert _get(served, "/snapshots").json()["snapshots"] == every  # nothing changed


def test_pages_come_from_one_list_until_a_change(served: Served, mixed: dict[str, str]
                                                 ) -> None:
    api = served.instance()
    first = _get(served, "/snapshots", per_page=1, page=1)
    total = int(first.headers["x-total-count"])
    assert total >= 2
    # A snapshot made by another process: pages after page 1 are cut from page 1's
    # list (one listing, consistent pages)...
    async def outside() -> None:
        async with open_local_service(served.store) as svc:
            snap = await svc.create_snapshot(ZONE, name="outside", volume_id=mixed["lssd"])
            await wait_state(svc, snap.id)
    trio.run(outside)
    last = _get(served, "/snapshots", per_page=1, page=total)
    assert last.headers["x-total-count"] == str(total)
    # ...the next page 1 computes it again.
    assert _get(served, "/snapshots", per_page=1).headers["x-total-count"] == str(total + 1)
    # A change through the server drops the kept lists at once.
    _get(served, "/snapshots", per_page=1)
    made = api.create_snapshot(name="inside", volume_id=mixed["lssd"]).snapshot
    tail = _get(served, "/snapshots", per_page=1, page=total + 2)
    assert tail.headers["x-total-count"] == str(total + 2)
    assert [s["id"] for s in tail.json()["snapshots"]] == [made.id]


async def test_backend_asks_instance_for_its_own_types(served: Served, mixed: dict[str, str],
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    from fixtures_http import ACCESS_KEY
    monkeypatch.setenv("SCW_CONFIG_PATH", str(tmp_path / "absent.yaml"))
    for name, value in (("SCW_ACCESS_KEY", ACCESS_KEY), ("SCW_SECRET_KEY", SECRET),
                        ("SCW_API_URL", served.url), ("SCW_DEFAULT_ZONE", ZONE)):
        monkeypatch.setenv(name, value)
    async with open_scaleway_service([ZONE]) as svc:
        await svc.list_all_snapshots(ZONE)  # learns the projects' organizations
        calls = svc.calls
        snaps = await svc.list_all_snapshots(ZONE)
        # One page of each: Instance's l_ssd and unified lists, Block's list.
        assert svc.calls - calls == 3
        ids = [s.id for s in snaps]
        assert len(ids) == len(set(ids))
        apis = {s.id: s.api for s in snaps}
        assert apis[mixed["local"]] == "instance" and apis[mixed["block"]] == "block"
        # Every Block snapshot the Instance API also lists is dropped by the filter,
        # not after fetching it: Instance's lists hold only l_ssd snapshots here.
        on_lssd = {s.id for s in snaps if s.volume_type == "l_ssd"}
        assert on_lssd == {s.id for s in snaps if s.api == "instance"}


class SlowList:
    """The local service, its List held until ``release`` is set (a slow cloud)."""

    def __init__(self, svc: LocalService) -> None:
        self.svc = svc
        self.release = trio.Event()
        self.release.set()
        self.lists = 0

    async def list_snapshots(self, zone: str, **kw: Any) -> Page[Snapshot]:
        self.lists += 1
        await self.release.wait()
        return await self.svc.list_snapshots(zone, **kw)


async def test_catalog_answers_stale_while_refreshing(service: LocalService,
                                                      volume_file: Any) -> None:
    vol = await service.add_volume("v", volume_file("v", MiB, [(0, b"x" * 4096)]))
    project = vol.project
    first = await service.create_snapshot(ZONE, name="first", volume_id=vol.id)
    slow = SlowList(service)
    async with trio.open_nursery() as nursery:
        catalog = Catalog(slow, ttl=0.2)  # type: ignore[arg-type]
        catalog.nursery = nursery
        before = await catalog.snapshots(ZONE, project, SNAPSHOTS)
        assert [s.id for s in before.items] == [first.id] and slow.lists == 1
        second = await service.create_snapshot(ZONE, name="second", volume_id=vol.id)
        await trio.sleep(0.3)  # past the TTL
        slow.release = trio.Event()  # the refresh hangs until released
        # Answered, not waited: the refresh hangs until released, so a wait for it
        # would never end (no wall-clock bound a loaded machine could exceed).
        with trio.fail_after(10):
            stale = await catalog.snapshots(ZONE, project, SNAPSHOTS)
        assert stale is before
        # A lookup during the refresh: from the stale listing, or asked by name
        # when it lacks the name (it may be new).
        assert await catalog.find_snapshot(ZONE, project, SNAPSHOTS, "first") == first
        await trio.testing.wait_all_tasks_blocked()
        assert slow.lists == 2  # one background refresh, however many asked
        await catalog.snapshots(ZONE, project, SNAPSHOTS)
        assert slow.lists == 2
        slow.release.set()
        with trio.fail_after(10):
            while {s.id for s in (await catalog.snapshots(ZONE, project, SNAPSHOTS)).items} \
                    != {first.id, second.id}:
                await trio.sleep(0.01)
        # The mount's own change: the next access waits for a fresh listing.
        catalog.invalidate()
        await service.delete_snapshot(ZONE, second.id)
        slow.release = trio.Event()
        with trio.move_on_after(0.3) as waited:
            await catalog.snapshots(ZONE, project, SNAPSHOTS)
        assert waited.cancelled_caught
        slow.release.set()
        after = await catalog.snapshots(ZONE, project, SNAPSHOTS)
        assert [s.id for s in after.items] == [first.id]
        # Too old to answer stale: waited for too.
        catalog.stale_max = 0.25
        await trio.sleep(0.3)
        slow.release = trio.Event()
        with trio.move_on_after(0.3) as waited:
            await catalog.snapshots(ZONE, project, SNAPSHOTS)
        assert waited.cancelled_caught
        slow.release.set()


async def test_paged_lists_are_bounded() -> None:
    from snapfs.http.paged import PagedLists

    computed: list[str] = []

    def compute(name: str, size: int) -> Any:
        async def run() -> list[int]:
            computed.append(name)
            return list(range(size))
        return run

    paged = PagedLists(max_kept=2, max_items=10)
    await paged.get(("a",), 1, compute("a", 4))
    await paged.get(("b",), 1, compute("b", 4))
    await paged.get(("a",), 2, compute("a", 4))  # kept
    assert computed == ["a", "b"]
    await paged.get(("c",), 1, compute("c", 4))  # 3 lists > 2: "a", the oldest, goes
    await paged.get(("b",), 2, compute("b", 4))
    await paged.get(("a",), 2, compute("a", 4))
    assert computed == ["a", "b", "c", "a"]
    await paged.get(("big",), 1, compute("big", 11))  # longer than max_items: not kept
    await paged.get(("big",), 2, compute("big", 11))
    assert computed[-2:] == ["big", "big"]
    paged.clear()
    await paged.get(("a",), 2, compute("a", 4))
    assert computed[-1] == "a"


async def test_ls_l_of_a_cloud_zone_asks_only_its_lists(
        served: Served, mixed: dict[str, str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """What `ls -l snapshots/` makes the daemon do -- the listing, then a lookup,
    getattr and ACL/label xattr per entry -- costs the listing's pages and no call
    per entry, fresh or answered stale past the TTL."""
    import errno
    import os

    import pyfuse3

    from fixtures_http import ACCESS_KEY
    from snapfs.fs.context import FsContext
    from snapfs.fs.ops import SnapfsOperations
    monkeypatch.setenv("SCW_CONFIG_PATH", str(tmp_path / "absent.yaml"))
    for name, value in (("SCW_ACCESS_KEY", ACCESS_KEY), ("SCW_SECRET_KEY", SECRET),
                        ("SCW_API_URL", served.url), ("SCW_DEFAULT_ZONE", ZONE)):
        monkeypatch.setenv(name, value)

    class Req:
        pid, uid, gid, umask = os.getpid(), 0, 0, 0o022

    async with open_scaleway_service([ZONE]) as svc, trio.open_nursery() as nursery:
        ctx = FsContext.create(svc, ttl=0.5)
        ctx.catalog.nursery = nursery
        ops = SnapfsOperations(ctx)
        inode = pyfuse3.ROOT_INODE
        for part in (ZONE, "default", "snapshots"):
            inode = (await ops.lookup(inode, part.encode(), Req())).st_ino

        async def ls_l() -> int:
            calls = svc.calls
            fh = await ops.opendir(inode, Req())
            names = [n for n, _, _ in ops._dirs[fh] if n not in (".", "..")]
            await ops.releasedir(fh)
            assert {"on-lssd", "on-bssd"} <= set(names)
            for n in names:
                entry = await ops.lookup(inode, n.encode(), Req())
                await ops.getattr(entry.st_ino, Req())
                with pytest.raises(pyfuse3.FUSEError) as exc:
                    await ops.getxattr(entry.st_ino, b"system.posix_acl_access", Req())
                assert exc.value.errno == errno.EOPNOTSUPP
            return svc.calls - calls

        # Instance l_ssd + unified and Block: one page each; the Block side's first
        # list also learns the projects' organizations (one project list).
        assert await ls_l() == 4
        # Fetched afresh, the organizations now known (the projects' listing kept).
        for key in [k for k in ctx.catalog._listings if k[0] == "snapshots"]:
            del ctx.catalog._listings[key]
        assert await ls_l() == 3
        assert await ls_l() == 0  # within the TTL
        await trio.sleep(0.6)
        # Past the TTL: answered from the listing, one refresh in the background
        # (its 3 pages may or may not have been asked yet).
        assert await ls_l() <= 3
        nursery.cancel_scope.cancel()


async def _asgi_get(app: Any, path: str, **query: object) -> tuple[dict[str, str], Any]:
    """One GET straight into the ASGI app (no server): (headers, JSON body)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
    from urllib.parse import urlencode
    await app({"type": "http", "method": "GET", "path": path,
               "query_string": urlencode(query).encode(),
               "headers": [(b"x-auth-token", SECRET.encode())]}, receive, send)
    assert sent[0]["status"] == 200, sent
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return headers, json.loads(sent[1]["body"])


async def test_a_later_page_is_not_older_than_this_process_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A capture ending in the background (or a mount's mkdir beside --listen)
    changes what a list shows without a request through the server: a later page,
    cut from page 1's kept list, showed the old state for up to 30 s."""
    from snapfs.http.routes import make_app
    from snapfs.local import capture

    gate = trio.Event()
    read_batch = capture.FileSource.read_batch

    async def held(self: Any, first: int, count: int) -> Any:
        await gate.wait()
        return await read_batch(self, first, count)
    vol = tmp_path / "v.raw"
    vol.write_bytes(b"x" * (1 << 20))
    path = "/instance/v1/zones/fr-par-1/snapshots"
    async with open_local_service(tmp_path / "store") as svc:
        app = make_app(svc, SECRET)
        v = await svc.add_volume("v", vol)
        first = await svc.create_snapshot(ZONE, name="first", volume_id=v.id)
        await wait_state(svc, first.id)
        monkeypatch.setattr(capture.FileSource, "read_batch", held)
        slow = await svc.create_snapshot(ZONE, name="slow", volume_id=v.id)
        headers, _ = await _asgi_get(app, path, per_page=1, page=1)
        assert headers["x-total-count"] == "2"
        _, page2 = await _asgi_get(app, path, per_page=1, page=2)
        assert [(s["id"], s["state"]) for s in page2["snapshots"]] == [(slow.id, "snapshotting")]
        gate.set()
        await wait_state(svc, slow.id)
        _, page2 = await _asgi_get(app, path, per_page=1, page=2)
        assert [(s["id"], s["state"]) for s in page2["snapshots"]] == [(slow.id, "available")]
        third = await svc.create_snapshot(ZONE, name="third", volume_id=v.id)
        headers, page3 = await _asgi_get(app, path, per_page=1, page=3)
        assert headers["x-total-count"] == "3"
        assert [s["id"] for s in page3["snapshots"]] == [third.id]
        await wait_state(svc, third.id)
        # Nothing shown changed since: later pages are still cut from the kept list.
        computed: list[int] = []
        list_all = svc.list_all_snapshots

        async def counted(*args: Any, **kw: Any) -> Any:
            computed.append(1)
            return await list_all(*args, **kw)
        monkeypatch.setattr(svc, "list_all_snapshots", counted)
        for page in (1, 2, 3):
            await _asgi_get(app, path, per_page=1, page=page)
        assert len(computed) == 1
