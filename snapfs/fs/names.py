"""Directory entry names for resources whose names need not be unique.

A resource is listed under its name; when several in one directory share a
name, each is listed as ``<name>~<first 8 hex digits of its id>``. Its ID always
resolves too (unlisted), and so does ``<name>~<8 hex>`` even once the name has
become unique again, so a path a user copied keeps working. The label of an
item depends only on the items with the same exact name, which lets a lookup ask
the service for just those (List ``name=``) instead of the whole directory.

A name the tree cannot show as it is (one that breaks the naming rule of
``snapfs.model``: made on the cloud, through another client, or before the
rule) is always listed as ``<escaped name>~<8 hex>``: control characters, ``/``,
``~`` and ``\\`` escaped, cut to fit 255 bytes. Valid names never hold ``~``,
so a label is never mistaken for a name, and never for an ID. Tags, which have
no ID, are labelled the same way with a hash of the tag instead.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections import Counter
from typing import Iterable, Protocol, TypeVar

from ..model import NAME_MAX_BYTES, name_problem, tag_problem


class Named(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=Named)

SEPARATOR = "~"
_SUFFIX = re.compile(r"^(?P<base>.*)~(?P<prefix>[0-9a-f]{8})$")


def short_id(ident: str) -> str:
    """The first 8 hex digits of an ID (a UUID's first group)."""
    return ident.replace("-", "")[:8].lower()


_ESCAPES = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff/~\\]")


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    if ch == "\\":
        return "\\\\"
    cp = ord(ch)
    return f"\\x{cp:02x}" if cp <= 0xff else f"\\u{cp:04x}"


def escape(name: str) -> str:
    """``name`` with every character a path component cannot show escaped."""
    return _ESCAPES.sub(_escape_char, name)


def _fit(text: str, room: int) -> str:
    """The longest prefix of ``text`` of at most ``room`` bytes of UTF-8."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= room:
        return text
    return data[:room].decode("utf-8", "ignore")


def label_base(name: str, suffix: str) -> str:
    """What a label with ``~suffix`` starts with: the name, escaped when the
    tree cannot show it, cut so that the label fits in 255 bytes."""
    shown = name if name_problem(name) is None else escape(name)
    return _fit(shown, NAME_MAX_BYTES - len(SEPARATOR) - len(suffix))


def _suffixed(item: Named, suffix: str) -> str:
    return f"{label_base(item.name, suffix)}{SEPARATOR}{suffix}"


def labels(items: Iterable[T]) -> dict[str, T]:
    """Entry name -> item for one directory, in the items' order."""
    items = list(items)
    counts = Counter(item.name for item in items)
    plain = {item.name for item in items
             if counts[item.name] == 1 and name_problem(item.name) is None}
    out: dict[str, T] = {}
    for item in items:
        if item.name in plain:
            out[item.name] = item
            continue
        label = _suffixed(item, short_id(item.id))
        if label in plain or label in out:
            # Another resource is literally named like this label (made before
            # the naming rule), or two IDs share 8 hex digits: the full ID keeps
            # every entry distinct.
            label = _suffixed(item, item.id)
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
            if short_id(item.id) == prefix and label_base(item.name, prefix) == base:
                return item
    # ``<name>~<full id>`` (the rare collision form above)
    if SEPARATOR in name:
        base, _, rest = name.rpartition(SEPARATOR)
        for item in items:
            if item.id == rest and label_base(item.name, rest) == base:
                return item
    return None


def candidates_name(name: str) -> str | None:
    """The resource name to ask the service for when looking up entry ``name``:
    the base of a ``<name>~<suffix>`` label, else the name itself. None when the
    base may be escaped or cut (the name then cannot be asked for: the caller
    lists the whole directory)."""
    base, prefix = split_label(name)
    if prefix is None and SEPARATOR in name:
        base, _, rest = name.rpartition(SEPARATOR)
        if as_uuid(rest) is None:
            return None  # not a label, and no valid name holds "~"
        prefix = rest
    if prefix is None:
        return name
    if name_problem(base) is not None or "\\" in base or \
            len(base.encode()) >= NAME_MAX_BYTES - len(SEPARATOR) - len(prefix):
        return None
    return base


def exact(items: Iterable[T], names: Iterable[str]) -> list[T]:
    """The items whose name is exactly one of ``names`` (List ``name=`` matches
    substrings, like the API)."""
    wanted = set(names)
    return [item for item in items if item.name in wanted]



def tag_labels(tags: Iterable[str]) -> dict[str, str]:
    """Entry name -> tag for ``tags/``: a tag that breaks the tag rule (made
    elsewhere or before it) is listed as ``<escaped tag>~<8 hex of its hash>``,
    so every stored tag has an entry of at most 255 bytes."""
    out: dict[str, str] = {}
    for tag in tags:
        if tag_problem(tag) is None:
            out[tag] = tag
            continue
        digest = hashlib.sha256(tag.encode("utf-8", "surrogatepass")).hexdigest()
        label = f"{label_base(tag, digest[:8])}{SEPARATOR}{digest[:8]}"
        if label in out:
            label = f"{label_base(tag, digest)}{SEPARATOR}{digest}"
        out[label] = tag
    return out
