"""The resource model, shaped exactly like the Scaleway Instance API's JSON.

Dataclasses are the in-memory form every layer passes around; ``to_api()``
gives the API's JSON object (what ``snapshot.json``, ``snapfs serve`` and the
official SDK's unmarshallers see) and ``from_api()`` reads it back.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .errors import InvalidArgument, PreconditionFailed, SnapshotUnusable

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
# The one state rule, for every backend and the filesystem alike: a snapshot is
# readable when available or exporting; it has no data YET while producing (a
# reader may wait), and never will once failed; busy (`snapfs wait` waits) while
# its data is produced or moved.
#: States in which the snapshot's data is still being produced (not readable yet).
PRODUCING_STATES = frozenset({"snapshotting", "importing"})
#: States in which the snapshot's data is still being produced or moved.
BUSY_STATES = PRODUCING_STATES | {"exporting"}
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


#: The one form of an ID the API reads and writes: Scaleway's IDs are lower-case and
#: compared as strings, so "ABC..." or "{...}" would name nothing there either.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def check_uuid(field_name: str, value: object) -> str:
    """``value`` if it is a UUID in the canonical form (lower-case 8-4-4-4-12); any
    other spelling (upper case, braces, urn:, no dashes) is refused, not rewritten:
    a body accepting it while a path 404s on it was inconsistent."""
    if not isinstance(value, str) or not _CANONICAL_UUID.fullmatch(value):
        raise InvalidArgument(field_name, f"{value!r} is not a UUID (lower-case "
                              "8-4-4-4-12 hexadecimal digits)")
    return value


#: The naming rule (README, "Names"): at most this many bytes of UTF-8.
NAME_MAX_BYTES = 255
#: Tags: at most this many bytes each, and this many per resource. Scaleway's
#: Instance API documents no limit; these keep every tag a directory name of
#: ``tags/`` and a ``user.tags`` value well within the kernel's 64 KiB.
TAG_MAX_BYTES = 128
MAX_TAGS = 64

#: C0 controls, DEL and C1 controls: never in a name or tag (a newline in a
#: name forges log lines and breaks every line-based tool).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: ``~`` marks the labels the tree lists duplicates and unshowable names under.
_NAME_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f/~]")
#: Tags also may not hold ``,``: ``user.tags`` separates them with it.
_TAG_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f/~,]")


def utf8_len(value: str) -> int | None:
    """Bytes of ``value`` in UTF-8; None when it holds lone surrogates (the
    form undecodable bytes take in Python), which have no UTF-8."""
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return None


def _char(ch: str) -> str:
    return repr(ch)[1:-1] if _CONTROL.match(ch) else ch


def is_uuid(value: str) -> bool:
    """Whether ``value`` parses as a UUID in any form Python accepts."""
    try:
        uuid.UUID(value)
    except (ValueError, TypeError):
        return False
    return True


def _text_problem(value: str, kind: str, max_bytes: int, forbidden: "re.Pattern[str]",
                  allowed: str) -> str | None:
    """Why ``value`` cannot be a name or tag (None: it can): the one shape of both
    rules, which differ in their limit and their forbidden characters."""
    if not value:
        return "must not be empty"
    if value in (".", ".."):
        return f"{value!r} is not a usable {kind}"
    size = utf8_len(value)
    if size is None:
        return "must be valid UTF-8 text"
    if size > max_bytes:
        return f"longer than {max_bytes} bytes ({size})"
    bad = forbidden.search(value)
    if bad is not None:
        return f"cannot contain '{_char(bad.group())}' ({allowed})"
    return None


def name_problem(value: str) -> str | None:
    """Why ``value`` cannot be a resource name (None: it can). The one naming
    rule of mkdir, rename, ``user.name``, ``imports/``, the CLI and serve: a name
    is also a path component and must never be mistaken for an ID or a label."""
    problem = _text_problem(value, "name", NAME_MAX_BYTES, _NAME_FORBIDDEN,
                            "no '/', '~' or control characters")
    if problem is None and is_uuid(value):
        return "cannot be a UUID: IDs resolve as paths"
    return problem


def check_name(value: object, field_name: str = "name") -> str:
    """``value`` if it is a usable name, else InvalidArgument saying why."""
    if not isinstance(value, str):
        raise InvalidArgument(field_name, "must be a string")
    problem = name_problem(value)
    if problem is not None:
        raise InvalidArgument(field_name, problem)
    return value


def tag_problem(tag: str) -> str | None:
    """Why ``tag`` cannot be a tag (None: it can): the naming rule's kind, with
    ``,`` reserved and a shorter limit."""
    return _text_problem(tag, "tag", TAG_MAX_BYTES, _TAG_FORBIDDEN,
                         "no ',', '/', '~' or control characters")


def check_tags(value: object) -> list[str]:
    """The tags, each checked, duplicates dropped (first kept), at most MAX_TAGS."""
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise InvalidArgument("tags", "must be a list of strings")
    out = list(dict.fromkeys(value))
    for t in out:
        problem = tag_problem(t)
        if problem is not None:
            shown = t if len(t) <= 40 else t[:40] + "..."
            raise InvalidArgument("tags", f"tag {shown!r}: {problem}")
    if len(out) > MAX_TAGS:
        raise InvalidArgument("tags", f"more than {MAX_TAGS} tags ({len(out)})")
    return out


def check_tag_filter(value: object) -> list[str]:
    """Tags to filter a List by: any stored tag may be asked for (one made
    before the tag rule included), so only the shape is checked."""
    if not isinstance(value, list) or not all(isinstance(t, str) and t for t in value):
        raise InvalidArgument("tags", "must be a list of non-empty strings")
    return list(value)


#: Largest size a volume or imported snapshot may have (8 EiB less a sector:
#: SQLite's integers are signed 64-bit).
MAX_SIZE = (1 << 63) - 512


def check_size(value: object, field_name: str = "size") -> int:
    """A size in bytes: a positive multiple of 512 (the API's rule), bounded."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % 512:
        raise InvalidArgument(field_name, "must be a positive multiple of 512 bytes")
    if value > MAX_SIZE:
        raise InvalidArgument(field_name, f"larger than {MAX_SIZE} bytes")
    return value


#: Largest size believed from a cloud API: far above any volume Scaleway offers
#: (10 TB), far below a size that would make image.raw an absurd sparse file.
MAX_API_SIZE = 1 << 50


def api_size(value: object) -> tuple[int, str | None]:
    """A size as a cloud API sent it: ``(size, None)``, absent being 0 (a snapshot
    still being made); or ``(0, why)`` for one no volume has -- negative, absurdly
    large, not an integer --, for the caller to show that resource in ``error``
    rather than fail a whole listing or offer a huge image."""
    if value is None:
        return 0, None
    if isinstance(value, int) and not isinstance(value, bool) \
            and 0 <= value <= MAX_API_SIZE:
        return value, None
    shown = repr(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return 0, f"the API gave an impossible size: {shown}"


#: Highest page number a List accepts: offsets stay far inside SQLite's int64.
MAX_PAGE = 1 << 31


def check_paging(per_page: int | None, page: int | None) -> tuple[int, int]:
    per_page = DEFAULT_PER_PAGE if per_page is None else per_page
    page = 1 if page is None else page
    if not isinstance(per_page, int) or not 1 <= per_page <= MAX_PER_PAGE:
        raise InvalidArgument("per_page", f"must be between 1 and {MAX_PER_PAGE}")
    if not isinstance(page, int) or not 1 <= page <= MAX_PAGE:
        raise InvalidArgument("page", f"must be between 1 and {MAX_PAGE}")
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


def _instant(value: str) -> dt.datetime | None:
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _same_value(name: str, sent: object, current: object) -> bool:
    """Whether a Set leaves a read-only field as it is: dates compare as instants
    (a client may send ``...43.794Z`` for ``...43.794569+00:00``: JavaScript keeps
    milliseconds), everything else as values."""
    if name.endswith("_date") and isinstance(sent, str) and isinstance(current, str):
        a, b = _instant(sent), _instant(current)
        if a is not None and b is not None:
            # Equal to the sender's precision: milliseconds are the coarsest a client keeps.
            return abs(a - b) < dt.timedelta(milliseconds=1)
    return sent == current


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
    #: Not part of the API object: which cloud API owns the snapshot (``instance`` or
    #: ``block``, shown as user.api), None on the local store; and the fields only
    #: that API has (Block's public, references, class), shown as user.<name>.
    api: str | None = None
    api_xattrs: tuple[tuple[str, str], ...] = ()

    #: Fields Set may not change; a differing value is an invalid argument.
    IMMUTABLE = ("id", "organization", "project", "size", "volume_type", "zone",
                 "creation_date", "base_volume")

    def check_set(self, current: "Snapshot") -> None:
        """Refuse a Set of ``self`` over ``current`` that changes an immutable
        field. The name and tags are what a Set changes; the fields the service
        moves on its own (state, error_reason, modification_date) are ignored when
        they differ, so that a get-then-set round trip still works once the
        snapshot moved meanwhile (as the API's Set keeps only what it can set)."""
        for name in self.IMMUTABLE:
            if not _same_value(name, getattr(self, name), getattr(current, name)):
                raise InvalidArgument(name, "cannot be changed (only name and tags can be set)")

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
        known = {f.name for f in dataclasses.fields(cls)} - {"progress", "warning", "access",
                                                             "api", "api_xattrs"}
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
        if not isinstance(data["name"], str):
            raise InvalidArgument("name", "must be a string")
        if not isinstance(data["tags"], list) or not all(isinstance(t, str)
                                                         for t in data["tags"]):
            raise InvalidArgument("tags", "must be a list of strings")
        # The naming and tag rules apply to what a Set changes (the service checks
        # them): a name stored before the rule may be kept while tags change.
        return cls(
            id=data["id"], name=data["name"], organization=data["organization"],
            project=data["project"], tags=list(data["tags"]),
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


def export_href(snapshot_id: str) -> str:
    """An export task's ``href_from``: the one form Export and Get task both answer."""
    return f"/snapshots/{snapshot_id}/export"


def check_readable(snap: "Snapshot") -> None:
    """The state rule for reading a snapshot's data: refused for good when it
    failed (SnapshotUnusable), for now while it is produced (PreconditionFailed)."""
    if snap.state in FAILED_STATES:
        raise SnapshotUnusable(f"snapshot {snap.name!r} is in state {snap.state}: "
                               f"{snap.error_reason or 'no data'}")
    if snap.state in PRODUCING_STATES:
        raise PreconditionFailed(f"snapshot {snap.name!r} is still {snap.state}")
