"""Block Storage v1 volume create/update/delete through the official Python SDK
against `snapfs serve`: mapped onto volumes the store makes (``volume create``),
with clear refusals (400) for what the store cannot do."""

from __future__ import annotations

import pytest
from scaleway.block.v1 import BlockV1API
from scaleway.block.v1.types import (CreateVolumeRequestFromEmpty,
                                     CreateVolumeRequestFromSnapshot)
from scaleway_core.api import ScalewayException
from scaleway_core.utils import WaitForOptions

from fixtures_http import Served

GiB = 1 << 30


def _names(api: BlockV1API) -> set[str]:
    return {v.name for v in api.list_volumes_all(include_deleted=False)}


def _status(fn: object, *args: object, **kwargs: object) -> int:
    with pytest.raises(ScalewayException) as exc:
        fn(*args, **kwargs)  # type: ignore[operator]
    return exc.value.status_code


def test_create_update_delete_volume(served: Served) -> None:
    api = BlockV1API(served.client())
    vol = api.create_volume(name="made", from_empty=CreateVolumeRequestFromEmpty(size=GiB),
                            tags=["a", "b"])
    assert (vol.name, vol.size, vol.type_, vol.tags) == ("made", GiB, "sbs_5k", ["a", "b"])
    assert vol.specs is not None and vol.specs.perf_iops == 5000
    assert api.get_volume(volume_id=vol.id).name == "made"
    assert "made" in _names(api)

    # A snapshot of it, through Block: the volume is a real one of the store.
    snap = api.create_snapshot(volume_id=vol.id, name="of-made", public=False)
    snap = api.wait_for_snapshot(snapshot_id=snap.id,
                                 options=WaitForOptions(timeout=60, min_delay=1))
    assert snap.status == "available" and snap.size == GiB
    assert snap.parent_volume is not None
    assert (snap.parent_volume.type_, snap.parent_volume.status) == ("sbs_5k", "available")

    updated = api.update_volume(volume_id=vol.id, name="renamed", tags=["c"])
    assert (updated.name, updated.tags) == ("renamed", ["c"])
    assert api.get_volume(volume_id=vol.id).name == "renamed"

    # Refusals: 400 each, nothing changed.
    before = _names(api)
    assert _status(api.update_volume, volume_id=vol.id, size=2 * GiB) == 400
    assert _status(api.update_volume, volume_id=vol.id, perf_iops=15000) == 400
    assert _status(api.update_volume, volume_id=vol.id, name="vol-a") == 400  # taken
    assert _status(api.create_volume, name="restored",
                   from_snapshot=CreateVolumeRequestFromSnapshot(snapshot_id=snap.id)) == 400
    assert _status(api.create_volume, name="fast", perf_iops=15000,
                   from_empty=CreateVolumeRequestFromEmpty(size=GiB)) == 400
    # A bad tag is refused before the volume is made (not made, then refused).
    assert _status(api.create_volume, name="badtag", tags=["a/b"],
                   from_empty=CreateVolumeRequestFromEmpty(size=GiB)) == 400
    # vol-a is a file registered by `snapfs volume add`: its file is not the API's to
    # delete.
    assert _status(api.delete_volume, volume_id=served.volumes["vol-a"]["id"]) == 400
    assert _names(api) == before
    assert api.get_volume(volume_id=vol.id).size == GiB

    api.delete_volume(volume_id=vol.id)
    assert _status(api.get_volume, volume_id=vol.id) == 404
    assert "renamed" not in _names(api)
    assert _status(api.delete_volume, volume_id=vol.id) == 404
    # Its snapshot stays (as Block's do when their volume goes), and says its
    # parent is gone, in Get and List alike (it said `available` before).
    kept = api.get_snapshot(snapshot_id=snap.id)
    assert kept.status == "available"
    assert kept.parent_volume is not None and kept.parent_volume.status == "deleted"
    listed = {s.id: s for s in api.list_snapshots_all(include_deleted=False)}
    assert listed[snap.id].parent_volume.status == "deleted"  # type: ignore[union-attr]
    api.delete_snapshot(snapshot_id=snap.id)

