"""The Block Storage <-> model mapping (snapfs.block_model), read back by the official
SDK's Block unmarshallers, and Set's comparison of dates as instants."""

from __future__ import annotations

import dataclasses

import pytest
from scaleway.block.v1.marshalling import unmarshal_Snapshot, unmarshal_Volume

from snapfs import block_model as bm
from snapfs.errors import InvalidArgument
from snapfs.model import Volume
from test_model import make_snapshot

ORG = "11111111-2222-3333-4444-555555555555"


def test_snapshot_to_block_is_what_the_sdk_reads_and_maps_back() -> None:
    snap = make_snapshot(state="snapshotting")
    body = bm.snapshot_to_block(snap)
    sdk = unmarshal_Snapshot(body)
    assert (sdk.id, sdk.name, sdk.size, sdk.project_id) == (snap.id, snap.name, snap.size,
                                                            snap.project)
    assert str(sdk.status) == "creating" and str(sdk.class_) == "bssd"
    assert sdk.parent_volume is not None and sdk.parent_volume.id == snap.base_volume.id
    assert sdk.created_at is not None and sdk.created_at.isoformat() == snap.creation_date
    back, extra = bm.snapshot_from_block(body, ORG)
    assert back == snap  # every model field survives the round trip
    assert extra == bm.BlockExtra(public=False, references=0, storage_class="bssd",
                                  status="creating")


@pytest.mark.parametrize("status,state,reason", [
    ("creating", "snapshotting", None), ("available", "available", None),
    ("in_use", "available", None), ("exporting", "exporting", None),
    ("error", "error", None), ("locked", "error", "locked by the provider"),
    ("deleting", "error", "being deleted"), ("weird", "error", "unknown status weird")])
def test_status_to_state(status: str, state: str, reason: str | None) -> None:
    body = bm.snapshot_to_block(make_snapshot()) | {"status": status, "class": "sbs",
                                                    "public": True,
                                                    "references": [{"id": "r"}]}
    snap, extra = bm.snapshot_from_block(body, ORG)
    assert (snap.state, snap.error_reason, snap.volume_type) == (state, reason, "unified")
    assert (extra.public, extra.references, extra.status) == (True, 1, status)


def test_volume_mapping() -> None:
    vol = Volume(id="v", name="data", size=1 << 30, volume_type="unified", zone="fr-par-1",
                 project=ORG, organization=ORG, creation_date="2026-01-01T00:00:00+00:00")
    body = bm.volume_to_block(vol)
    sdk = unmarshal_Volume(body)
    assert (str(sdk.type_), sdk.specs.class_, sdk.updated_at) == ("sbs_5k", "sbs", None)
    back = bm.volume_from_block(body, ORG)
    assert (back.id, back.volume_type, back.size) == ("v", "unified", 1 << 30)
    # A volume whose snapshot is being captured is in the SDK's transient status.
    busy = unmarshal_Volume(bm.volume_to_block(dataclasses.replace(vol, state="snapshotting")))
    assert str(busy.status) == "snapshotting"


def test_export_status_from_snapshot_status() -> None:
    assert bm.export_status("exporting", True) == "started"
    assert bm.export_status("available", True) == "success"
    assert bm.export_status("available", False) == "pending"
    assert bm.export_status("error", True) == "failure"


def test_set_compares_dates_as_instants() -> None:
    cur = make_snapshot(creation_date="2026-11-27T10:00:43.794569+00:00")
    # What the TypeScript SDK sends back: milliseconds, Z.
    make_snapshot(creation_date="2026-11-27T10:00:43.794Z", name="new").check_set(cur)
    make_snapshot(creation_date="2026-11-27T12:00:43.794569+02:00").check_set(cur)
    for other in ("2026-11-27T10:00:44.794Z", "2026-11-27T10:00:43.794569", "garbage"):
        with pytest.raises(InvalidArgument) as exc:
            dataclasses.replace(cur, creation_date=other).check_set(cur)
        assert exc.value.field == "creation_date"
