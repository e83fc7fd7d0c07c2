"""Where a node sits in the tree: the stable keys that the inode table numbers.

The mount's layout (see the README) is fixed above the resources and dynamic
below them. A ``Key`` names one node by the IDs of the resources on its path
(zone, project ID, view, snapshot ID, file name), never by display names, so a
rename or a new duplicate name never changes which inode a node has. The
functions here are pure: which children a node has by structure alone, who
its parent is, and what may be done where.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.Enum):
    ROOT = "root"
    ZONE = "zone"                # <zone>/
    PROJECT = "project"          # <zone>/<project>/
    SNAPSHOTS = "snapshots"      # .../snapshots/          (a view of snapshots)
    VOLUMES = "volumes"          # .../volumes/
    VOLUME = "volume"            # .../volumes/<volume>/   (a view of snapshots)
    TAGS = "tags"                # .../tags/
    TAG = "tag"                  # .../tags/<tag>/         (a view of snapshots)
    IMPORTS = "imports"          # .../imports/
    IMPORT = "import"            # .../imports/<name>      (a file)
    SNAPSHOT = "snapshot"        # <view>/<snapshot>/
    FILE = "file"                # <view>/<snapshot>/{image.raw,snapshot.json,export,map.json}
    CHANGES = "changes"          # <view>/<snapshot>/changes/
    CHANGE = "change"            # <view>/<snapshot>/changes/<other>  (a file; not listed)


#: The sections of a project directory, in listing order.
SECTIONS: dict[str, Kind] = {
    "snapshots": Kind.SNAPSHOTS,
    "volumes": Kind.VOLUMES,
    "tags": Kind.TAGS,
    "imports": Kind.IMPORTS,
}

IMAGE = "image.raw"
JSON = "snapshot.json"
EXPORT = "export"
MAP = "map.json"
CHANGES_DIR = "changes"
#: The files of a snapshot directory, in listing order.
SNAPSHOT_FILES: tuple[str, ...] = (IMAGE, JSON, EXPORT, MAP)
#: The entries a snapshot directory shows only where the backend knows its
#: allocation (the local store; the cloud backend answers ENOTSUP).
ALLOCATION_ENTRIES = frozenset({MAP, CHANGES_DIR})

#: The directories whose entries are snapshots.
VIEW_KINDS = frozenset({Kind.SNAPSHOTS, Kind.VOLUME, Kind.TAG})


@dataclass(frozen=True)
class View:
    """Which listing a snapshot directory was reached through. Part of the key so
    that ``..`` of a snapshot directory is the directory it was listed in, and so
    that a rename can tell whether it stays within one view."""

    kind: Kind            # SNAPSHOTS, VOLUME or TAG
    arg: str = ""         # the volume ID for VOLUME, the tag for TAG

    def filters(self) -> dict[str, object]:
        """The List arguments (besides zone and project) selecting this view."""
        if self.kind is Kind.VOLUME:
            return {"base_volume_id": self.arg}
        if self.kind is Kind.TAG:
            return {"tags": [self.arg]}
        return {}


@dataclass(frozen=True)
class Key:
    kind: Kind
    zone: str = ""
    project: str = ""            # project ID
    view: View | None = None     # VOLUME, TAG, SNAPSHOT, FILE: the view; SNAPSHOTS: View(SNAPSHOTS)
    snapshot: str = ""           # SNAPSHOT, FILE: the snapshot ID
    name: str = ""               # FILE: the file name; IMPORT: the import's name;
                                 # CHANGE: the other snapshot's ID

    @property
    def is_dir(self) -> bool:
        return self.kind not in (Kind.FILE, Kind.IMPORT, Kind.CHANGE)

    @property
    def is_view(self) -> bool:
        return self.kind in VIEW_KINDS

    def parent(self) -> "Key":
        k = self.kind
        if k in (Kind.ROOT, Kind.ZONE):
            return ROOT
        if k is Kind.PROJECT:
            return Key(Kind.ZONE, self.zone)
        if k in (Kind.SNAPSHOTS, Kind.VOLUMES, Kind.TAGS, Kind.IMPORTS):
            return Key(Kind.PROJECT, self.zone, self.project)
        if k is Kind.VOLUME:
            return Key(Kind.VOLUMES, self.zone, self.project)
        if k is Kind.TAG:
            return Key(Kind.TAGS, self.zone, self.project)
        if k is Kind.IMPORT:
            return Key(Kind.IMPORTS, self.zone, self.project)
        if k is Kind.SNAPSHOT:
            assert self.view is not None
            return view_dir(self.zone, self.project, self.view)
        if k is Kind.CHANGE:
            return Key(Kind.CHANGES, self.zone, self.project, self.view, self.snapshot)
        assert k in (Kind.FILE, Kind.CHANGES)
        return Key(Kind.SNAPSHOT, self.zone, self.project, self.view, self.snapshot)


ROOT = Key(Kind.ROOT)


def zone_dir(zone: str) -> Key:
    return Key(Kind.ZONE, zone)


def project_dir(zone: str, project: str) -> Key:
    return Key(Kind.PROJECT, zone, project)


def view_dir(zone: str, project: str, view: View) -> Key:
    """The directory listing the snapshots of ``view``."""
    if view.kind is Kind.SNAPSHOTS:
        return Key(Kind.SNAPSHOTS, zone, project, View(Kind.SNAPSHOTS))
    return Key(view.kind, zone, project, view)


def volume_dir(zone: str, project: str, volume_id: str) -> Key:
    return view_dir(zone, project, View(Kind.VOLUME, volume_id))


def tag_dir(zone: str, project: str, tag: str) -> Key:
    return view_dir(zone, project, View(Kind.TAG, tag))


def snapshot_dir(view_key: Key, snapshot_id: str) -> Key:
    assert view_key.is_view and view_key.view is not None
    return Key(Kind.SNAPSHOT, view_key.zone, view_key.project, view_key.view, snapshot_id)


def change_file(changes: Key, other_id: str) -> Key:
    """``changes/<other>`` of a snapshot: the blocks that differ from ``other_id``."""
    return Key(Kind.CHANGE, changes.zone, changes.project, changes.view, changes.snapshot,
               other_id)


def import_file(zone: str, project: str, name: str) -> Key:
    return Key(Kind.IMPORT, zone, project, name=name)


def static_child(parent: Key, name: str) -> Key | None:
    """The child named ``name`` when the structure alone decides it (sections of a
    project, files of a snapshot); None when the service must be asked."""
    if parent.kind is Kind.PROJECT:
        kind = SECTIONS.get(name)
        if kind is None:
            return None
        if kind is Kind.SNAPSHOTS:
            return view_dir(parent.zone, parent.project, View(Kind.SNAPSHOTS))
        return Key(kind, parent.zone, parent.project)
    if parent.kind is Kind.SNAPSHOT:
        if name in SNAPSHOT_FILES:
            return Key(Kind.FILE, parent.zone, parent.project, parent.view, parent.snapshot,
                       name)
        if name == CHANGES_DIR:
            return Key(Kind.CHANGES, parent.zone, parent.project, parent.view,
                       parent.snapshot)
    return None


def may_create_snapshot_in(parent: Key) -> bool:
    """mkdir makes a snapshot only in ``volumes/<volume>/`` (the volume to capture
    is the directory's); everywhere else it has no meaning."""
    return parent.kind is Kind.VOLUME


def same_place(a: Key, b: Key) -> bool:
    """A rename may only change a name: both directories must be the same view of
    the same project in the same zone."""
    return a == b and a.is_view
