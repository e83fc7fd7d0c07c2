"""Helpers for trio nurseries whose failures callers want as one error."""

from __future__ import annotations

import trio

from .errors import SnapfsError


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The error that made a nursery fail (its siblings only add Cancelled), so that
    callers see one SnapfsError or OSError rather than a group: a domain error
    first, else the first other leaf that is not a consequence of a sibling's
    failure (Cancelled; a channel broken or closed because the stage at its
    other end failed: a capture on a full disk once ended as "internal error:
    BrokenResourceError()"), else the first non-Cancelled leaf, else the group."""
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
        if not isinstance(e, (trio.Cancelled, trio.BrokenResourceError,
                              trio.ClosedResourceError)):
            return e
    for e in leaves:
        if not isinstance(e, trio.Cancelled):
            return e
    return group
