"""SQLite connections whose "database or disk is full" is the domain's StoreFull.

SQLite reports a full filesystem (ENOSPC, EDQUOT under its journal or WAL) as
``sqlite3.OperationalError`` with code SQLITE_FULL. Raised as it is, every
handler saw an unexpected error (EIO and a "bug" log line for a mkdir, a rename
or an rmdir on a full disk); as StoreFull it is ENOSPC (507 over HTTP) in the
one errno table, with the way out in its message.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import InvalidArgument, SnapfsError, StoreFull, StoreUnusable

FULL_MESSAGE = ("the filesystem holding the store is full: free space there (deleting "
                "snapshots needs a little room too)")


#: Below this much room SQLite's I/O errors at open are taken for a full disk.
LOW_ROOM = 1 << 20


def disk_trouble(exc: sqlite3.Error, db: Path) -> SnapfsError | None:
    """What opening ``db`` failed of, when it was the disk and not the database:
    a full filesystem (SQLite could not grow its -shm or -wal: "disk I/O error",
    which was reported as a damaged database to restore from a backup -- a user
    who did so lost the snapshots since) or another I/O error. None: the
    database's own fault."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary code
    if code not in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
        return None
    try:
        st = os.statvfs(db.parent)
        room = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
    except OSError:
        room = LOW_ROOM
    if code == sqlite3.SQLITE_FULL or room < LOW_ROOM:
        return StoreFull(f"{FULL_MESSAGE}: {db} cannot be opened ({exc}; the database "
                         "itself is not known to be damaged)")
    return StoreUnusable(f"{db} cannot be read or written: {exc} (an I/O error, not a "
                         "damaged database: check the disk, e.g. dmesg, and retry)")


#: SQLite's answers that are the files' doing (made immutable or read-only, no
#: descriptor left to open one): they were counted as bugs, with a traceback per
#: request. (An I/O error: disk_trouble.)
_DISK_CODES = (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM)


@contextmanager
def _domain_errors(db: Path) -> Iterator[None]:
    """What SQLite raises for the disk or for text it cannot take, as domain errors."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary code
        if code == sqlite3.SQLITE_FULL:
            raise StoreFull(f"{FULL_MESSAGE} ({exc})") from None
        if code == sqlite3.SQLITE_IOERR:  # maybe a -wal or -shm that could not grow
            raise disk_trouble(exc, db) or exc from None
        if code in _DISK_CODES:  # the files, not a bug: said so (EIO)
            raise StoreUnusable(f"{db} cannot be written: {exc} (check the files' "
                                "attributes and permissions, and the limit on open "
                                "files)") from None
        raise
    except UnicodeEncodeError:
        # A parameter holding undecodable bytes (lone surrogates): no row holds
        # one (names are UTF-8 by rule), and SQLite cannot be asked about it.
        raise InvalidArgument("argument", "must be valid UTF-8 text") from None


class Connection(sqlite3.Connection):
    """``sqlite3.connect(..., factory=Connection)``: the statements a store runs
    through the connection (sqlite-utils' too) raise StoreFull when full, and
    InvalidArgument for text with undecodable bytes."""

    def __init__(self, database: str | os.PathLike[str], *args: Any, **kwargs: Any) -> None:
        super().__init__(database, *args, **kwargs)
        self.path = Path(os.fsdecode(database))

    def execute(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        with _domain_errors(self.path):
            return super().execute(*args, **kwargs)

    def executemany(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        with _domain_errors(self.path):
            return super().executemany(*args, **kwargs)

    def executescript(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        with _domain_errors(self.path):
            return super().executescript(*args, **kwargs)

    def commit(self) -> None:
        with _domain_errors(self.path):
            super().commit()
