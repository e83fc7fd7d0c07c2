"""Block Storage API v1 <-> snapfs's resource model, field by field, in one place.

snapfs's resource is the Instance API's snapshot (``snapfs.model.Snapshot``, the
JSON of ``snapshot.json``). Since 2025 Scaleway keeps block volumes and their
snapshots in the Block Storage API (``/block/v1/zones/{zone}/...``); this module
is the one translation between the two shapes, used both ways: by ``snapfs
serve`` (model -> Block JSON) and by the cloud backend (Block JSON -> model).

Snapshot, Block -> model (``from_block``):

==================  ==========================================================
Block field         model (Instance-shaped) field
==================  ==========================================================
id, name, tags,     same names
size, zone
project_id          project; organization is the project's (the caller's)
status              state: creating -> snapshotting; available, in_use ->
                    available (in_use: a volume uses it, its data is
                    readable); exporting -> exporting; error -> error;
                    locked, deleting, deleted, unknown -> error, with
                    error_reason saying which
parent_volume       base_volume {id, name} (type, status dropped; null when
                    the snapshot was imported)
created_at          creation_date
updated_at          modification_date
class               volume_type: bssd -> b_ssd, sbs (and anything else) ->
                    unified, snapfs's name for a volume of the SBS class
public, references  not in the model: kept in ``BlockExtra`` (xattrs
class                user.public, user.references, user.class)
==================  ==========================================================

Local volumes each API shows (``snapfs serve``): the Block API shows volumes of
the block types (``b_ssd`` as class ``bssd``, ``unified`` as class ``sbs``) and
their snapshots; ``l_ssd`` volumes (local SSDs, which Scaleway keeps in the
Instance API) are unknown to it (404). The Instance API shows every snapshot
when unfiltered (Instance-era clients list block snapshots through it) and
honours List snapshots' ``volume_type`` filter; the cloud backend asks it only
for the types Instance owns on Scaleway since 2025 (``l_ssd``, ``unified``) and
keeps a snapshot both APIs list once, under Block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .model import BaseVolume, Snapshot, Volume, api_size

#: Local volume types the Block API shows, and the Block class and volume type of each.
BLOCK_CLASS = {"b_ssd": "bssd", "unified": "sbs"}
BLOCK_VOLUME_TYPE = {"b_ssd": "b_ssd", "unified": "sbs_5k"}
#: The inverse: a Block class -> the model's volume_type.
MODEL_VOLUME_TYPE = {"bssd": "b_ssd", "sbs": "unified"}
#: What a Block import creates locally (Scaleway's imports are SBS snapshots).
IMPORT_VOLUME_TYPE = "unified"
#: IOPS each Block volume type advertises (``specs.perf_iops``).
PERF_IOPS = {"b_ssd": 0, "sbs_5k": 5000}

#: Block's snapshot status -> the model's state (and error_reason when not ordinary).
STATE_OF_STATUS: dict[str, tuple[str, str | None]] = {
    "creating": ("snapshotting", None),
    "available": ("available", None),
    "in_use": ("available", None),
    "exporting": ("exporting", None),
    "error": ("error", None),
    "locked": ("error", "locked by the provider"),
    "deleting": ("error", "being deleted"),
    "deleted": ("error", "deleted"),
}
#: The model's state -> Block's snapshot status (what ``snapfs serve`` answers).
STATUS_OF_STATE = {"snapshotting": "creating", "importing": "creating",
                   "available": "available", "exporting": "exporting",
                   "error": "error", "invalid_data": "error"}
#: Block statuses in which the data is still being produced or moved (the SDK's
#: SNAPSHOT_TRANSIENT_STATUSES).
TRANSIENT_STATUSES = frozenset({"creating", "deleting", "exporting"})

#: Our resource names -> the Block API's, in ``not_found`` bodies.
BLOCK_RESOURCE = {"snapshot": "block_snapshot", "volume": "block_volume"}


def is_block_type(volume_type: str) -> bool:
    """Whether the Block API shows a local volume (or snapshot) of this type."""
    return volume_type in BLOCK_CLASS


@dataclass(frozen=True)
class BlockExtra:
    """What a Block snapshot has and the Instance-shaped model has not."""

    public: bool
    references: int
    storage_class: str
    status: str


# --- model -> Block JSON (snapfs serve) --------------------------------------------


def _date(value: str) -> str | None:
    # The SDKs parse dates strictly: an unknown date is null, never "".
    return value or None


def snapshot_to_block(snap: Snapshot, parent_type: str | None = None,
                      parent_status: str = "available") -> dict[str, Any]:
    """A local snapshot as the Block API's Snapshot JSON. ``parent_type`` and
    ``parent_status``: its volume's as it is now (the routes look it up; a volume
    deleted since is ``deleted``); without a type, the snapshot's says."""
    parent = None
    if snap.base_volume is not None:
        parent = {"id": snap.base_volume.id, "name": snap.base_volume.name,
                  "type": parent_type or BLOCK_VOLUME_TYPE.get(snap.volume_type, "sbs_5k"),
                  "status": parent_status}
    return {
        "id": snap.id, "name": snap.name, "size": snap.size, "project_id": snap.project,
        "references": [], "status": STATUS_OF_STATE.get(snap.state, "error"),
        "parent_volume": parent, "created_at": _date(snap.creation_date),
        "updated_at": _date(snap.modification_date), "tags": list(snap.tags),
        "zone": snap.zone, "class": BLOCK_CLASS.get(snap.volume_type, "sbs"),
        "public": False, "kms_key_id": None,
    }


def volume_status(vol: Volume) -> str:
    """A local volume's Block status."""
    return vol.state if vol.state in ("available", "snapshotting") else "in_use"


def volume_to_block(vol: Volume) -> dict[str, Any]:
    """A local volume as the Block API's Volume JSON."""
    vtype = BLOCK_VOLUME_TYPE.get(vol.volume_type, "sbs_5k")
    return {
        "id": vol.id, "name": vol.name, "type": vtype, "size": vol.size,
        "project_id": vol.project, "references": [],
        "created_at": _date(vol.creation_date), "updated_at": _date(vol.modification_date),
        "parent_snapshot_id": None,
        "status": volume_status(vol),
        "tags": list(vol.tags), "zone": vol.zone,
        "specs": {"class": BLOCK_CLASS.get(vol.volume_type, "sbs"),
                  "perf_iops": PERF_IOPS.get(vtype, 0)},
        "last_detached_at": None, "kms_key_id": None,
    }


# --- Block JSON -> model (the cloud backend) ---------------------------------------


def snapshot_from_block(data: dict[str, Any], organization: str) -> tuple[Snapshot, BlockExtra]:
    """A Block Snapshot JSON as the model's snapshot plus the Block-only fields.
    ``organization``: the Block API names only the project; the caller knows its
    organization (the project's)."""
    status = str(data.get("status") or "unknown_status")
    state, reason = STATE_OF_STATUS.get(status, ("error", f"unknown status {status}"))
    parent = data.get("parent_volume")
    base = (BaseVolume(id=str(parent["id"]), name=str(parent.get("name") or ""))
            if isinstance(parent, dict) and parent.get("id") else None)
    storage_class = str(data.get("class") or "sbs")
    size, bad_size = api_size(data.get("size"))
    if bad_size is not None:
        state, reason = "error", bad_size
    snap = Snapshot(
        id=str(data["id"]), name=str(data.get("name") or ""), organization=organization,
        project=str(data.get("project_id") or ""), tags=[str(t) for t in data.get("tags") or []],
        volume_type=MODEL_VOLUME_TYPE.get(storage_class, IMPORT_VOLUME_TYPE),
        size=size, state=state, base_volume=base,
        creation_date=str(data.get("created_at") or ""),
        modification_date=str(data.get("updated_at") or data.get("created_at") or ""),
        error_reason=reason, zone=str(data.get("zone") or ""))
    extra = BlockExtra(public=bool(data.get("public")),
                       references=len(data.get("references") or []),
                       storage_class=storage_class, status=status)
    return snap, extra


def volume_from_block(data: dict[str, Any], organization: str) -> Volume:
    """A Block Volume JSON as the model's volume (volume_type from its class)."""
    specs = data.get("specs") or {}
    storage_class = str(specs.get("class") or "sbs") if isinstance(specs, dict) else "sbs"
    size, bad_size = api_size(data.get("size"))
    return Volume(
        id=str(data["id"]), name=str(data.get("name") or ""), size=size,
        volume_type=MODEL_VOLUME_TYPE.get(storage_class, IMPORT_VOLUME_TYPE),
        zone=str(data.get("zone") or ""), project=str(data.get("project_id") or ""),
        organization=organization,
        state="error" if bad_size else str(data.get("status") or "available"),
        creation_date=str(data.get("created_at") or ""),
        modification_date=str(data.get("updated_at") or ""),
        tags=[str(t) for t in data.get("tags") or []])


def export_status(status: str, exported: bool) -> str:
    """A Block export has no task: the ``export`` file's task status derived from the
    snapshot's status. ``exported``: an export was asked for in this session."""
    if status == "exporting":
        return "started"
    if status in ("available", "in_use"):
        return "success" if exported else "pending"
    return "failure"
