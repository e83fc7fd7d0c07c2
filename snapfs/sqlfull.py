"""SQLite connections whose "database or disk is full" is the domain's StoreFull.

SQLite reports a full filesystem (ENOSPC, EDQUOT under its journal or WAL) as
``sqlite3.OperationalError`` with code SQLITE_FULL. Raised as it is, every
handler saw an unexpected error (EIO and a "bug" log line for a mkdir, a rename
or an rmdir on a full disk); as StoreFull it is ENOSPC (507 over HTTP) in the
one errno table, with the way out in its message.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from .errors import StoreFull

FULL_MESSAGE = ("the filesystem holding the store is full: free space there (deleting "
                "snapshots needs a little room too)")


def _translated(exc: sqlite3.OperationalError) -> BaseException:
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return StoreFull(f"{FULL_MESSAGE} ({exc})")
    return exc


class Connection(sqlite3.Connection):
    """``sqlite3.connect(..., factory=Connection)``: the statements a store runs
    through the connection (sqlite-utils' too) raise StoreFull when full."""

    def execute(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        try:
            return super().execute(*args, **kwargs)
        except sqlite3.OperationalError as exc:
            raise _translated(exc) from None

    def executemany(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        try:
            return super().executemany(*args, **kwargs)
        except sqlite3.OperationalError as exc:
            raise _translated(exc) from None

    def executescript(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        try:
            return super().executescript(*args, **kwargs)
        except sqlite3.OperationalError as exc:
            raise _translated(exc) from None

    def commit(self) -> None:
        try:
            super().commit()
        except sqlite3.OperationalError as exc:
            raise _translated(exc) from None
