"""A mapping that keeps at most ``limit`` entries, forgetting the least recently
used first: for bookkeeping that only saves work (a lookup forgotten is asked
again), so that it is bounded by a constant rather than by how many resources a
long-lived process has ever seen."""

from __future__ import annotations

from collections import OrderedDict
from typing import ItemsView, Iterator, MutableMapping, TypeVar, ValuesView

K = TypeVar("K")
V = TypeVar("V")


class LRUDict(MutableMapping[K, V]):
    """Reads (``[]``, ``get``) and writes make an entry the most recent; a write
    beyond ``limit`` entries drops the least recent one."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("an LRUDict keeps at least one entry")
        self.limit = limit
        self._items: OrderedDict[K, V] = OrderedDict()

    def __getitem__(self, key: K) -> V:
        value = self._items[key]
        self._items.move_to_end(key)
        return value

    def __setitem__(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def __delitem__(self, key: K) -> None:
        del self._items[key]

    def __iter__(self) -> Iterator[K]:
        # A copy: ``dict(d)`` reads each key it walks, which reorders the entries.
        return iter(list(self._items))

    def items(self) -> ItemsView[K, V]:
        return self._items.items()  # a walk is not a use

    def values(self) -> ValuesView[V]:
        return self._items.values()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items  # a membership test is not a use
