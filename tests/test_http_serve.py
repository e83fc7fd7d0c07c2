"""`snapfs serve` driven by the official Scaleway SDK, unmodified, over real HTTP,
against a real local store (see fixtures_http)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from typing import Any

import pytest
import requests
from scaleway.account.v3 import AccountV3ProjectAPI
from scaleway.instance.v1.types import SnapshotBaseVolume
from scaleway_core.api import ScalewayException

from fixtures_http import SECRET, Served, wait_state
from fixtures_mount import is_mounted


def _tag() -> str:
    """A tag unique to one test, so tests sharing the server do not see each other."""
    return f"t{uuid.uuid4().hex[:12]}"


def _error(exc: pytest.ExceptionInfo[ScalewayException]) -> tuple[int, dict[str, Any]]:
    return exc.value.status_code, exc.value.response.json()


def _raw(served: Served, method: str, path: str, **kw: Any) -> requests.Response:
    headers = kw.pop("headers", {"X-Auth-Token": SECRET})
    return requests.request(method, served.url + path, headers=headers, timeout=30, **kw)


def test_snapshot_lifecycle(served: Served) -> None:
    api = served.instance()
    vol = served.volumes["vol-a"]
    tag = _tag()
    created = api.create_snapshot(name="life", volume_id=vol["id"], tags=[tag, "x"])
    snap = created.snapshot
    assert str(snap.state) in ("snapshotting", "available")
    assert snap.size == vol["size"] and snap.zone == "fr-par-1"
    assert snap.base_volume.id == vol["id"] and snap.base_volume.name == "vol-a"
    assert snap.project == served.default_project and snap.organization == served.organization
    assert snap.tags == [tag, "x"] and str(snap.volume_type) == "b_ssd"
    assert snap.creation_date is not None and snap.error_reason is None

    got = wait_state(api, snap.id)
    assert got.id == snap.id and got.creation_date == snap.creation_date

    upd = api.update_snapshot(snapshot_id=snap.id, name="life2", tags=[tag, "y"]).snapshot
    assert (upd.name, upd.tags) == ("life2", [tag, "y"])
    assert api.get_snapshot(snapshot_id=snap.id).snapshot.name == "life2"

    # Set: the whole object back with a new name and tags; immutables unchanged.
    s = api.get_snapshot(snapshot_id=snap.id).snapshot
    put = api._set_snapshot(
        snapshot_id=s.id, id=s.id, name="life3", organization=s.organization,
        project=s.project, volume_type=s.volume_type, size=s.size, state=s.state,
        base_volume=SnapshotBaseVolume(id=s.base_volume.id, name=s.base_volume.name),
        creation_date=s.creation_date, modification_date=s.modification_date,
        tags=["z", tag]).snapshot
    assert (put.name, put.tags) == ("life3", ["z", tag])

    # Set changing an immutable field: 400 naming it, nothing changed.
    with pytest.raises(ScalewayException) as exc:
        api._set_snapshot(snapshot_id=s.id, id=s.id, name="nope", size=s.size + 512,
                          organization=s.organization, project=s.project, tags=[tag])
    status, body = _error(exc)
    assert status == 400 and body["type"] == "invalid_arguments"
    assert body["details"][0]["argument_name"] == "size"
    after = api.get_snapshot(snapshot_id=snap.id).snapshot
    assert (after.name, after.tags, after.size) == ("life3", ["z", tag], s.size)

    api.delete_snapshot(snapshot_id=snap.id)
    with pytest.raises(ScalewayException) as exc:
        api.get_snapshot(snapshot_id=snap.id)
    status, body = _error(exc)
    assert status == 404 and body == {
        "type": "not_found", "message": body["message"], "resource": "instance_snapshot",
        "resource_id": snap.id}


def test_pagination(served: Served) -> None:
    api = served.instance()
    tag = _tag()
    ids = [api.create_snapshot(name=f"page-{i}", volume_id=served.volumes["vol-c"]["id"],
                               zone="nl-ams-1", tags=[tag]).snapshot.id for i in range(7)]
    for sid in ids:
        wait_state(api, sid, zone="nl-ams-1")
    seen: list[str] = []
    for page, expect in ((1, 3), (2, 3), (3, 1), (4, 0)):
        res = api.list_snapshots(zone="nl-ams-1", tags=tag, per_page=3, page=page)
        assert int(res.total_count) == 7
        assert len(res.snapshots) == expect
        seen += [s.id for s in res.snapshots]
    assert sorted(seen) == sorted(ids) and len(set(seen)) == 7
    # Stable order: the same page twice is the same page.
    again = api.list_snapshots(zone="nl-ams-1", tags=tag, per_page=3, page=2)
    assert [s.id for s in again.snapshots] == seen[3:6]
    # The SDK's own page walker reaches every item.
    assert sorted(s.id for s in api.list_snapshots_all(zone="nl-ams-1", tags=tag,
                                                       per_page=2)) == sorted(ids)
    # X-Total-Count on the raw response, with the same number in the body.
    r = _raw(served, "GET", "/instance/v1/zones/nl-ams-1/snapshots",
             params={"tags": tag, "per_page": 2})
    assert r.status_code == 200 and r.headers["X-Total-Count"] == "7"
    assert r.json()["total_count"] == 7 and len(r.json()["snapshots"]) == 2
    # Default page size is 50: all seven on page 1.
    assert len(api.list_snapshots(zone="nl-ams-1", tags=tag).snapshots) == 7


def test_list_filters(served: Served) -> None:
    api = served.instance()
    unscoped = served.instance(default_project_id=None, default_organization_id=None)
    tag = _tag()
    a, b = served.volumes["vol-a"], served.volumes["vol-b"]
    s1 = api.create_snapshot(name=f"alpha-{tag}", volume_id=a["id"], tags=[tag, "red"]).snapshot
    s2 = api.create_snapshot(name=f"beta-{tag}", volume_id=a["id"], tags=[tag, "blue"]).snapshot
    s3 = api.create_snapshot(name=f"gamma-{tag}", volume_id=b["id"], tags=[tag, "red"],
                             project=served.other_project).snapshot
    for s in (s1, s2, s3):
        wait_state(api, s.id)

    def ids(**kw: Any) -> set[str]:
        return {s.id for s in unscoped.list_snapshots_all(**kw)}

    assert ids(tags=tag) == {s1.id, s2.id, s3.id}
    assert ids(name=f"beta-{tag}") == {s2.id}
    assert ids(name=tag) == {s1.id, s2.id, s3.id}  # name matches as a substring
    assert ids(name="alp") >= {s1.id} and s2.id not in ids(name="alp")
    assert ids(tags="red") >= {s1.id, s3.id} and s2.id not in ids(tags="red")
    assert ids(base_volume_id=b["id"]) >= {s3.id}
    assert not ids(base_volume_id=b["id"]) & {s1.id, s2.id}
    assert ids(tags=tag, project=served.other_project) == {s3.id}
    assert ids(tags=tag, project=served.default_project) == {s1.id, s2.id}
    # The SDK adds the profile's default project to every List by itself.
    assert {s.id for s in api.list_snapshots_all(tags=tag)} == {s1.id, s2.id}
    assert ids(tags=tag, organization=served.organization) == {s1.id, s2.id, s3.id}
    assert ids(tags=tag, organization=str(uuid.uuid4())) == set()
    # Zones are separate: nothing of fr-par-1 in nl-ams-1.
    assert not ids(tags=tag, zone="nl-ams-1")


def test_validation_errors(served: Served) -> None:
    api = served.instance()
    with pytest.raises(ScalewayException) as exc:
        api.list_snapshots(per_page=101)
    status, body = _error(exc)
    assert status == 400 and body["type"] == "invalid_arguments"
    assert body["details"][0]["argument_name"] == "per_page"

    with pytest.raises(ScalewayException) as exc:
        api.list_snapshots(page=-1)
    assert _error(exc)[0] == 400

    before = int(api.list_snapshots().total_count)
    with pytest.raises(ScalewayException) as exc:
        api.create_snapshot(name="imp", bucket="bkt", key="k.qcow2", size=1000)
    status, body = _error(exc)
    assert status == 400 and body["details"][0]["argument_name"] == "size"
    assert int(api.list_snapshots().total_count) == before  # nothing created

    with pytest.raises(ScalewayException) as exc:
        api.create_snapshot(name="bad/name", volume_id=served.volumes["vol-a"]["id"])
    assert _error(exc)[0] == 400 and _error(exc)[1]["details"][0]["argument_name"] == "name"

    with pytest.raises(ScalewayException) as exc:
        api.list_snapshots(zone="xx-yyy-1")
    assert _error(exc)[0] == 400

    with pytest.raises(ScalewayException) as exc:  # a volume of another zone
        api.create_snapshot(name="wrongzone", volume_id=served.volumes["vol-c"]["id"])
    assert _error(exc)[0] == 404
    assert int(api.list_snapshots().total_count) == before


def test_not_found(served: Served) -> None:
    api = served.instance()
    missing = str(uuid.uuid4())
    for call in (lambda: api.get_snapshot(snapshot_id=missing),
                 lambda: api.update_snapshot(snapshot_id=missing, name="x"),
                 lambda: api.delete_snapshot(snapshot_id=missing),
                 lambda: api.export_snapshot(snapshot_id=missing, bucket="b", key="k"),
                 lambda: api.create_snapshot(name="x", volume_id=missing),
                 lambda: api.get_volume(volume_id=missing)):
        with pytest.raises(ScalewayException) as exc:
            call()
        status, body = _error(exc)
        assert status == 404 and body["type"] == "not_found" and body["resource_id"] == missing
    # Each refusal is one line of the server's log saying why.
    assert served.log is not None
    lines = [ln for ln in served.log.read_text().splitlines() if missing in ln]
    assert len(lines) == 6 and all("-> 404" in ln for ln in lines), lines


def test_volumes(served: Served) -> None:
    api = served.instance(default_project_id=None)
    res = api.list_volumes()
    names = {v.name: v for v in res.volumes}
    assert set(names) == {"vol-a", "vol-b"} and int(res.total_count) == 2
    a = served.volumes["vol-a"]
    assert names["vol-a"].id == a["id"] and names["vol-a"].size == a["size"]
    assert names["vol-b"].project == served.other_project
    one = api.list_volumes(per_page=1, page=2)
    assert len(one.volumes) == 1 and int(one.total_count) == 2
    assert [v.name for v in api.list_volumes(name="-b").volumes] == ["vol-b"]
    assert [v.name for v in api.list_volumes(project=served.other_project).volumes] == ["vol-b"]
    assert [v.name for v in api.list_volumes(zone="nl-ams-1").volumes] == ["vol-c"]
    got = api.get_volume(volume_id=a["id"]).volume
    assert (got.name, got.size, got.zone, got.project) == ("vol-a", a["size"], "fr-par-1",
                                                           served.default_project)
    with pytest.raises(ScalewayException) as exc:
        api.list_volumes(per_page=101)
    assert _error(exc)[0] == 400


def test_projects(served: Served) -> None:
    api = AccountV3ProjectAPI(served.client())
    res = api.list_projects()
    by_name = {p.name: p for p in res.projects}
    assert {"default", "other"} <= set(by_name) and int(res.total_count) == len(res.projects)
    assert by_name["default"].id == served.default_project
    assert by_name["other"].id == served.other_project
    assert all(p.organization_id == served.organization for p in res.projects)
    assert [p.name for p in api.list_projects(name="oth").projects] == ["other"]
    paged = api.list_projects(page_size=1, page=2, order_by="name_asc")
    assert len(paged.projects) == 1 and int(paged.total_count) == len(res.projects)
    assert api.list_projects(organization_id=str(uuid.uuid4())).projects == []
    with pytest.raises(ScalewayException) as exc:
        api.list_projects(page_size=101)
    assert _error(exc)[0] == 400


def test_export_and_import_without_object_storage_are_refused(served: Served) -> None:
    """With no Object Storage configured, export and import are refused when asked
    (501, the one table's NotConfigured), leaving no task and no snapshot."""
    api = served.instance()
    snap = api.create_snapshot(name="exp", volume_id=served.volumes["vol-a"]["id"]).snapshot
    wait_state(api, snap.id)
    before = int(api.list_snapshots().total_count)
    with pytest.raises(ScalewayException) as exc:
        api.export_snapshot(snapshot_id=snap.id, bucket="bkt", key="exp.qcow2")
    status, body = _error(exc)
    assert status == 501 and "Object Storage is not configured" in body["message"]
    # precondition_failed's fields, as every other (a client maps it back to ENXIO).
    assert (body["type"], body["precondition"]) == ("precondition_failed", "not_configured")
    assert "Object Storage is not configured" in body["help_message"]
    assert str(api.get_snapshot(snapshot_id=snap.id).snapshot.state) == "available"
    with pytest.raises(ScalewayException) as exc:
        api.create_snapshot(name="imp", bucket="bkt", key="k.qcow2")
    assert _error(exc)[0] == 501
    assert int(api.list_snapshots().total_count) == before
    with pytest.raises(ScalewayException) as exc:
        api.export_snapshot(snapshot_id=snap.id, bucket="", key="k")
    assert _error(exc)[1]["details"][0]["argument_name"] == "bucket"
    api.delete_snapshot(snapshot_id=snap.id)


def test_auth(served: Served) -> None:
    path = "/instance/v1/zones/fr-par-1/snapshots"
    # The API's answers to a token that is no key: 401 denied_authentication, the
    # reason the SDKs explain ("empty value or invalid format" / "does not exist").
    r = _raw(served, "GET", path, headers={})
    assert r.status_code == 401 and r.json()["type"] == "denied_authentication"
    assert r.json()["reason"] == "invalid_argument"
    r = _raw(served, "GET", path, headers={"X-Auth-Token": str(uuid.uuid4())})
    assert r.status_code == 401 and r.json()["type"] == "denied_authentication"
    assert (r.json()["method"], r.json()["reason"]) == ("api_key", "not_found")
    with pytest.raises(ScalewayException) as exc:
        served.instance(secret_key=str(uuid.uuid4())).list_snapshots()
    assert _error(exc)[0] == 401
    # A refused write changes nothing.
    before = _raw(served, "GET", path).json()["total_count"]
    r = _raw(served, "POST", path, headers={"X-Auth-Token": "wrong"},
             json={"name": "x", "volume_id": served.volumes["vol-a"]["id"]})
    assert r.status_code == 401 and r.json()["reason"] == "invalid_argument"
    assert _raw(served, "GET", path).json()["total_count"] == before


def test_http_edges(served: Served) -> None:
    r = _raw(served, "GET", "/instance/v1/zones/fr-par-1/servers")
    assert r.status_code == 404
    r = _raw(served, "POST", "/instance/v1/zones/fr-par-1/volumes")
    assert r.status_code == 405
    r = _raw(served, "POST", "/instance/v1/zones/fr-par-1/snapshots", data=b"{not json",
             headers={"X-Auth-Token": SECRET, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["details"][0]["argument_name"] == "body"
    r = _raw(served, "POST", "/instance/v1/zones/fr-par-1/snapshots",
             json={"name": "x", "volume_id": served.volumes["vol-a"]["id"], "colour": 1})
    assert r.status_code == 400 and r.json()["details"][0]["argument_name"] == "colour"
    r = _raw(served, "POST", "/instance/v1/zones/fr-par-1/snapshots",
             json={"name": "x", "volume_id": served.volumes["vol-a"]["id"], "size": "big"})
    assert r.status_code == 400 and r.json()["details"][0]["argument_name"] == "size"
    r = _raw(served, "GET", "/instance/v1/zones/fr-par-1/snapshots",
             params={"per_page": "ten"})
    assert r.status_code == 400 and r.json()["details"][0]["argument_name"] == "per_page"


def test_serve_cli_refuses_bad_listen(tmp_path: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for listen, why in (("nowhere", "not HOST:PORT"),
                            (f"127.0.0.1:{port}", "Address already in use")):
            r = subprocess.run([sys.executable, "-m", "snapfs", "serve", "--store",
                                str(tmp_path / "s"), "--listen", listen],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 1, r.stderr
            assert r.stderr.strip().count("\n") == 0 and why in r.stderr, r.stderr
            assert "Traceback" not in r.stderr


def test_listen_host_idna_cannot_encode_is_refused_in_one_line(tmp_path: Any) -> None:
    # getaddrinfo's IDNA encoding raises UnicodeError (a ValueError, not an
    # OSError) for an empty or over-63-character label or undecodable bytes: serve
    # printed a traceback, mount "snapfs: UnicodeError: ...".
    store, mnt = tmp_path / "s", tmp_path / "mnt"
    mnt.mkdir()
    bad = os.fsdecode(b"\xff")
    for host, shown in (("a..b", "a..b"), ("a" * 70, "a" * 70), (bad, "\\udcff"),
                        ("a\nb", "a\\nb")):
        for cmd in (["serve"], ["mount", str(mnt)]):
            r = subprocess.run([sys.executable, "-m", "snapfs", *cmd, "--store", str(store),
                                "--listen", f"{host}:0"],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
            assert r.stderr.count("\n") == 1, r.stderr
            assert r.stderr.startswith(f"snapfs: invalid listen: {shown}:0: "), r.stderr
            assert not store.exists() and not is_mounted(mnt)
