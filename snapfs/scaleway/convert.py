"""SDK objects (scaleway.instance.v1 / account.v3 dataclasses) -> our model.

The SDK parses dates into datetimes and states into str-enums; the model keeps
the API's JSON forms (RFC 3339 strings, plain strings), so ``to_api()`` of a
converted object equals what the API sent.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from ..model import (FAILED_STATES, PRODUCING_STATES, BaseVolume, Project, Snapshot, Task,
                     Volume, api_size)


def _date(value: dt.datetime | str | None) -> str:
    if value is None:
        return ""
    return value.isoformat() if isinstance(value, dt.datetime) else str(value)


def _opt_date(value: dt.datetime | str | None) -> str | None:
    return _date(value) or None


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def progress_of(state: str) -> int:
    """The API has no progress: 0 while the data is produced, 100 once it is --
    and 0 for a snapshot that failed (error, invalid_data): it did not complete,
    and does not claim to."""
    return 0 if state in PRODUCING_STATES or state in FAILED_STATES else 100


def snapshot(s: Any) -> Snapshot:
    bv = s.base_volume
    size, bad_size = api_size(s.size)
    state = "error" if bad_size else _text(s.state)
    return Snapshot(
        id=s.id, name=_text(s.name), organization=_text(s.organization),
        project=_text(s.project), tags=list(s.tags or []), volume_type=_text(s.volume_type),
        size=size, state=state,
        base_volume=None if bv is None else BaseVolume(id=_text(bv.id), name=_text(bv.name)),
        creation_date=_date(s.creation_date), modification_date=_date(s.modification_date),
        error_reason=bad_size or s.error_reason, zone=_text(s.zone),
        progress=progress_of(state))


def json_date(value: Any) -> str:
    """An API date as the SDK path above renders it (``+00:00``, not ``Z``)."""
    if not value:
        return ""
    try:
        return dt.datetime.fromisoformat(str(value)).isoformat()
    except ValueError:
        return str(value)


def snapshot_json(d: dict[str, Any]) -> Snapshot:
    """An Instance snapshot as the API's JSON -> the model, as ``snapshot`` would
    after the SDK's unmarshalling; for lists, where the SDK's per-field parsing
    (dateutil) was a third of the mount's listing time."""
    bv = d.get("base_volume")
    size, bad_size = api_size(d.get("size"))
    state = "error" if bad_size else _text(d.get("state"))
    return Snapshot(
        id=_text(d.get("id")), name=_text(d.get("name")),
        organization=_text(d.get("organization")), project=_text(d.get("project")),
        tags=[str(t) for t in d.get("tags") or []],
        volume_type=_text(d.get("volume_type") or "l_ssd"), size=size, state=state,
        base_volume=(BaseVolume(id=_text(bv.get("id")), name=_text(bv.get("name")))
                     if isinstance(bv, dict) else None),
        creation_date=json_date(d.get("creation_date")),
        modification_date=json_date(d.get("modification_date")),
        error_reason=bad_size or d.get("error_reason"), zone=_text(d.get("zone")),
        progress=progress_of(state))


def volume(v: Any) -> Volume:
    size, bad_size = api_size(v.size)
    return Volume(
        id=v.id, name=_text(v.name), size=size, volume_type=_text(v.volume_type),
        zone=_text(v.zone), project=_text(v.project), organization=_text(v.organization),
        state="error" if bad_size else _text(v.state), creation_date=_date(v.creation_date),
        modification_date=_date(v.modification_date), tags=list(v.tags or []))


def task(t: Any, zone: str) -> Task:
    return Task(
        id=_text(t.id), description=_text(t.description), progress=int(t.progress or 0),
        status=_text(t.status), zone=_text(t.zone) or zone,
        started_at=_opt_date(t.started_at), terminated_at=_opt_date(t.terminated_at),
        href_from=_text(t.href_from), href_result=_text(t.href_result))


def project(p: Any) -> Project:
    return Project(id=p.id, name=_text(p.name), organization=_text(p.organization_id),
                   created_at=_date(p.created_at), updated_at=_date(p.updated_at),
                   description=_text(p.description))
