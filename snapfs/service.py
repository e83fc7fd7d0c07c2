"""The backend-neutral snapshot service: what the filesystem, the HTTP front end
and the CLI call, whichever backend (local store, Scaleway API) answers.

Every method is async and raises only ``snapfs.errors`` kinds. Arguments use
the Scaleway Instance API's names so that a cloud backend passes them through.
"""

from __future__ import annotations

import abc

from .errors import NotSupported, SnapfsError
from .model import DEFAULT_ZONE, MAX_PER_PAGE, Page, Project, Snapshot, Task, Volume


#: What ImageReader.read_transient returns: bytes, or a read-only view.
Buffer = bytes | memoryview


class ImageReader(abc.ABC):
    """Random access to one snapshot's bytes; holes read as zeros."""

    size: int

    @abc.abstractmethod
    async def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (short only at the end of the image).
        Corrupt stored data raises ``CorruptData``, never returns wrong bytes."""

    async def read_transient(self, offset: int, length: int) -> Buffer:
        """As read(), for a caller that is done with the bytes before it next
        awaits (a FUSE reply): a reader may then lend a view of a buffer it
        reuses later, and save a copy per request."""
        return await self.read(offset, length)

    async def read_into(self, offset: int, into: memoryview) -> None:
        """Exactly ``len(into)`` bytes at ``offset`` into ``into`` (a streaming
        caller's own buffer). A reader may read them there straight from its
        store, checked, saving the copy out of its own buffers."""
        got = await self.read_transient(offset, len(into))
        if len(got) != len(into):
            raise SnapfsError(f"snapshot read returned {len(got)} bytes at {offset}, "
                              f"expected {len(into)}")
        into[:] = got

    async def next_allocated(self, offset: int) -> int:
        """The first offset >= ``offset`` that may hold data (``size`` when none):
        export walks the allocation, not the address space. Default: anywhere."""
        return min(offset, self.size)

    async def next_hole(self, offset: int) -> int:
        """The first offset >= ``offset`` in a hole (``size`` when none: the end
        is one), for SEEK_HOLE. Default: no holes."""
        return self.size

    async def allocated_bytes(self) -> int | None:
        """Bytes the snapshot's allocation holds (holes excluded), None when not
        known cheaply: export sizes its parts from it."""
        return None

    @abc.abstractmethod
    async def aclose(self) -> None:
        ...


class SnapshotService(abc.ABC):
    """One backend. Zones and projects are the hierarchy; snapshots the resource."""

    # --- hierarchy -----------------------------------------------------------------

    @abc.abstractmethod
    async def list_zones(self) -> list[str]:
        """The zones this backend serves, default zone first."""

    @abc.abstractmethod
    async def list_projects(self) -> list[Project]:
        ...

    @abc.abstractmethod
    async def list_volumes(self, zone: str, *, project: str | None = None,
                           name: str | None = None, per_page: int | None = None,
                           page: int | None = None) -> Page[Volume]:
        ...

    @abc.abstractmethod
    async def get_volume(self, zone: str, volume_id: str) -> Volume:
        ...

    # --- volumes the backend holds (the Block API's create/update/delete) ---------
    # Not every backend can: the default refuses (NotSupported, HTTP 501).

    async def create_volume(self, name: str, size: int, *, zone: str = DEFAULT_ZONE,
                            project: str | None = None, volume_type: str = "b_ssd"
                            ) -> Volume:
        """A new empty volume of ``size`` bytes."""
        raise NotSupported("this backend cannot create volumes")

    async def update_volume(self, zone: str, volume_id: str, *, name: str | None = None,
                            tags: list[str] | None = None) -> Volume:
        raise NotSupported("this backend cannot change volumes")

    async def delete_volume(self, zone: str, volume_id: str) -> None:
        raise NotSupported("this backend cannot delete volumes")

    # --- snapshots -----------------------------------------------------------------

    @abc.abstractmethod
    async def list_snapshots(self, zone: str, *, organization: str | None = None,
                             project: str | None = None, name: str | None = None,
                             tags: list[str] | None = None, base_volume_id: str | None = None,
                             per_page: int | None = None, page: int | None = None
                             ) -> Page[Snapshot]:
        """One page in a stable order (creation, then id). ``name`` matches as a
        substring, like the API; ``tags`` requires every listed tag."""

    async def list_all_snapshots(self, zone: str, *, organization: str | None = None,
                                 project: str | None = None, name: str | None = None,
                                 tags: list[str] | None = None,
                                 base_volume_id: str | None = None,
                                 volume_types: tuple[str, ...] | None = None
                                 ) -> list[Snapshot]:
        """Every snapshot of list_snapshots' pages, in their order (``volume_types``:
        only those types). Backends that can do better than paging override it."""
        out: list[Snapshot] = []
        page = 1
        while True:
            res = await self.list_snapshots(zone, organization=organization, project=project,
                                            name=name, tags=tags,
                                            base_volume_id=base_volume_id,
                                            per_page=MAX_PER_PAGE, page=page)
            out += res.items
            if not res.items or len(out) >= res.total_count:
                break
            page += 1
        return [s for s in out if volume_types is None or s.volume_type in volume_types]

    @abc.abstractmethod
    async def create_snapshot(self, zone: str, *, name: str, volume_id: str | None = None,
                              tags: list[str] | None = None, project: str | None = None,
                              organization: str | None = None, volume_type: str | None = None,
                              bucket: str | None = None, key: str | None = None,
                              size: int | None = None, unique_name: bool = False) -> Snapshot:
        """From a volume (``volume_id``; state ``snapshotting``) or from a QCOW2 object
        (``bucket``/``key``/``size``; state ``importing``). Returns at once; the data
        is captured in the background. ``unique_name``: AlreadyExists if the project
        has a snapshot of that name in the zone (the API allows duplicates, the
        tree does not); a backend that can checks it atomically with the create, so
        that two processes on one store cannot both take a name."""

    @abc.abstractmethod
    async def get_snapshot(self, zone: str, snapshot_id: str) -> Snapshot:
        ...

    @abc.abstractmethod
    async def set_snapshot(self, zone: str, snapshot: Snapshot) -> Snapshot:
        """Replace all mutable properties; immutable ones must be unchanged."""

    @abc.abstractmethod
    async def update_snapshot(self, zone: str, snapshot_id: str, *, name: str | None = None,
                              tags: list[str] | None = None,
                              unique_name: bool = False) -> Snapshot:
        """``unique_name``: AlreadyExists if another snapshot of the project in the
        zone has the new name (a rename, which never replaces one); checked
        atomically with the update where the backend can, as for create."""

    @abc.abstractmethod
    async def delete_snapshot(self, zone: str, snapshot_id: str) -> None:
        """Refused (PreconditionFailed) while exporting or importing."""

    @abc.abstractmethod
    async def export_snapshot(self, zone: str, snapshot_id: str, *, bucket: str,
                              key: str) -> Task:
        ...

    @abc.abstractmethod
    async def get_task(self, zone: str, task_id: str) -> Task:
        ...

    async def latest_export(self, zone: str, snapshot_id: str) -> Task | None:
        """The snapshot's most recent export task, where the backend keeps them (the
        local store does; the Scaleway API has no such query): lets ``export``
        show a status across restarts. None when unknown."""
        return None

    def store_version(self) -> object:
        """A value that moves whenever this process changes what the lists show,
        through any path (a capture ending in the background, a mount's mkdir
        beside `--listen`): what `snapfs serve` keeps between a listing's pages is
        stale once it moves. None where the backend cannot tell (kept lists then
        last their TTL)."""
        return None

    # --- allocation (backup tools; see snapfs/local/extents.py) ----------------------

    #: Whether allocated_extents/changed_extents can answer (the tree then shows
    #: map.json and changes/ in each snapshot directory).
    knows_allocation = False

    async def stored_bytes(self, zone: str, snapshot_id: str) -> int | None:
        """Bytes of the snapshot's image actually stored (holes excluded): its
        st_blocks. None where the backend cannot know (or not yet)."""
        return None

    async def allocated_extents(self, zone: str, snapshot_id: str
                                ) -> list[tuple[int, int, bool]]:
        """(start, length, data) covering the whole image; data False reads as zeros.
        NotSupported where the backend cannot know."""
        raise NotSupported(f"snapshot {snapshot_id}: this backend does not know which "
                           "blocks are allocated")

    async def changed_extents(self, zone: str, snapshot_id: str, other_id: str
                              ) -> list[tuple[int, int, bool]]:
        """The extents of ``snapshot_id`` whose bytes differ from ``other_id``'s, at the
        backend's block granularity, without reading data. InvalidArgument for
        snapshots of different volumes or sizes; NotSupported where unknown."""
        raise NotSupported(f"snapshot {snapshot_id}: this backend does not know which "
                           "blocks changed")

    # --- data ----------------------------------------------------------------------

    @abc.abstractmethod
    async def open_image(self, zone: str, snapshot_id: str) -> ImageReader:
        """A reader of an ``available`` snapshot's bytes. Raises SnapshotUnusable for
        ``error``/``invalid_data`` and PreconditionFailed while still being produced."""

    async def aclose(self) -> None:
        """Stop background work (captures, uploads) leaving the store consistent."""
