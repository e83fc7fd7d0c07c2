"""Extents as the service interface gives them (allocated_extents, changed_extents)
and as the tree shows them: pure code, shared by the backends and the filesystem."""

from __future__ import annotations

#: (start, length, data) of one extent; data False: it reads as zeros.
Extent = tuple[int, int, bool]


def render(extents: list[Extent]) -> bytes:
    """``qemu-img map --output=json`` of a raw image, line for line (offset =
    start: image.raw is the raw file)."""
    lines = [f'{{ "start": {s}, "length": {n}, "depth": 0, "present": true, '
             f'"zero": {"false" if d else "true"}, "data": {"true" if d else "false"}, '
             f'"offset": {s}}}' for s, n, d in extents]
    return ("[" + ",\n".join(lines) + "]\n").encode()
