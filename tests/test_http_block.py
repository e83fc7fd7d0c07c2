"""`snapfs serve` speaking the Block Storage API v1, driven by the official Python
SDK's ``BlockV1API``, unmodified, over real HTTP against a real local store."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from scaleway.block.v1 import BlockV1API
from scaleway.instance.v1 import InstanceV1API
from scaleway_core.api import ScalewayException
from scaleway_core.utils import WaitForOptions

from fixtures_http import SECRET, Served
from fixtures_s3 import qemu_img_judges
from fixtures_store import snapfs_cli


def _tag() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def _block(served: Served, **overrides: Any) -> BlockV1API:
    return BlockV1API(served.client(**overrides))


def _error(exc: pytest.ExceptionInfo[ScalewayException]) -> tuple[int, dict[str, Any]]:
    return exc.value.status_code, exc.value.response.json()


def _wait(api: BlockV1API, snapshot_id: str, timeout: float = 60.0) -> Any:
    """Poll Get snapshot until no longer transient (the SDK's wait_for_snapshot
    sleeps at least a second between tries: used once, in the lifecycle test)."""
    deadline = time.monotonic() + timeout
    while str((snap := api.get_snapshot(snapshot_id=snapshot_id)).status) in (
            "creating", "deleting", "exporting"):
        assert time.monotonic() < deadline, f"{snapshot_id} still {snap.status}"
        time.sleep(0.05)
    return snap


def test_snapshot_lifecycle(served: Served) -> None:
    api = _block(served)
    vol = served.volumes["vol-a"]
    tag = _tag()
    snap = api.create_snapshot(volume_id=vol["id"], public=False, name="blk", tags=[tag, "x"])
    assert str(snap.status) in ("creating", "available")
    assert snap.size == vol["size"] and snap.zone == "fr-par-1"
    assert snap.project_id == served.default_project and snap.tags == [tag, "x"]
    assert snap.parent_volume.id == vol["id"] and snap.parent_volume.name == "vol-a"
    assert str(snap.class_) == "bssd" and snap.public is False and snap.references == []
    assert snap.created_at is not None and snap.updated_at is not None

    got = api.wait_for_snapshot(snapshot_id=snap.id,
                                options=WaitForOptions(timeout=60, min_delay=1, max_delay=1))
    assert str(got.status) == "available" and got.created_at == snap.created_at
    assert api.get_snapshot(snapshot_id=snap.id).name == "blk"

    upd = api.update_snapshot(snapshot_id=snap.id, name="blk2", tags=[tag, "y"])
    assert (upd.name, upd.tags) == ("blk2", [tag, "y"])
    # The same resource through the Instance API (it lists block snapshots too).
    inst = InstanceV1API(served.client()).get_snapshot(snapshot_id=snap.id).snapshot
    assert (inst.name, inst.tags, str(inst.volume_type)) == ("blk2", [tag, "y"], "b_ssd")

    api.delete_snapshot(snapshot_id=snap.id)
    with pytest.raises(ScalewayException) as exc:
        api.get_snapshot(snapshot_id=snap.id)
    status, body = _error(exc)
    assert status == 404 and body["type"] == "not_found"
    assert body["resource"] == "block_snapshot" and body["resource_id"] == snap.id


def test_paging_and_filters(served: Served) -> None:
    api = _block(served)
    tag, other = _tag(), _tag()
    vol_a, vol_b = served.volumes["vol-a"], served.volumes["vol-b"]
    ids = [api.create_snapshot(volume_id=vol_a["id"], public=False, name=f"pg-{i}",
                               tags=[tag]).id for i in range(5)]
    ids.append(api.create_snapshot(volume_id=vol_b["id"], public=False, name="pg-b",
                                   project_id=served.other_project, tags=[other]).id)
    for i in ids:
        _wait(api, i)
    first = api.list_snapshots(include_deleted=False, tags=[tag], page_size=2, page=1)
    assert int(first.total_count) == 5 and [s.id for s in first.snapshots] == ids[:2]
    last = api.list_snapshots(include_deleted=False, tags=[tag], page_size=2, page=3)
    assert [s.id for s in last.snapshots] == ids[4:5]
    # X-Total-Count beside the body.
    res = requests.get(f"{served.url}/block/v1/zones/fr-par-1/snapshots",
                       params={"tags": tag, "page_size": 2},
                       headers={"X-Auth-Token": SECRET}, timeout=30)
    assert res.headers["x-total-count"] == "5" and len(res.json()["snapshots"]) == 2
    everything = api.list_snapshots_all(include_deleted=False, tags=[tag], page_size=2)
    assert [s.id for s in everything] == ids[:5]
    # Tags: a snapshot with ANY of them.
    org_wide = _block(served, default_project_id=None)
    both = org_wide.list_snapshots_all(include_deleted=False, tags=[tag, other])
    assert {s.id for s in both} >= set(ids)
    desc = api.list_snapshots_all(include_deleted=False, tags=[tag], order_by="name_desc")
    assert [s.name for s in desc] == [f"pg-{i}" for i in range(4, -1, -1)]
    by_vol = api.list_snapshots_all(include_deleted=False, volume_id=vol_b["id"],
                                    project_id=served.other_project)
    assert [s.id for s in by_vol] == ids[5:]
    assert [s.id for s in api.list_snapshots_all(include_deleted=False, name="pg-3",
                                                 tags=[tag])] == ids[3:4]
    assert api.list_snapshots(include_deleted=False, tags=[tag], project_id=str(uuid.uuid4())
                              ).total_count in (0, "0")
    for i in ids:
        api.delete_snapshot(snapshot_id=i)


def test_volumes_and_the_instance_only_type(served: Served) -> None:
    api = _block(served)
    vols = _block(served, default_project_id=None).list_volumes_all(include_deleted=False)
    by_name = {v.name: v for v in vols}
    assert {"vol-a", "vol-b"} <= set(by_name) and "vol-c" not in by_name  # vol-c: nl-ams-1
    a = api.get_volume(volume_id=served.volumes["vol-a"]["id"])
    assert (a.size, str(a.type_), str(a.specs.class_)) == (8 << 20, "b_ssd", "bssd")
    assert api.list_volumes(include_deleted=False, zone="nl-ams-1").total_count == "1"
    # A local SSD (l_ssd) belongs to the Instance API: the Block API does not know it.
    name = f"lssd-{uuid.uuid4().hex[:6]}"
    res = snapfs_cli("volume", "create", name, "--size", "1M", "--type", "l_ssd",
                     store=served.store)
    assert res.returncode == 0, res.stderr
    lid = res.stdout.strip()
    try:
        assert name not in {v.name for v in api.list_volumes_all(include_deleted=False)}
        with pytest.raises(ScalewayException) as exc:
            api.get_volume(volume_id=lid)
        assert _error(exc)[0] == 404 and _error(exc)[1]["resource"] == "block_volume"
        inst = InstanceV1API(served.client())
        snap = inst.create_snapshot(name="local", volume_id=lid).snapshot
        with pytest.raises(ScalewayException) as exc:
            api.create_snapshot(volume_id=lid, public=False, name="nope")
        assert _error(exc)[0] == 404
        with pytest.raises(ScalewayException) as exc:
            api.get_snapshot(snapshot_id=snap.id)
        assert _error(exc)[0] == 404
        assert snap.id not in {s.id for s in api.list_snapshots_all(include_deleted=False,
                                                                    volume_id=lid)}
        with pytest.raises(ScalewayException):
            api.delete_snapshot(snapshot_id=snap.id)
        assert inst.get_snapshot(snapshot_id=snap.id).snapshot.id == snap.id  # unchanged
        # Made unified (SBS) through Instance, a snapshot of it is Block's; its parent
        # is named as it is, not as a Block volume the same API says does not exist.
        sbs = inst.create_snapshot(name="to-sbs", volume_id=lid, volume_type="unified").snapshot
        parent = api.get_snapshot(snapshot_id=sbs.id).parent_volume
        assert parent is not None
        assert (parent.id, parent.type_) == (lid, "l_ssd")
        assert str(parent.status) in ("snapshotting", "available")  # while it is captured
        for made in (snap, sbs):
            for _ in range(600):
                if str(inst.get_snapshot(snapshot_id=made.id).snapshot.state) == "available":
                    break
                time.sleep(0.05)
            inst.delete_snapshot(snapshot_id=made.id)
    finally:
        snapfs_cli("volume", "rm", name, store=served.store)
    types = api.list_volume_types(page_size=10)
    assert {str(t.type_) for t in types.volume_types} == {"b_ssd", "sbs_5k"}


def test_errors(served: Served) -> None:
    api = _block(served)
    vol = served.volumes["vol-a"]
    missing = str(uuid.uuid4())
    for call in (lambda: api.get_snapshot(snapshot_id=missing),
                 lambda: api.update_snapshot(snapshot_id=missing, name="x"),
                 lambda: api.delete_snapshot(snapshot_id=missing),
                 lambda: api.export_snapshot_to_object_storage(snapshot_id=missing,
                                                               bucket="b", key="k"),
                 lambda: api.get_volume(volume_id=missing),
                 lambda: api.create_snapshot(volume_id=missing, public=False)):
        with pytest.raises(ScalewayException) as exc:
            call()
        status, body = _error(exc)
        assert status == 404 and body["type"] == "not_found", body
        assert body["resource_id"] == missing
    before = api.list_snapshots(include_deleted=False, page_size=100).total_count
    # (the SDK reads total_count from X-Total-Count: a string)
    for kwargs, field in ((dict(page_size=101), "page_size"), (dict(page=0), "page"),
                          (dict(order_by="size_asc"), "order_by")):
        with pytest.raises(ScalewayException) as exc:
            api.list_snapshots(include_deleted=False, **kwargs)
        status, body = _error(exc)
        assert status == 400 and body["type"] == "invalid_arguments"
        assert body["details"][0]["argument_name"] == field
    for kwargs, field in ((dict(name="a/b"), "name"), (dict(public=True), "public")):
        with pytest.raises(ScalewayException) as exc:
            api.create_snapshot(volume_id=vol["id"], **{"public": False, **kwargs})
        status, body = _error(exc)
        assert status == 400 and body["details"][0]["argument_name"] == field
    # Refusals changed nothing.
    assert api.list_snapshots(include_deleted=False, page_size=100).total_count == before
    # 401 without a token and with a key that does not exist (as the API answers).
    with pytest.raises(ScalewayException) as exc:
        _block(served, secret_key=str(uuid.uuid4())).list_snapshots(include_deleted=False)
    assert _error(exc)[0] == 401 and _error(exc)[1]["type"] == "denied_authentication"
    assert _error(exc)[1]["reason"] == "not_found"
    res = requests.get(f"{served.url}/block/v1/zones/fr-par-1/snapshots", timeout=30)
    assert res.status_code == 401 and res.json()["type"] == "denied_authentication"
    assert res.json()["reason"] == "invalid_argument"


@pytest.mark.s3
def test_export_and_import_through_object_storage(served_s3: Served, s3_server: Any,
                                                  bucket: str, tmp_path: Path) -> None:
    api = _block(served_s3)
    vol = served_s3.volumes["vol-a"]
    snap = _wait(api, api.create_snapshot(volume_id=vol["id"], public=False, name="exp").id)
    out = api.export_snapshot_to_object_storage(snapshot_id=snap.id, bucket=bucket,
                                                key="exp.qcow2")
    assert out.id == snap.id and str(out.status) in ("exporting", "available")
    assert str(_wait(api, snap.id).status) == "available"
    head = s3_server.client().head_object(Bucket=bucket, Key="exp.qcow2")
    assert head["ContentLength"] > 0
    tag = _tag()
    imp = api.import_snapshot_from_object_storage(bucket=bucket, key="exp.qcow2", name="imp",
                                                  tags=[tag])
    assert str(imp.status) == "creating" and imp.parent_volume is None
    assert str(imp.class_) == "sbs"
    done = _wait(api, imp.id)
    assert str(done.status) == "available" and done.size == vol["size"]
    # Both snapshots' bytes: exported again and compared with the volume.
    api.export_snapshot_to_object_storage(snapshot_id=imp.id, bucket=bucket, key="again.qcow2")
    _wait(api, imp.id)
    for key in ("exp.qcow2", "again.qcow2"):
        img = tmp_path / key
        img.write_bytes(s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read())
        qemu_img_judges(img, Path(vol["path"]))
    with pytest.raises(ScalewayException) as exc:
        api.import_snapshot_from_object_storage(bucket=bucket, key="", name="bad")
    assert _error(exc)[0] == 400
    api.delete_snapshot(snapshot_id=imp.id)
    api.delete_snapshot(snapshot_id=snap.id)
