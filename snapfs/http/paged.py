"""Lists that `snapfs serve` pages through, kept between the pages of one listing.

A client lists by asking page 1, learning the total from it, then asking the
other pages (the cloud backend asks them all at once). Each page computed from
the store on its own would rescan the table per page; instead the whole
filtered, ordered list of a query is computed at its page 1 and later pages of
the same query are cut from it for ``TTL`` seconds, so a listing costs one scan
and its pages are consistent with each other. Any change made through the
server (every request but GET/HEAD) drops what is kept, and so does any other
change of this process the service reports through its ``store_version`` (a
capture ending in the background, a mount's mkdir beside `--listen`); changes
made to the store by another process show on the next page 1.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable, NamedTuple, TypeVar

T = TypeVar("T")

TTL = 30.0
#: Queries kept at once (one per listing being paged through); the oldest goes first.
MAX_KEPT = 64
#: Items kept at once over all queries (a snapshot is ~1 KB in memory): the oldest
#: lists go first; a list longer than this is answered but not kept (its later
#: pages are computed again, each a scan).
MAX_ITEMS = 100_000


class _Kept(NamedTuple):
    fetched: float  # time.monotonic() of its page 1
    version: object  # the service's store_version() then
    items: list[Any]


class PagedLists:
    def __init__(self, ttl: float = TTL, max_kept: int = MAX_KEPT,
                 max_items: int = MAX_ITEMS,
                 version: Callable[[], object] = lambda: None) -> None:
        """``version``: a value that moves whenever the service's answers may have
        (SnapshotService.store_version); a kept list of another version is stale."""
        self.ttl = ttl
        self.max_kept = max_kept
        self.max_items = max_items
        self.version = version
        self._kept: dict[tuple[Any, ...], _Kept] = {}
        self._generation = 0

    async def get(self, query: tuple[Any, ...], page: int,
                  compute: Callable[[], Awaitable[list[T]]]) -> list[T]:
        """The list of ``query``: computed at page 1 (and when not kept or too old),
        else the one kept from its page 1."""
        kept = self._kept.get(query)
        version = self.version()
        if page == 1 or kept is None or time.monotonic() - kept.fetched > self.ttl \
                or kept.version != version:
            generation = self._generation
            items = await compute()
            # A change made while computing: answer it, but do not keep it.
            if generation == self._generation:
                self._kept.pop(query, None)
                if len(items) <= self.max_items:
                    held = sum(len(k.items) for k in self._kept.values())
                    while self._kept and (len(self._kept) >= self.max_kept
                                          or held + len(items) > self.max_items):
                        held -= len(self._kept.pop(next(iter(self._kept))).items)
                    self._kept[query] = _Kept(time.monotonic(), version, items)
            return items
        return kept.items

    def clear(self) -> None:
        """Something changed: every list is computed again at its next page."""
        self._generation += 1
        self._kept.clear()
