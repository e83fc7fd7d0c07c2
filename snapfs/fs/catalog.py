"""The mount's cached view of the service: listings and resources with a short TTL.

Directory listings page through the service's List (``per_page`` 100) and are
kept for ``ttl`` seconds, so ``ls -l`` (readdir, then a stat of every entry) asks
the service once. Past the TTL a listing is still answered (stale-while-
revalidate, up to ``stale_max`` seconds old) while one fetch refreshes it in the
background: a listing that takes longer than the TTL to fetch (a cloud zone of
thousands of snapshots) would otherwise be refetched by every ``ls``, and a
lookup would wait for it. Changes made outside the mount therefore appear at
the second access after the TTL (the one after the refresh). The mount's own
changes invalidate the listings at once: the next access waits for a fresh
fetch. Concurrent requests for the same listing share one fetch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generic, TypeVar

import trio

from ..errors import NotFound, SnapfsError
from ..model import MAX_PER_PAGE, Page, Project, Snapshot, Volume
from ..service import SnapshotService
from . import names
from .keys import Kind, View

T = TypeVar("T")
N = TypeVar("N", bound=names.Named)

log = logging.getLogger(__name__)

DEFAULT_TTL = 2.0
#: Oldest listing answered while it is refreshed (seconds since its fetch began).
STALE_MAX = 60.0


@dataclass
class Listing(Generic[N]):
    """One directory's resources and their entry names, as fetched at ``fetched``."""

    items: list[N]
    by_label: dict[str, N]
    fetched: float
    generation: int


@dataclass
class _Cached(Generic[T]):
    value: T
    fetched: float
    generation: int = 0
    #: The listing this came with (its key), if any: while that listing is answered
    #: stale and holds it, so is this (a stat per entry of ``ls -l``, no Get each).
    listing: tuple[object, ...] | None = None


async def list_all(fetch: Callable[[int, int], Awaitable[Page[T]]]) -> list[T]:
    """Every item of a paged List, 100 per call."""
    items: list[T] = []
    page_no = 1
    while True:
        page = await fetch(MAX_PER_PAGE, page_no)
        items.extend(page.items)
        if not page.items or len(items) >= page.total_count:
            return items
        page_no += 1


@dataclass
class Catalog:
    svc: SnapshotService
    ttl: float = DEFAULT_TTL
    _listings: dict[tuple[object, ...], Listing[Any]] = field(default_factory=dict)
    _locks: dict[tuple[object, ...], trio.Lock] = field(default_factory=dict)
    _snapshots: dict[str, _Cached[Snapshot]] = field(default_factory=dict)
    _zones: _Cached[list[str]] | None = None
    _generation: int = 0
    stale_max: float = STALE_MAX
    #: Where background refreshes run (the mount's nursery); None: none, a stale
    #: listing is refetched in the foreground as a missing one is.
    nursery: trio.Nursery | None = None
    _fetchers: dict[tuple[object, ...], Callable[[], Awaitable[list[Any]]]] = field(
        default_factory=dict)
    _refreshing: set[tuple[object, ...]] = field(default_factory=set)

    # --- freshness -----------------------------------------------------------------

    def _fresh(self, fetched: float, generation: int) -> bool:
        return generation == self._generation and time.monotonic() - fetched < self.ttl

    def invalidate(self) -> None:
        """Forget every listing (the mount changed something). Cheap: listings
        are refetched on demand, and fetches already running are not stored."""
        self._generation += 1
        self._listings.clear()

    def remember(self, snap: Snapshot) -> Snapshot:
        self._snapshots[snap.id] = _Cached(snap, time.monotonic(), self._generation)
        return snap

    def forget(self, snapshot_id: str) -> None:
        self._snapshots.pop(snapshot_id, None)

    def _usable(self, key: tuple[object, ...]) -> Listing[Any] | None:
        """The listing of ``key`` if fresh, or stale but young enough to answer
        while a background refresh (started here) replaces it."""
        cached = self._listings.get(key)
        if cached is None or cached.generation != self._generation:
            return None
        age = time.monotonic() - cached.fetched
        if age < self.ttl:
            return cached
        if age >= self.stale_max or self.nursery is None or key not in self._fetchers:
            return None
        if key not in self._refreshing:
            self._refreshing.add(key)
            self.nursery.start_soon(self._refresh, key)
        return cached

    async def _refresh(self, key: tuple[object, ...]) -> None:
        try:
            await self._fetch(key, self._fetchers[key])
        except SnapfsError as exc:
            # Not answered stale any longer: the next access fetches and reports it.
            log.info("refreshing listing %s failed: %s", key, exc)
            self._listings.pop(key, None)
        finally:
            self._refreshing.discard(key)

    async def _listing(self, key: tuple[object, ...],
                       fetch: Callable[[], Awaitable[list[N]]]) -> Listing[N]:
        cached = self._usable(key)
        if cached is not None:
            return cached
        return await self._fetch(key, fetch)

    async def _fetch(self, key: tuple[object, ...],
                     fetch: Callable[[], Awaitable[list[N]]]) -> Listing[N]:
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            cached = self._listings.get(key)
            if cached is not None and self._fresh(cached.fetched, cached.generation):
                return cached
            generation, started = self._generation, time.monotonic()
            items = await fetch()
            listing = Listing(items, names.labels(items), started, generation)
            if generation == self._generation:
                self._listings[key] = listing
                self._fetchers[key] = fetch
            return listing

    # --- hierarchy -----------------------------------------------------------------

    async def zones(self) -> list[str]:
        if self._zones is None or time.monotonic() - self._zones.fetched > 60:
            self._zones = _Cached(await self.svc.list_zones(), time.monotonic())
        return self._zones.value

    async def projects(self) -> Listing[Project]:
        async def fetch() -> list[Project]:
            return list(await self.svc.list_projects())
        return await self._listing(("projects",), fetch)

    async def volumes(self, zone: str, project: str) -> Listing[Volume]:
        async def fetch() -> list[Volume]:
            return await list_all(lambda per_page, page: self.svc.list_volumes(
                zone, project=project, per_page=per_page, page=page))
        return await self._listing(("volumes", zone, project), fetch)

    async def project(self, project_id: str) -> Project:
        for p in (await self.projects()).items:
            if p.id == project_id:
                return p
        raise NotFound("project", project_id)

    async def volume(self, zone: str, project: str, volume_id: str) -> Volume:
        listing = await self.volumes(zone, project)
        for v in listing.items:
            if v.id == volume_id:
                return v
        vol = await self.svc.get_volume(zone, volume_id)
        if vol.project != project:
            raise NotFound("volume", volume_id)
        return vol

    # --- snapshots -----------------------------------------------------------------

    async def _list_snapshots(self, zone: str, project: str, view: View,
                              name: str | None = None) -> list[Snapshot]:
        filters = view.filters()
        items = await list_all(lambda per_page, page: self.svc.list_snapshots(
            zone, project=project, name=name, per_page=per_page, page=page,
            **filters))  # type: ignore[arg-type]
        now, gen = time.monotonic(), self._generation
        source = None if name is not None else ("snapshots", zone, project, view)
        for s in items:
            self._snapshots[s.id] = _Cached(s, now, gen, source)
        return items

    async def snapshots(self, zone: str, project: str, view: View) -> Listing[Snapshot]:
        return await self._listing(("snapshots", zone, project, view),
                                   lambda: self._list_snapshots(zone, project, view))

    def fresh_snapshots(self, zone: str, project: str, view: View) -> Listing[Snapshot] | None:
        """The listing of ``view`` if fresh or answered stale (see ``_usable``)."""
        return self._usable(("snapshots", zone, project, view))

    async def find_snapshot(self, zone: str, project: str, view: View,
                            entry: str) -> Snapshot | None:
        """The snapshot that entry name ``entry`` designates in ``view``. Uses the
        listing when fresh; otherwise asks only for the snapshots with that name
        (labels depend on nothing else), or for the ID."""
        listing = self.fresh_snapshots(zone, project, view)
        if listing is not None:
            found = listing.by_label.get(entry)  # what ls -l asks for: no relabelling
            if found is not None:
                return found
            if self._fresh(listing.fetched, listing.generation):
                return names.resolve(entry, listing.items)
            # Stale: a name it lacks may be new; ask the service below.
        ident = names.as_uuid(entry)
        if ident is not None:
            try:
                snap = await self.snapshot(zone, ident)
            except NotFound:
                return None
            return snap if in_view(snap, project, view) else None
        base = names.candidates_name(entry)
        if base is None:  # an escaped or cut label: only the whole listing has it
            return names.resolve(entry, (await self.snapshots(zone, project, view)).items)
        same = names.exact(await self._list_snapshots(zone, project, view, name=base),
                           [base, entry])
        return names.resolve(entry, same)

    async def named(self, zone: str, project: str, view: View, name: str) -> list[Snapshot]:
        """The snapshots of ``view`` named exactly ``name``, from the service."""
        return names.exact(await self._list_snapshots(zone, project, view, name=name), [name])

    async def taken(self, zone: str, project: str, view: View, name: str,
                    other_than: str | None = None) -> Snapshot | None:
        """The snapshot ``view`` already lists as ``name`` (by name, label or ID),
        but snapshot ``other_than`` (one being renamed), asking the service, not
        the cache: it may have been taken outside the mount a moment ago."""
        self.invalidate()
        same = [s for s in await self.named(zone, project, view, name) if s.id != other_than]
        taken = same[0] if same else await self.find_snapshot(zone, project, view, name)
        return None if taken is None or taken.id == other_than else taken

    async def label(self, snap: Snapshot, view: View) -> str:
        """The entry name ``snap`` is listed under in ``view`` now."""
        listing = self.fresh_snapshots(snap.zone, snap.project, view)
        if listing is not None:
            for label, item in listing.by_label.items():
                if item.id == snap.id:
                    return label
        same = names.exact(await self._list_snapshots(snap.zone, snap.project, view,
                                                      name=snap.name), [snap.name])
        return names.label_of(snap, same)

    async def snapshot(self, zone: str, snapshot_id: str, max_age: float | None = None) -> Snapshot:
        cached = self._snapshots.get(snapshot_id)
        if cached is not None and cached.value.zone != zone:
            # Kept by ID, and IDs are unique across zones: another zone's snapshot
            # is not this zone's (asked by ID under fr-par-2/, say), nor forgotten
            # because this zone does not have it.
            return await self._get_snapshot(zone, snapshot_id, forget=False)
        age = self.ttl if max_age is None else max_age
        if cached is not None and time.monotonic() - cached.fetched < age:
            return cached.value
        if cached is not None and max_age is None and cached.listing is not None \
                and cached.generation == self._generation:
            # Came with a listing still answered (stale, being refreshed) and that
            # fetch is the listing's latest (a newer one lacking it: ask the service).
            listing = self._usable(cached.listing)
            if listing is not None and cached.fetched >= listing.fetched:
                return cached.value
        return await self._get_snapshot(zone, snapshot_id)

    async def _get_snapshot(self, zone: str, snapshot_id: str, forget: bool = True) -> Snapshot:
        try:
            return self.remember(await self.svc.get_snapshot(zone, snapshot_id))
        except NotFound:
            if forget:
                self.forget(snapshot_id)
            raise

    async def tags(self, zone: str, project: str) -> list[str]:
        """The distinct tags of the project's snapshots, sorted."""
        listing = await self.snapshots(zone, project, View(Kind.SNAPSHOTS))
        return sorted({t for s in listing.items for t in s.tags})


def in_view(snap: Snapshot, project: str, view: View) -> bool:
    if snap.project != project:
        return False
    if view.kind is Kind.VOLUME:
        return snap.base_volume is not None and snap.base_volume.id == view.arg
    if view.kind is Kind.TAG:
        return view.arg in snap.tags
    return True
