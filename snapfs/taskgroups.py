"""Helpers for trio nurseries whose failures callers want as one error."""

from __future__ import annotations

import trio

from .errors import SnapfsError


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The error that made a nursery fail (its siblings only add Cancelled), so that
    callers see one SnapfsError or OSError rather than a group: a domain error
    first, else the first other non-Cancelled leaf, else the group itself."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)
    walk(group)
    for e in leaves:
        if isinstance(e, SnapfsError):
            return e
    for e in leaves:
        if not isinstance(e, trio.Cancelled):
            return e
    return group
