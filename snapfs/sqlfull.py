"""SQLite connections whose "database or disk is full" is the domain's StoreFull.

SQLite reports a full filesystem (ENOSPC, EDQUOT under its journal or WAL) as
``sqlite3.OperationalError`` with code SQLITE_FULL. Raised as it is, every
handler saw an unexpected error (EIO and a "bug" log line for a mkdir, a rename
or an rmdir on a full disk); as StoreFull it is ENOSPC (507 over HTTP) in the
one errno table, with the way out in its message.
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from typing import Any, Iterator

from .errors import StoreFull

FULL_MESSAGE = ("the filesystem holding the store is full: free space there (deleting "
                "snapshots needs a little room too)")


@contextmanager
def _full_is_store_full() -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            raise StoreFull(f"{FULL_MESSAGE} ({exc})") from None
        raise


class Connection(sqlite3.Connection):
    """``sqlite3.connect(..., factory=Connection)``: the statements a store runs
    through the connection (sqlite-utils' too) raise StoreFull when full."""

    def execute(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        with _full_is_store_full():
            return super().execute(*args, **kwargs)

    def executemany(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        with _full_is_store_full():
            return super().executemany(*args, **kwargs)

    def executescript(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        with _full_is_store_full():
            return super().executescript(*args, **kwargs)

    def commit(self) -> None:
        with _full_is_store_full():
            super().commit()
