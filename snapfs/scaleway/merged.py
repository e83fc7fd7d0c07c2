"""Lists merged from the Instance and Block Storage APIs.

Scaleway's Instance API may list block snapshots and volumes too; the Block API
owns them. A merged list takes each item once (Block's copy wins), records which
API owns each (the routing of later calls), and is fetched whole at page 1: later
pages of the same query (within MERGED_TTL) are cut from it, so the pages of one
listing are consistent and a listing costs one pass over each API.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable, MutableMapping

import trio

from ..model import Page
from ..taskgroups import first_error

#: How long later pages of a merged list are cut from the one fetched at page 1.
MERGED_TTL = 30.0
#: Merged lists kept at once (one per query being paged through).
MERGED_MAX = 64

PageFetch = Callable[[int], Awaitable[Page[Any]]]


class MergedLists:
    """The merged lists being paged through, and who owns what they hold."""

    def __init__(self, owner: MutableMapping[str, str]) -> None:
        self._owner = owner
        self._lists: dict[tuple[Any, ...], tuple[float, list[Any]]] = {}

    def clear(self) -> None:
        """A change was made through us: every kept list may be wrong now."""
        self._lists.clear()

    async def page(self, query: tuple[Any, ...], per_page: int, page: int,
                   instance_pages: list[PageFetch], block_page: PageFetch,
                   order: Callable[[Any], Any]) -> Page[Any]:
        """``instance_pages``: one or more Instance lists (merged, each item once)."""
        cached = self._lists.get(query)
        if page == 1 or cached is None or time.monotonic() - cached[0] > MERGED_TTL:
            results: dict[str, list[Any]] = {}
            try:
                async with trio.open_nursery() as nursery:
                    for i, instance_page in enumerate(instance_pages):
                        nursery.start_soon(_all_pages_into, results, f"instance{i}",
                                           instance_page)
                    nursery.start_soon(_all_pages_into, results, "block", block_page)
            except BaseExceptionGroup as group:
                raise first_error(group) from None
            seen = {x.id for x in results["block"]}
            for x in results["block"]:
                self._owner[x.id] = "block"
            instance_only = []
            for i in range(len(instance_pages)):
                for x in results[f"instance{i}"]:
                    if x.id not in seen:
                        seen.add(x.id)
                        instance_only.append(x)
                        self._owner.setdefault(x.id, "instance")
            merged = sorted(results["block"] + instance_only, key=order)
            if len(self._lists) >= MERGED_MAX:
                self._lists.pop(next(iter(self._lists)))
            cached = self._lists[query] = (time.monotonic(), merged)
        items = cached[1]
        return Page(items[(page - 1) * per_page: page * per_page], len(items))


async def _all_pages_into(out: dict[str, list[Any]], name: str, fetch: PageFetch) -> None:
    """Every page of one API's list: the first, then the rest at once (their count is
    known from the first's total; the limiter bounds the calls in flight)."""
    first = await fetch(1)
    pages: dict[int, list[Any]] = {1: first.items}
    if first.items and len(first.items) < first.total_count:
        count = -(-first.total_count // len(first.items))

        async def one(p: int) -> None:
            pages[p] = (await fetch(p)).items

        async with trio.open_nursery() as nursery:
            for p in range(2, count + 1):
                nursery.start_soon(one, p)
    out[name] = [x for p in sorted(pages) for x in pages[p]]
