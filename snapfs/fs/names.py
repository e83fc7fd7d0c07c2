"""Directory entry names for resources whose names need not be unique.

A resource is listed under its name; when several in one directory share a
name, each is listed as ``<name>~<first 8 hex digits of its id>``. Its ID always
resolves too (unlisted), and so does ``<name>~<8 hex>`` even once the name has
become unique again, so a path a user copied keeps working. The label of an
item depends only on the items with the same exact name, which lets a lookup ask
the service for just those (List ``name=``) instead of the whole directory.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from typing import Iterable, Protocol, TypeVar


class Named(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=Named)

SEPARATOR = "~"
_SUFFIX = re.compile(r"^(?P<base>.+)~(?P<prefix>[0-9a-f]{8})$")


def short_id(ident: str) -> str:
    """The first 8 hex digits of an ID (a UUID's first group)."""
    return ident.replace("-", "")[:8].lower()


def labels(items: Iterable[T]) -> dict[str, T]:
    """Entry name -> item for one directory, in the items' order."""
    items = list(items)
    counts = Counter(item.name for item in items)
    taken = {item.name for item in items if counts[item.name] == 1}
    out: dict[str, T] = {}
    for item in items:
        if counts[item.name] == 1:
            out[item.name] = item
            continue
        label = f"{item.name}{SEPARATOR}{short_id(item.id)}"
        if label in taken or label in out:
            # Another resource is literally named like this label, or two IDs
            # share 8 hex digits: the full ID keeps every entry distinct.
            label = f"{item.name}{SEPARATOR}{item.id}"
        out[label] = item
    return out


def label_of(item: T, same_name: Iterable[T]) -> str:
    """The entry name of ``item`` given every item in its directory with its name."""
    for label, other in labels(list(same_name) or [item]).items():
        if other.id == item.id:
            return label
    return item.name


def split_label(name: str) -> tuple[str, str | None]:
    """``"a~1234abcd"`` -> ``("a", "1234abcd")``; anything else -> ``(name, None)``."""
    m = _SUFFIX.match(name)
    if m is None:
        return name, None
    return m.group("base"), m.group("prefix")


def as_uuid(name: str) -> str | None:
    """The canonical form of ``name`` when it is a UUID (an ID lookup)."""
    try:
        return str(uuid.UUID(name)) if len(name) == 36 else None
    except ValueError:
        return None


def resolve(name: str, items: Iterable[T]) -> T | None:
    """The item that entry ``name`` designates among one directory's ``items``:
    a listed label, an ID, or ``<name>~<8 hex>`` of an item with that name."""
    items = list(items)
    by_label = labels(items)
    if name in by_label:
        return by_label[name]
    ident = as_uuid(name)
    if ident is not None:
        for item in items:
            if item.id == ident:
                return item
    base, prefix = split_label(name)
    if prefix is not None:
        for item in items:
            if item.name == base and short_id(item.id) == prefix:
                return item
    # ``<name>~<full id>`` (the rare collision form above)
    if SEPARATOR in name:
        base, _, rest = name.rpartition(SEPARATOR)
        for item in items:
            if item.name == base and item.id == rest:
                return item
    return None


def candidates_name(name: str) -> str:
    """The resource name to ask the service for when looking up entry ``name``:
    the base of a ``<name>~<suffix>`` label, else the name itself."""
    base, prefix = split_label(name)
    if prefix is not None:
        return base
    if SEPARATOR in name:
        base, _, rest = name.rpartition(SEPARATOR)
        if as_uuid(rest) is not None:
            return base
    return name


def exact(items: Iterable[T], names: Iterable[str]) -> list[T]:
    """The items whose name is exactly one of ``names`` (List ``name=`` matches
    substrings, like the API)."""
    wanted = set(names)
    return [item for item in items if item.name in wanted]

