"""The cloud backend when the API path misbehaves: a real `snapfs serve` behind a
real HTTP proxy (fixtures_proxy) that answers what a healthy server never does
-- HTML 502 pages, empty bodies, odd or huge Retry-After, answers that never
come, impossible sizes -- and Object Storage (SeaweedFS) where an export or an
import did not do what the API's status says. Each case ends in one errno or a
snapshot state with its reason; none in a hang, a crash or a false ``success``."""

from __future__ import annotations

import dataclasses
import errno
import os
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import pytest
import trio

from fixtures_http import ACCESS_KEY, SECRET, Served, serve_store, wait_state, write_volume
from fixtures_mount import Mount, run
from fixtures_proxy import Fault, FaultProxy, sizes_of
from fixtures_s3 import READER, qcow2_of
from fixtures_store import lssd_volume
from snapfs.errors import PermissionDenied, SnapfsError, Transient, errno_for
from snapfs.scaleway import ScalewayService, open_scaleway_service
from snapfs.scaleway import service as scw_service
from snapfs.scaleway import timeouts

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


async def test_hung_answers_give_their_worker_threads_back(via_proxy: FaultProxy) -> None:
    """The SDK's requests had no socket timeout: an abandoned attempt kept its
    worker thread and limiter slot until the server answered. Eight hung
    answers (every slot) then made each later call wait for a slot until its
    deadline (EAGAIN), for as long as the server held them (here 60 s). Now a
    hung socket ends with its attempt, and the retries get their slots."""
    await every_slot_comes_back(via_proxy, Fault(503, BUSY, delay=60, match="/projects"))


async def test_trickling_answers_end_with_their_attempt(via_proxy: FaultProxy) -> None:
    """Each wait on the socket short, the whole answer long (a byte every 0.25 s,
    here 10 s for the body): the socket timeout alone let every worker thread
    sit in it past the call's deadline (found by a review). The body is read
    against the attempt's timeout, and the retries get their slots."""
    await every_slot_comes_back(
        via_proxy, Fault(200, b" " * 40 + b"{}", trickle=0.25, match="/projects"))


async def every_slot_comes_back(proxy: FaultProxy, fault: Fault) -> None:
    """As many calls at once as there are worker threads, each meeting ``fault``
    first: every one gets its answer on a retry (attempts of 1 s) well inside
    its deadline (8 s), so no slot stayed with a stuck attempt."""
    async with open_scaleway_service() as svc:
        svc.call_timeout, svc.call_deadline, svc.backoff = 1.0, 8.0, 0.01
        proxy.add(*(dataclasses.replace(fault) for _ in range(scw_service.MAX_THREADS)))
        names: list[set[str]] = []

        async def one() -> None:
            names.append({p.name for p in await svc.list_projects()})
        start = trio.current_time()
        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                for _ in range(scw_service.MAX_THREADS):
                    n.start_soon(one)
        assert names == [{"default", "other"}] * scw_service.MAX_THREADS
        assert trio.current_time() - start < 6.0


async def test_an_answer_larger_than_any_api_answer_is_refused(via_proxy: FaultProxy) -> None:
    """The SDK read any answer whole into memory: a proxy sending gigabytes took
    the daemon's memory with it. Past MAX_BODY the answer is refused (EIO), once,
    not retried."""
    via_proxy.add(Fault(200, b" " * (timeouts.MAX_BODY + (1 << 20)) + b"{}",
                        match="/projects"))
    async with open_scaleway_service() as svc:
        err = await _refusal(svc.list_projects)
        assert errno_for(err) == errno.EIO and "MiB" in str(err), err
        assert len(via_proxy.requests("/projects")) == 1
        assert {p.name for p in await svc.list_projects()} == {"default", "other"}


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


# --- Object Storage: exports and imports that did not do what the status says --------


@pytest.fixture(scope="module")
def served_reader(tmp_path_factory: pytest.TempPathFactory, s3_server: Any
                  ) -> Iterator[Served]:
    """`snapfs serve` whose Object Storage credentials may only read: every export
    it runs fails (its snapshot goes back to available, as Scaleway's does)."""
    with serve_store(tmp_path_factory.mktemp("served-reader"), s3_server, READER) as s:
        yield s


@pytest.fixture
async def reader_cloud(served_reader: Served, s3_server: Any, monkeypatch: pytest.MonkeyPatch,
                       tmp_path: Path) -> AsyncIterator[ScalewayService]:
    point_at(served_reader.url, served_reader, monkeypatch, tmp_path)
    objects = s3_server.objects()
    try:
        async with open_scaleway_service(objects=objects) as svc:
            yield svc
    finally:
        await objects.aclose()


async def _finished(svc: ScalewayService, task_id: str) -> Any:
    with trio.fail_after(60):
        while (task := await svc.get_task("fr-par-1", task_id)).status in ("pending",
                                                                           "started"):
            await trio.sleep(0.05)
    return task


def _small_qcow2(tmp: Path, size: int = 4 * MiB) -> bytes:
    raw = tmp / f"q-{uuid.uuid4().hex[:6]}.raw"
    write_volume(raw, size, [(0, MiB), (size - MiB, MiB)], seed=7)
    return qcow2_of(raw).read_bytes()


@pytest.mark.s3
async def test_failed_block_export_is_not_success(reader_cloud: ScalewayService,
                                                  served_reader: Served, s3_server: Any,
                                                  bucket: str, tmp_path: Path) -> None:
    """A Block export has no task: back to available, the object must have landed
    -- there, QCOW2-sized, and written since the export began."""
    svc = reader_cloud
    s3 = s3_server.client()
    sid = _snapshot_of(served_reader, served_reader.volumes["vol-a"]["id"])

    # A valid QCOW2 left at the key by an earlier export: not this export's work.
    s3.put_object(Bucket=bucket, Key="stale.qcow2", Body=_small_qcow2(tmp_path))
    await trio.sleep(3.2)  # Last-Modified has whole seconds; WRITTEN_SLACK is 2 s
    task = await svc.export_snapshot("fr-par-1", sid, bucket=bucket, key="stale.qcow2")
    task = await _finished(svc, task.id)
    assert task.status == "failure", task
    assert task.error and "before this export began" in task.error, task.error
    assert task.progress != 100

    # Nothing written at all.
    task = await svc.export_snapshot("fr-par-1", sid, bucket=bucket, key="none.qcow2")
    task = await _finished(svc, task.id)
    assert task.status == "failure" and "none.qcow2" in (task.error or ""), task

    # Something written meanwhile, but far too small to be a QCOW2 image.
    task = await svc.export_snapshot("fr-par-1", sid, bucket=bucket, key="tiny.qcow2")
    s3.put_object(Bucket=bucket, Key="tiny.qcow2", Body=b"QFI\xfb" + b"\0" * 60)
    task = await _finished(svc, task.id)
    assert task.status == "failure" and "too small" in (task.error or ""), task
    await svc.delete_snapshot("fr-par-1", sid)


def _tasks_succeed(path: str, data: Any) -> Any:
    """A rewrite for a lying API: every failed task says it succeeded."""
    task = data.get("task") if isinstance(data, dict) else None
    if isinstance(task, dict) and task.get("status") == "failure":
        task.update(status="success", progress=100)
    return data


@pytest.mark.s3
async def test_instance_export_success_is_checked_against_the_object(
        served_reader: Served, s3_server: Any, bucket: str,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An Instance export's task says success when its job ended, not that the
    object landed: with the server's failed exports turned into successes by a
    proxy, the export is failure saying what was found (nothing, or the object
    an earlier export left); with the truth told, failure stays failure."""
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="src.qcow2", Body=_small_qcow2(tmp_path))
    s3.put_object(Bucket=bucket, Key="stale.qcow2", Body=_small_qcow2(tmp_path))
    proxy = FaultProxy(served_reader.url)
    objects = s3_server.objects()
    try:
        point_at(proxy.url, served_reader, monkeypatch, tmp_path)
        async with open_scaleway_service(objects=objects) as svc:
            snap = await svc.create_snapshot("fr-par-1", name="inst-src", bucket=bucket,
                                             key="src.qcow2", volume_type="l_ssd")
            assert snap.api == "instance"
            with trio.fail_after(60):
                while (snap := await svc.get_snapshot("fr-par-1", snap.id)).state \
                        != "available":
                    await trio.sleep(0.05)
            await trio.sleep(3.2)  # stale.qcow2 is older than WRITTEN_SLACK (2 s)
            proxy.rewrite = _tasks_succeed
            for key, why in (("none.qcow2", "is missing after the export"),
                             ("stale.qcow2", "before this export began")):
                task = await svc.export_snapshot("fr-par-1", snap.id, bucket=bucket, key=key)
                task = await _finished(svc, task.id)
                assert task.status == "failure", (key, task)
                assert task.error and why in task.error and key in task.error, task.error
                assert task.progress != 100 and (task.bucket, task.key) == (bucket, key)
                again = await svc.get_task("fr-par-1", task.id)
                assert again == task  # decided once
            proxy.rewrite = None
            task = await svc.export_snapshot("fr-par-1", snap.id, bucket=bucket, key="n2")
            task = await _finished(svc, task.id)
            assert task.status == "failure" and "does not say why" in (task.error or "")
            await svc.delete_snapshot("fr-par-1", snap.id)
    finally:
        proxy.close()
        await objects.aclose()


@pytest.mark.s3
async def test_staged_export_of_the_wrong_size(served_s3: Served, s3_server: Any,
                                               bucket: str, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    """image.raw's staging export holds an image of another size than the API gives
    the snapshot: the open fails saying both sizes, after one export -- however
    many opens wait for it."""
    sid = _snapshot_of(served_s3, served_s3.volumes["vol-a"]["id"])
    real = served_s3.volumes["vol-a"]["size"]
    proxy = FaultProxy(served_s3.url)
    proxy.rewrite = sizes_of(sid, real + MiB)
    objects = s3_server.objects()
    try:
        point_at(proxy.url, served_s3, monkeypatch, tmp_path)
        async with open_scaleway_service(staging_bucket=bucket, objects=objects) as svc:
            errors: list[SnapfsError] = []

            async def open_once() -> None:
                errors.append(await _refusal(lambda: svc.open_image("fr-par-1", sid)))

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for _ in range(3):
                        nursery.start_soon(open_once)
            assert svc._cloud_images().exports_started == 1
            assert len(errors) == 3
            for err in errors:
                text = str(err)
                assert str(real) in text and str(real + MiB) in text, text
                assert "missing" not in text, text
            proxy.rewrite = None
            await svc.delete_snapshot("fr-par-1", sid)
    finally:
        proxy.close()
        await objects.aclose()


@pytest.mark.s3
async def test_failed_import_says_why(served_s3: Served, s3_server: Any, bucket: str,
                                      monkeypatch: pytest.MonkeyPatch,
                                      tmp_path: Path) -> None:
    """A failed Block import (Block snapshots carry no reason) is in state error
    with the reason found in Object Storage, and its progress is not 100."""
    point_at(served_s3.url, served_s3, monkeypatch, tmp_path)
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="junk.qcow2", Body=os.urandom(64 * 1024))
    s3.put_object(Bucket=bucket, Key="good.qcow2", Body=_small_qcow2(tmp_path))
    cases = [("missing.qcow2", None, "does not exist"),
             ("junk.qcow2", None, "not a QCOW2"),
             ("good.qcow2", 8 * MiB, "4194304")]
    objects = s3_server.objects()
    try:
        async with open_scaleway_service(objects=objects) as svc:
            made = []
            for key, size, why in cases:
                snap = await svc.create_snapshot("fr-par-1", name=f"imp-{key[:4]}",
                                                 bucket=bucket, key=key, size=size)
                assert snap.api == "block"
                with trio.fail_after(60):
                    while (snap := await svc.get_snapshot("fr-par-1", snap.id)).state \
                            not in ("error", "available"):
                        await trio.sleep(0.05)
                assert snap.state == "error", snap
                assert snap.error_reason and why in snap.error_reason, (key, snap)
                assert key in snap.error_reason
                assert snap.progress != 100
                listed = {s.id: s for s in await svc.list_all_snapshots("fr-par-1")}
                assert listed[snap.id].error_reason == snap.error_reason
                assert listed[snap.id].progress != 100
                made.append(snap.id)
            # An Instance (l_ssd) import that fails keeps the store's reason; its
            # progress is not 100 either.
            snap = await svc.create_snapshot("fr-par-1", name="imp-lssd", bucket=bucket,
                                             key="missing.qcow2", volume_type="l_ssd")
            assert snap.api == "instance"
            with trio.fail_after(60):
                while (snap := await svc.get_snapshot("fr-par-1", snap.id)).state \
                        == "importing":
                    await trio.sleep(0.05)
            assert snap.state == "error" and snap.error_reason and snap.progress != 100
            for sid in made + [snap.id]:
                await svc.delete_snapshot("fr-par-1", sid)
    finally:
        await objects.aclose()



# --- answers lost after the work was done ----------------------------------------------

async def test_a_create_or_delete_whose_answer_is_late_is_not_done_twice(
        via_proxy: FaultProxy, served: Served) -> None:
    """The server made the snapshot (or deleted it), but its answer came after the
    attempt's timeout: the create was sent again -- two snapshots of one mkdir,
    whose name the tree then showed only as name~id labels -- and the delete's
    retry, answered 404, made rmdir say ENOENT after deleting. A create is not
    sent again unless the first surely did nothing; a retried delete's 404 is
    the earlier attempt's success."""
    proxy = via_proxy
    with lssd_volume(served.store) as (_, lssd):
        async with open_scaleway_service() as svc:
            svc.call_timeout = 1.0
            for vid, api_name in ((lssd, "instance"),
                                  (served.volumes["vol-a"]["id"], "block")):
                name = f"late-{api_name}"
                proxy.add(Fault(0, forward=True, delay=3, method="POST", match="/snapshots"))
                err = await _refusal(lambda: svc.create_snapshot(
                    "fr-par-1", name=name, volume_id=vid))
                assert isinstance(err, Transient), err
                await trio.sleep(3)  # the late answer is in; the work was done once
                made = [s for s in await svc.list_all_snapshots("fr-par-1") if s.name == name]
                assert len(made) == 1, made
                with trio.fail_after(60):
                    while (await svc.get_snapshot("fr-par-1", made[0].id)).state \
                            == "snapshotting":
                        await trio.sleep(0.1)
                proxy.add(Fault(0, forward=True, delay=3, method="DELETE",
                                match=f"/snapshots/{made[0].id}"))
                await svc.delete_snapshot("fr-par-1", made[0].id)  # no ENOENT
                assert name not in {s.name for s in await svc.list_all_snapshots("fr-par-1")}
