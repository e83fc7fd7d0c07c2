"""One module per kind of place in the tree; ``node_for`` builds the node of a key."""

from __future__ import annotations

from ..context import FsContext
from ..keys import Key, Kind
from .base import Entry, Handle, Node
from .extents import ChangeNode, ChangesNode, snapshot_file
from .hierarchy import ProjectNode, RootNode, TagsNode, VolumesNode, ZoneNode
from .imports import ImportNode, ImportsNode
from .snapshot import SnapshotNode
from .views import ViewNode

_NODES: dict[Kind, type[Node]] = {
    Kind.ROOT: RootNode, Kind.ZONE: ZoneNode, Kind.PROJECT: ProjectNode,
    Kind.SNAPSHOTS: ViewNode, Kind.VOLUME: ViewNode, Kind.TAG: ViewNode,
    Kind.VOLUMES: VolumesNode, Kind.TAGS: TagsNode,
    Kind.IMPORTS: ImportsNode, Kind.IMPORT: ImportNode, Kind.SNAPSHOT: SnapshotNode,
    Kind.CHANGES: ChangesNode, Kind.CHANGE: ChangeNode,
}


def node_for(ctx: FsContext, key: Key) -> Node:
    if key.kind is Kind.FILE:
        return snapshot_file(ctx, key)
    return _NODES[key.kind](ctx, key)


__all__ = ["Entry", "Handle", "Node", "node_for"]
