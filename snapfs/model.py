"""The resource model, shaped exactly like the Scaleway Instance API's JSON.

Dataclasses are the in-memory form every layer passes around; ``to_api()``
gives the API's JSON object (what ``snapshot.json``, ``snapfs serve`` and the
official SDK's unmarshallers see) and ``from_api()`` reads it back.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .errors import InvalidArgument

ZONES: tuple[str, ...] = (
    "fr-par-1", "fr-par-2", "fr-par-3",
    "nl-ams-1", "nl-ams-2", "nl-ams-3",
    "pl-waw-1", "pl-waw-2", "pl-waw-3",
)
DEFAULT_ZONE = "fr-par-1"

VOLUME_TYPES: tuple[str, ...] = ("l_ssd", "b_ssd", "unified")

SNAPSHOT_STATES: tuple[str, ...] = (
    "available", "snapshotting", "error", "invalid_data", "importing", "exporting",
)
#: States in which the snapshot's data is still being produced or moved.
BUSY_STATES = frozenset({"snapshotting", "importing", "exporting"})
#: States in which the snapshot has no readable data.
FAILED_STATES = frozenset({"error", "invalid_data"})

TASK_STATUSES: tuple[str, ...] = ("pending", "started", "success", "failure", "retry")

MAX_PER_PAGE = 100
DEFAULT_PER_PAGE = 50


def now() -> str:
    """The current time in the API's RFC 3339 form (UTC, microseconds, +00:00)."""
    return dt.datetime.now(dt.timezone.utc).isoformat()


def new_id() -> str:
    return str(uuid.uuid4())


def check_zone(zone: str) -> str:
    if zone not in ZONES:
        raise InvalidArgument("zone", f"unknown zone {zone!r} (one of {', '.join(ZONES)})")
    return zone


def check_uuid(field_name: str, value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError):
        raise InvalidArgument(field_name, f"{value!r} is not a UUID") from None


def check_name(value: object, field_name: str = "name") -> str:
    """Names must be usable as a single path component as well as API names."""
    if not isinstance(value, str) or not value:
        raise InvalidArgument(field_name, "must be a non-empty string")
    if "/" in value or "\0" in value or value in (".", ".."):
        raise InvalidArgument(field_name,
                              f"{value!r} cannot contain '/' or NUL, nor be '.' or '..'")
    if len(value.encode()) > 255:
        raise InvalidArgument(field_name, "longer than 255 bytes")
    return value


def check_tags(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise InvalidArgument("tags", "must be a list of strings")
    for t in value:
        if not t or "," in t or "/" in t or "\0" in t:
            raise InvalidArgument("tags", f"tag {t!r} must be non-empty without ',', '/' or NUL")
    return list(value)


def check_paging(per_page: int | None, page: int | None) -> tuple[int, int]:
    per_page = DEFAULT_PER_PAGE if per_page is None else per_page
    page = 1 if page is None else page
    if not isinstance(per_page, int) or not 1 <= per_page <= MAX_PER_PAGE:
        raise InvalidArgument("per_page", f"must be between 1 and {MAX_PER_PAGE}")
    if not isinstance(page, int) or page < 1:
        raise InvalidArgument("page", "must be >= 1")
    return per_page, page


def check_volume_type(value: str) -> str:
    if value not in VOLUME_TYPES:
        raise InvalidArgument("volume_type", f"{value!r} is not one of {', '.join(VOLUME_TYPES)}")
    return value


T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a List plus the total count across all pages."""

    items: list[T]
    total_count: int


@dataclass(frozen=True)
class Project:
    id: str
    name: str
    organization: str
    created_at: str = ""
    updated_at: str = ""
    description: str = ""

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "organization_id": self.organization,
            "created_at": self.created_at, "updated_at": self.updated_at,
            "description": self.description,
        }


@dataclass(frozen=True)
class Volume:
    id: str
    name: str
    size: int
    volume_type: str
    zone: str
    project: str
    organization: str
    state: str = "available"
    creation_date: str = ""
    modification_date: str = ""
    tags: list[str] = field(default_factory=list)
    #: Local backend only: the raw image file or block device holding the data.
    path: str | None = None

    def to_api(self) -> dict[str, Any]:
        d = {
            "id": self.id, "name": self.name, "size": self.size,
            "volume_type": self.volume_type, "zone": self.zone, "project": self.project,
            "organization": self.organization, "state": self.state,
            "creation_date": self.creation_date, "modification_date": self.modification_date,
            "tags": list(self.tags), "export_uri": None, "server": None,
        }
        if self.path is not None:
            d["path"] = self.path
        return d


@dataclass(frozen=True)
class FileAccess:
    """A file's owner, group and permission bits (a volume file's, kept with a
    snapshot: its image.raw is readable by whom the volume file was)."""

    uid: int
    gid: int
    mode: int


@dataclass(frozen=True)
class BaseVolume:
    id: str
    name: str


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    organization: str
    project: str
    tags: list[str]
    volume_type: str
    size: int
    state: str
    base_volume: BaseVolume | None
    creation_date: str
    modification_date: str
    error_reason: str | None
    zone: str
    #: Not part of the API object: capture/import progress 0-100 (shown as user.progress).
    progress: int = 100
    #: Not part of the API object: why the snapshot may not be of one instant (its
    #: volume was written while it was read), or None (shown as user.warning).
    warning: str | None = None
    #: Not part of the API object: who may read image.raw -- its volume file's
    #: owner and mode when the snapshot was taken -- or None (imports, other backends).
    access: FileAccess | None = None

    #: Fields Set may not change; a differing value is an invalid argument.
    IMMUTABLE = ("id", "organization", "project", "size", "volume_type", "zone",
                 "creation_date", "base_volume")

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "organization": self.organization,
            "project": self.project, "tags": list(self.tags), "volume_type": self.volume_type,
            "size": self.size, "state": self.state,
            "base_volume": (None if self.base_volume is None
                            else {"id": self.base_volume.id, "name": self.base_volume.name}),
            "creation_date": self.creation_date, "modification_date": self.modification_date,
            "error_reason": self.error_reason, "zone": self.zone,
        }

    @classmethod
    def from_api(cls, data: object) -> "Snapshot":
        """Parse an API snapshot object; wrong shapes raise InvalidArgument."""
        if not isinstance(data, dict):
            raise InvalidArgument("snapshot", "must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)} - {"progress", "warning", "access"}
        unknown = set(data) - known
        if unknown:
            raise InvalidArgument(sorted(unknown)[0], "unknown field")
        missing = known - set(data)
        if missing:
            raise InvalidArgument(sorted(missing)[0], "missing")
        bv = data["base_volume"]
        if bv is not None:
            if not isinstance(bv, dict) or set(bv) != {"id", "name"}:
                raise InvalidArgument("base_volume", "must be null or {id, name}")
            bv = BaseVolume(id=bv["id"], name=bv["name"])
        if not isinstance(data["size"], int) or isinstance(data["size"], bool):
            raise InvalidArgument("size", "must be an integer")
        if data["error_reason"] is not None and not isinstance(data["error_reason"], str):
            raise InvalidArgument("error_reason", "must be a string or null")
        for name in ("id", "organization", "project", "volume_type", "state", "zone",
                     "creation_date", "modification_date"):
            if not isinstance(data[name], str):
                raise InvalidArgument(name, "must be a string")
        return cls(
            id=data["id"], name=check_name(data["name"]), organization=data["organization"],
            project=data["project"], tags=check_tags(data["tags"]),
            volume_type=data["volume_type"], size=data["size"], state=data["state"],
            base_volume=bv, creation_date=data["creation_date"],
            modification_date=data["modification_date"], error_reason=data["error_reason"],
            zone=data["zone"],
        )


@dataclass(frozen=True)
class Task:
    """The API's asynchronous task (Export snapshot returns one)."""

    id: str
    description: str
    progress: int
    status: str
    zone: str
    started_at: str | None = None
    terminated_at: str | None = None
    href_from: str = ""
    href_result: str = ""
    #: Not in the API object: why a failed task failed, and what it moved.
    error: str | None = None
    bucket: str = ""
    key: str = ""
    bytes: int = 0

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id, "description": self.description, "progress": self.progress,
            "status": self.status, "href_from": self.href_from,
            "href_result": self.href_result, "started_at": self.started_at,
            "terminated_at": self.terminated_at, "zone": self.zone,
        }
