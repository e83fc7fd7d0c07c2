"""Connections to the store's SQLite database, and its transactions.

Several processes open one store (a mount and ``snapfs serve``), each with a
connection on the trio thread and some in worker threads: WAL lets readers go on
while one writes, ``BEGIN IMMEDIATE`` takes the write lock before the first read,
and the busy timeout makes a writer wait for another instead of failing.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import sqlite_utils

from .. import sqlfull
from ..errors import CorruptData, SnapfsError
from .schema import migrate
from .store import readonly_uri

#: Seconds a statement waits for another connection's write (of this process or
#: another one on the store) before failing: writes are short transactions, the
#: longest a release step of ~0.1 s, so this is only reached by a stuck process.
BUSY_TIMEOUT = 60.0


def connect(path: Path, readonly: bool) -> sqlite3.Connection:
    """The connection a Metadata works on. ``readonly``: one that changes no file
    (store.readonly_uri); the caller (store.open_store) checked that no migration
    is due. Otherwise WAL, synchronous FULL and the schema's migrations."""
    if readonly:
        conn = sqlite3.connect(readonly_uri(path), uri=True, isolation_level=None,
                               check_same_thread=False, timeout=BUSY_TIMEOUT)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                               timeout=BUSY_TIMEOUT, factory=sqlfull.Connection)
    conn.row_factory = sqlite3.Row
    try:
        if readonly:
            conn.execute("PRAGMA query_only = ON")
        else:
            _prepare_beside_others(conn)
    except sqlite3.DatabaseError as exc:
        conn.close()
        trouble = sqlfull.disk_trouble(exc, path)
        if trouble is not None:
            raise trouble from None
        raise CorruptData(f"{path} is not a usable snapfs store database: {exc}") from None
    except SnapfsError:
        conn.close()
        raise
    return conn


def worker_connection(path: Path) -> sqlite3.Connection:
    """A connection for a worker thread's long job, on a prepared database."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT,
                           factory=sqlfull.Connection)
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection, db: sqlite_utils.Database
                ) -> Iterator[sqlite_utils.Database]:
    """One atomic write (nested: a savepoint). ``BEGIN IMMEDIATE``: the write lock
    is taken (waiting up to BUSY_TIMEOUT) before the first read, so a transaction
    that reads and then writes never fails with "database is locked" because
    another process wrote between."""
    if conn.in_transaction:
        with db.atomic():
            yield db
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    try:
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


#: Attempts at preparing a database that other processes may be preparing too.
MIGRATE_ATTEMPTS = 10


def _prepare_beside_others(conn: sqlite3.Connection) -> None:
    """WAL mode and migrate(), again when either failed because another process
    opening the store at the same moment (a mount and `serve` started together on
    a new store) held the lock or applied the same migration first: the next
    attempt reads the mode and version it left. Switching a new database to WAL
    answers "database is locked" at once, without the busy handler, while another
    connection switches it (seen in CI with three openers)."""
    for attempt in range(MIGRATE_ATTEMPTS):
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            # FULL: a commit is durable on return, so a reference never outlives
            # a crash while the data it points at was fsynced before it.
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            migrate(conn)
            return
        except sqlite3.OperationalError:  # "table ... already exists", locked, busy
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if attempt == MIGRATE_ATTEMPTS - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
