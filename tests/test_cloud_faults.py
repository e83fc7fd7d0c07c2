"""The cloud backend when the API path misbehaves: a real `snapfs serve` behind a
real HTTP proxy (fixtures_proxy) that answers what a healthy server never does
-- HTML 502 pages, empty bodies, odd or huge Retry-After, answers that never
come, impossible sizes -- and Object Storage (SeaweedFS) where an export or an
import did not do what the API's status says. Each case ends in one errno or a
snapshot state with its reason; none in a hang, a crash or a false ``success``."""

from __future__ import annotations

import errno
import os
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
import trio

from fixtures_http import ACCESS_KEY, SECRET, Served, wait_state
from fixtures_mount import Mount, run
from fixtures_proxy import Fault, FaultProxy, sizes_of
from fixtures_store import lssd_volume
from snapfs.errors import PermissionDenied, SnapfsError, Transient, errno_for
from snapfs.scaleway import open_scaleway_service
from snapfs.scaleway import service as scw_service

MiB = 1 << 20
HTML = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
BUSY = b'{"type": "transient_error", "message": "try again"}'


def point_at(url: str, served: Served, monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    monkeypatch.setenv("SCW_CONFIG_PATH", str(tmp / "absent.yaml"))
    monkeypatch.delenv("SCW_PROFILE", raising=False)
    for name, value in (("SCW_ACCESS_KEY", ACCESS_KEY), ("SCW_SECRET_KEY", SECRET),
                        ("SCW_API_URL", url), ("SCW_DEFAULT_ZONE", "fr-par-1"),
                        ("SCW_DEFAULT_PROJECT_ID", served.default_project),
                        ("SCW_DEFAULT_ORGANIZATION_ID", served.organization)):
        monkeypatch.setenv(name, value)


@pytest.fixture
def via_proxy(proxy: FaultProxy, served: Served, monkeypatch: pytest.MonkeyPatch,
              tmp_path: Path) -> FaultProxy:
    """SCW_* pointing at the proxy in front of the module's `snapfs serve`."""
    point_at(proxy.url, served, monkeypatch, tmp_path)
    return proxy


async def _refusal(fn: Callable[[], Awaitable[Any]]) -> SnapfsError:
    with pytest.raises(SnapfsError) as exc:
        await fn()
    return exc.value


def _snapshot_of(served: Served, volume_id: str) -> str:
    """A snapshot made on the server directly (not through the proxy), available."""
    api = served.instance()
    snap = api.create_snapshot(volume_id=volume_id, name=f"f-{uuid.uuid4().hex[:8]}",
                               zone="fr-par-1").snapshot
    wait_state(api, snap.id, zone="fr-par-1")
    return str(snap.id)


# --- retries: bounded in every way -------------------------------------------------


async def test_retry_after_is_capped_and_read_as_ascii_digits(via_proxy: FaultProxy) -> None:
    """A Retry-After of an hour is waited RETRY_AFTER_CAP at most (here lowered to
    1 s); one that is not ASCII digits ('²' passed str.isdigit and crashed int())
    is no delay the server asked for: the backoff is used."""
    proxy = via_proxy
    async with open_scaleway_service() as svc:
        svc.backoff = 0.01
        svc.retry_after_cap = 1.0
        proxy.add(Fault(429, BUSY, {"retry-after": "3600"}, match="/projects"))
        with trio.fail_after(10):
            await svc.list_projects()
        first, second = proxy.requests("/projects")
        assert 1.0 <= second - first < 3.0, second - first
        odd_values = ("²", "¹²", "1.5", "-1", "1e3", "9" * 400, "")
        svc.retries = len(odd_values)
        for odd in odd_values:
            proxy.add(Fault(429, BUSY, {"retry-after": odd}, match="/projects"))
        with trio.fail_after(10):
            assert {p.name for p in await svc.list_projects()} == {"default", "other"}
    assert scw_service.RETRY_AFTER_CAP <= 8.0


async def test_a_call_has_a_deadline(via_proxy: FaultProxy) -> None:
    """An answer that never comes, or a Retry-After past the call's deadline, ends
    the call with EAGAIN by its deadline (here lowered to 1.5 s), not a hang."""
    proxy = via_proxy
    async with open_scaleway_service() as svc:
        svc.call_deadline = 1.5
        proxy.add(Fault(503, BUSY, delay=60, match="/projects"))
        start = trio.current_time()
        with trio.fail_after(10):
            err = await _refusal(svc.list_projects)
        assert isinstance(err, Transient) and errno_for(err) == errno.EAGAIN, err
        assert trio.current_time() - start < 3.0
        # The server asks for 5 s: more than the call has left, so no waiting for it.
        proxy.add(Fault(429, BUSY, {"retry-after": "5"}, match="/projects"))
        before = len(proxy.requests("/projects"))
        start = trio.current_time()
        err = await _refusal(svc.list_projects)
        assert isinstance(err, Transient) and errno_for(err) == errno.EAGAIN, err
        assert trio.current_time() - start < 1.0
        assert len(proxy.requests("/projects")) == before + 1
        assert {p.name for p in await svc.list_projects()} == {"default", "other"}
    assert scw_service.CALL_TIMEOUT <= 20.0 and scw_service.CALL_DEADLINE <= 30.0


# --- answers that are not the API's JSON ---------------------------------------------


async def test_error_bodies_that_are_not_json(via_proxy: FaultProxy) -> None:
    """A proxy's HTML page or an empty body is classified by its status: 429 and
    5xx are temporary (retried, then EAGAIN), 401/403 EACCES, any other EIO."""
    proxy = via_proxy
    html = {"content-type": "text/html"}
    async with open_scaleway_service() as svc:
        svc.backoff = 0.01
        proxy.add(*[Fault(502, HTML, html, match="/projects")] * (svc.retries + 1))
        err = await _refusal(svc.list_projects)
        assert isinstance(err, Transient) and errno_for(err) == errno.EAGAIN, err
        assert "HTTP 502" in str(err) and "<html>" not in str(err)
        assert len(proxy.requests("/projects")) == svc.retries + 1

        proxy.add(Fault(503, b"", match="/projects"), Fault(429, b"", match="/projects"),
                  Fault(500, HTML, html, match="/projects"))
        assert {p.name for p in await svc.list_projects()} == {"default", "other"}

        # Lists read through the SDK's transport (_list_json), the Block API's too.
        proxy.add(*[Fault(504, b"", match="/block/v1/zones/fr-par-1/snapshots")]
                  * (svc.retries + 1))
        err = await _refusal(lambda: svc.list_snapshots("fr-par-1"))
        assert isinstance(err, Transient) and errno_for(err) == errno.EAGAIN, err

        for status, kind, code in ((401, PermissionDenied, errno.EACCES),
                                   (403, PermissionDenied, errno.EACCES),
                                   (404, SnapfsError, errno.EIO),
                                   (400, SnapfsError, errno.EIO),
                                   (200, SnapfsError, errno.EIO)):
            seen = len(proxy.requests("/projects"))
            proxy.add(Fault(status, HTML, html, match="/projects"))
            err = await _refusal(svc.list_projects)
            assert (type(err), errno_for(err)) == (kind, code), (status, err)
            assert len(proxy.requests("/projects")) == seen + 1  # not retried


# --- impossible values -----------------------------------------------------------------


IMPOSSIBLE = (-4096, "8388608", 1 << 62, 1.5, True, [1])


async def test_impossible_sizes_make_the_snapshot_an_error(via_proxy: FaultProxy,
                                                           served: Served) -> None:
    """A size that is negative, absurd or not an integer shows that snapshot in
    state error with size 0 (and says why); the listing and the others are fine."""
    proxy = via_proxy
    a = served.volumes["vol-a"]
    block_id = _snapshot_of(served, a["id"])
    with lssd_volume(served.store) as (_, lssd):
        instance_id = _snapshot_of(served, lssd)
        async with open_scaleway_service() as svc:
            for sid in (block_id, instance_id):
                for value in IMPOSSIBLE:
                    proxy.rewrite = sizes_of(sid, value)
                    listed = {s.id: s for s in await svc.list_all_snapshots("fr-par-1")}
                    got = await svc.get_snapshot("fr-par-1", sid)
                    for snap in (listed[sid], got):
                        assert (snap.state, snap.size) == ("error", 0), (value, snap)
                        assert snap.error_reason and "size" in snap.error_reason, snap
                    others = [s for s in listed.values() if s.id != sid]
                    assert others and all(s.size > 0 for s in others)
                proxy.rewrite = None
                assert (await svc.get_snapshot("fr-par-1", sid)).state == "available"
            for value in (-1, 1 << 62, "4096"):
                proxy.rewrite = sizes_of(a["id"], value)
                vols = {v.id: v for v in (await svc.list_volumes("fr-par-1")).items}
                for vol in (vols[a["id"]], await svc.get_volume("fr-par-1", a["id"])):
                    assert (vol.state, vol.size) == ("error", 0), (value, vol)
            proxy.rewrite = None
            for sid in (block_id, instance_id):
                await svc.delete_snapshot("fr-par-1", sid)


# --- the mount: one log line per refusal; a listing with an impossible size ----------


@pytest.mark.mount
def test_mount_refusal_logged_once_and_odd_sizes_listed(
        mount_factory: Callable[..., Mount], proxy: FaultProxy, served: Served,
        tmp_path: Path) -> None:
    sid = _snapshot_of(served, served.volumes["vol-a"]["id"])
    env = {"SCW_ACCESS_KEY": ACCESS_KEY, "SCW_SECRET_KEY": SECRET, "SCW_API_URL": proxy.url,
           "SCW_DEFAULT_ORGANIZATION_ID": served.organization,
           "SCW_DEFAULT_PROJECT_ID": served.default_project, "SCW_DEFAULT_ZONE": "fr-par-1",
           "SCW_CONFIG_PATH": str(tmp_path / "absent.yaml")}
    proxy.rewrite = sizes_of(sid, -1)
    m = mount_factory(tmp_path / "store", "--backend", "scaleway", env=env)
    names = {}
    for name in os.listdir(m.snapshots()):
        names[m.xattr(m.snapshots() / name, "id")] = name
    snap = m.snapshots() / names[sid]
    run("ls", "-l", m.snapshots())
    assert m.xattr(snap, "state") == "error" and m.xattr(snap, "size") == "0"
    assert (snap / "image.raw").stat().st_size == 0
    with pytest.raises(OSError) as exc:
        open(snap / "image.raw", "rb").close()
    assert exc.value.errno == errno.EIO
    proxy.rewrite = None
    # A proxy's HTML 502 on every try (Retry-After: 0, so no waiting): EAGAIN, and
    # the daemon's log says so once -- the errno line, not the backend's as well.
    proxy.add(*[Fault(502, HTML, {"content-type": "text/html", "retry-after": "0"},
                      match=f"/snapshots/{sid}")] * (scw_service.RETRIES + 1))
    time.sleep(0.5)  # past the mount's XATTR_MAX_AGE: user.state asks the API
    with pytest.raises(OSError) as exc:
        os.getxattr(snap, "user.state")
    assert exc.value.errno == errno.EAGAIN
    lines = [ln for ln in m.log().splitlines() if "HTTP 502" in ln and "retry" not in ln]
    assert len(lines) == 1 and "EAGAIN" in lines[0], lines
    api = served.instance()
    api.delete_snapshot(snapshot_id=sid, zone="fr-par-1")
