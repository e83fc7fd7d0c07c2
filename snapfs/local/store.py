"""The store's identity, and the trust snapfs puts in its directory.

A store is recognisable: ``<store>/snapfs-store`` (the marker) holds the store
format and a store UUID, and ``metadata.db``'s ``meta`` table holds the same UUID
(``store_id``). A store is made only in a missing or empty directory; a directory
with other content that is not a store is refused, and so is a store whose
metadata.db is missing, empty, truncated, unreadable or another store's: every
command refuses with one line naming the problem and the way out, having changed
nothing (recovery would otherwise act on what the metadata does not record).
A store made before the marker existed (metadata.db with a schema version, no
marker) is migrated by the first writing open: the UUID goes into metadata.db
first, then the marker, so a crash in between leaves a store that still opens.

The store trusts no one else, as ssh does for ``~/.ssh``: its directory must
belong to the effective user and not be writable by group or others; the files
snapfs opens in it are opened without following symlinks (metadata.db is
lstat-checked before SQLite opens it), and metadata.db and the logs are 0600.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import stat
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import quote

from ..errors import StoreUnusable
from ..sqlfull import disk_trouble
from .schema import SCHEMA_VERSION, migrate

log = logging.getLogger(__name__)

MARKER = "snapfs-store"
#: The layout of the store directory (marker, metadata.db, packs/, shadows/,
#: volumes/); a store of a newer format is refused.
FORMAT = 1
DB = "metadata.db"
#: Where `snapfs fsck --repair` moves files the metadata does not account for.
LOST_FOUND = "lost+found"
#: metadata.db up to this size is checked with SQLite's quick_check at every open
#: (milliseconds); a bigger one only by its header and its meta table.
QUICK_CHECK_BYTES = 16 << 20
_MAGIC = b"SQLite format 3\0"
_RESTORE = "restore it from a backup (snapfs changed nothing)"


@dataclass(frozen=True)
class StoreFacts:
    """What opening a store found: its UUID (None: a store not migrated yet that
    a read-only open leaves so) and its metadata.db's schema version."""
    path: Path
    store_id: str | None
    schema_version: int


def trusted_dir(path: Path, create: bool) -> None:
    """Check that ``path`` is a directory of ours that no one else may write,
    and no one else may replace (trusted_parents), making it (mode 0700) when
    missing and ``create``."""
    trusted_parents(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not create:
            raise StoreUnusable(f"{path}: no snapfs store there (a command that writes, "
                                "such as 'snapfs volume add' or 'snapfs mount', makes one)"
                                ) from None
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
        st = os.stat(path)
    except NotADirectoryError:
        raise StoreUnusable(f"store {path}: a part of the path is not a directory") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StoreUnusable(f"store {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise StoreUnusable(f"store {path} belongs to uid {st.st_uid}, not to this user "
                            f"(uid {os.geteuid()}): snapfs only uses a store of its own "
                            "user (chown it, or give another --store)")
    if st.st_mode & 0o022:
        raise StoreUnusable(f"store {path} is writable by group or others (mode "
                            f"{stat.S_IMODE(st.st_mode):04o}): run 'chmod go-w {path}'")


def trusted_parents(path: Path) -> None:
    """Check that every existing directory above ``path``, along the path as given
    and as resolved, is root's or ours and writable by no one else (sticky, as
    /tmp, is fine: others cannot rename our entries there), and that no symlink on
    the path as given (``path`` itself included) is someone else's. Whoever may
    write one could swap the store for a directory of their choosing between the
    checks and the opens, which go by path: OpenSSH's StrictModes rule for ~/.ssh."""
    me = os.geteuid()
    given = Path(os.path.abspath(path))
    for link in [given, *given.parents]:
        # A link's owner may point it elsewhere at any time -- even in a sticky
        # directory, where the link is theirs.
        try:
            st = os.lstat(link)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (0, me):
            raise StoreUnusable(f"store {path}: {link} is a symbolic link of uid {st.st_uid}, "
                                "who could point it at another directory: give the store's "
                                "real path")
    seen: set[Path] = set()
    for d in [*given.parents, *Path(os.path.realpath(given)).parents]:
        if d in seen:
            continue
        seen.add(d)
        try:
            st = os.stat(d)
        except (FileNotFoundError, NotADirectoryError):
            continue  # made by a writing open, under one checked here
        if st.st_uid not in (0, me):
            raise StoreUnusable(f"store {path}: {d} above it belongs to uid {st.st_uid}, who "
                                "could swap the store for another directory: keep the store "
                                "where every directory above it is root's or this user's")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise StoreUnusable(f"store {path}: {d} above it is writable by group or others "
                                f"(mode {stat.S_IMODE(st.st_mode):04o}), who could swap the "
                                f"store for another directory: run 'chmod go-w {d}' or keep "
                                "the store elsewhere")


def open_store(path: Path, writing: bool) -> StoreFacts:
    """Check and recognise the store at ``path`` before anything opens a file in it;
    a writing open makes a new store in a missing or empty directory and migrates
    a store from before the marker. Raises StoreUnusable, the one line to show."""
    try:
        os.path.abspath(path).encode("utf-8")
    except UnicodeEncodeError:  # its volume files' paths are SQLite text
        raise StoreUnusable(f"the store's path {str(path)!r} is not valid UTF-8: use a "
                            "UTF-8 name for it") from None
    try:
        return _open_store(path, writing)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise StoreUnusable(f"cannot open the store {path}: "
                            f"{exc.strerror or exc}{where}") from None


#: The store's own directories: real directories of ours, never symlinks (a planted
#: ``packs`` link would have every chunk written where its owner reads them).
SUBDIRS = ("packs", "shadows", "volumes", LOST_FOUND)


def _trusted_subdirs(path: Path) -> None:
    for name in SUBDIRS:
        sub = path / name
        try:
            st = os.lstat(sub)
        except FileNotFoundError:
            continue
        # (Their modes matter less: no one else may enter the store directory. A
        # fresh ext4 root's lost+found is root's, and a fine part of a store.)
        foreign = st.st_uid != os.geteuid() and name != LOST_FOUND
        if not stat.S_ISDIR(st.st_mode) or foreign:
            raise StoreUnusable(f"{sub} is not a directory of this user (a symlink is "
                                "refused): check who put it there")


def _open_store(path: Path, writing: bool) -> StoreFacts:
    trusted_dir(path, create=writing)
    if writing and os.statvfs(path).f_flag & os.ST_RDONLY:
        raise StoreUnusable(f"store {path} is on a read-only filesystem: remount it "
                            "read-write ('snapfs volume list', 'project list' and 'fsck' "
                            "work read-only)")
    marker = read_marker(path)
    db = path / DB
    if marker is None and not os.path.lexists(db):
        # lost+found: the root of a fresh ext4 filesystem is a fine empty store.
        entries = sorted(set(os.listdir(path)) - {LOST_FOUND})
        if "packs" in entries:
            raise StoreUnusable(f"{db} is missing: {_RESTORE}")
        if entries:
            raise StoreUnusable(f"{path} is not a snapfs store and not empty (it holds "
                                f"{entries[0]!r}...): give a new or empty directory")
        if not writing:
            raise StoreUnusable(f"{path}: no snapfs store there (a command that writes, "
                                "such as 'snapfs volume add' or 'snapfs mount', makes one)")
        return _create(path)
    _trusted_subdirs(path)
    if marker is not None and marker[0] > FORMAT:
        raise StoreUnusable(f"store {path} has format {marker[0]}, newer than this snapfs "
                            f"knows ({FORMAT}): upgrade snapfs")
    version, store_id = _db_facts(db)
    if marker is not None and store_id != marker[1]:
        raise StoreUnusable(f"{db} belongs to another store ({store_id or 'no store id'}), "
                            f"not to this one ({marker[1]}): restore this store's "
                            "metadata.db from a backup (snapfs changed nothing)")
    if version > SCHEMA_VERSION:
        raise StoreUnusable(f"store {path} has schema version {version}, newer than this "
                            f"snapfs knows ({SCHEMA_VERSION}): upgrade snapfs")
    if not writing:
        if version < SCHEMA_VERSION:
            raise StoreUnusable(f"store {path} needs a migration (schema {version} to "
                                f"{SCHEMA_VERSION}), which a read-only command does not do: "
                                "run a writing command first (snapfs mount, or snapfs fsck "
                                "--repair)")
        return StoreFacts(path, store_id, version)
    for name in (DB, f"{DB}-wal", f"{DB}-shm"):  # stores of earlier versions: 0644
        _private(path / name)
    if marker is None:  # a store from before the marker, or made up to the marker
        store_id = store_id or str(uuid.uuid4())
        conn = _connect(db)
        try:
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', ?)",
                         (store_id,))
        finally:
            conn.close()
        _write_marker(path, store_id)
        log.info("store %s: marked as store %s", path, store_id)
    return StoreFacts(path, store_id, version)


def _create(path: Path) -> StoreFacts:
    """A new store in the empty directory ``path``: metadata.db (0600, schema and
    UUID), then the marker."""
    store_id = str(uuid.uuid4())
    db = path / DB
    os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600))
    conn = _connect(db)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        migrate(conn)
        conn.execute("INSERT INTO meta (key, value) VALUES ('store_id', ?)", (store_id,))
    finally:
        conn.close()
    _write_marker(path, store_id)
    log.info("store %s: created (store %s)", path, store_id)
    return StoreFacts(path, store_id, SCHEMA_VERSION)


def _connect(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(db, isolation_level=None)


def read_marker(path: Path) -> tuple[int, str] | None:
    """(format, store UUID) from the store's marker, or None when there is none."""
    try:
        fd = os.open(path / MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreUnusable(f"{path / MARKER} cannot be opened ({exc.strerror}; a symlink "
                            "is refused): restore it") from None
    try:
        _own_regular_file(fd, path / MARKER)
        text = os.read(fd, 4096).decode("utf-8", "replace")
    finally:
        os.close(fd)
    fields = dict(line.split(" ", 1) for line in text.splitlines()[1:] if " " in line)
    try:
        if not text.startswith("snapfs store\n"):
            raise ValueError
        return int(fields["format"]), str(uuid.UUID(fields["id"].strip()))
    except (KeyError, ValueError):
        raise StoreUnusable(f"{path / MARKER} is damaged: restore it from a backup (it "
                            "reads 'snapfs store', 'format N', 'id UUID' on three lines)"
                            ) from None


def _write_marker(path: Path, store_id: str) -> None:
    tmp = path / f".{MARKER}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.write(fd, f"snapfs store\nformat {FORMAT}\nid {store_id}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path / MARKER)
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _own_regular_file(fd: int, path: Path) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise StoreUnusable(f"{path} is not a regular file: restore it")
    if st.st_uid != os.geteuid():
        raise StoreUnusable(f"{path} belongs to uid {st.st_uid}, not to this user: "
                            "snapfs does not trust it (check who put it there)")
    return st


def _private(path: Path) -> None:
    """Make an existing file of ours 0600 (logs, metadata.db of earlier versions)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        st = _own_regular_file(fd, path)
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o600)
    finally:
        os.close(fd)


def _db_facts(db: Path) -> tuple[int, str | None]:
    """(schema version, store id) of metadata.db, read without changing it; refuses
    one that is missing, not ours, empty, truncated or not a snapfs database."""
    try:
        st = os.lstat(db)
    except FileNotFoundError:
        raise StoreUnusable(f"{db} is missing: {_RESTORE}") from None
    if not stat.S_ISREG(st.st_mode):
        raise StoreUnusable(f"{db} is not a regular file (a symlink is refused): {_RESTORE}")
    if st.st_uid != os.geteuid():
        raise StoreUnusable(f"{db} belongs to uid {st.st_uid}, not to this user: snapfs "
                            "does not trust it (check who put it there)")
    if st.st_size == 0:
        raise StoreUnusable(f"{db} is empty: {_RESTORE}")
    fd = os.open(db, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        header = os.pread(fd, 100, 0)
    finally:
        os.close(fd)
    if len(header) < 100 or not header.startswith(_MAGIC):
        raise StoreUnusable(f"{db} is not a usable snapfs store database (not SQLite): "
                            f"{_RESTORE}")
    page_size = struct.unpack(">H", header[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    pages, counter, valid_for = (struct.unpack(">I", header[i:i + 4])[0] for i in (28, 24, 92))
    if pages and counter == valid_for and st.st_size < pages * page_size:
        raise StoreUnusable(f"{db} is truncated ({st.st_size} of {pages * page_size} "
                            f"bytes): {_RESTORE}")
    try:
        conn = sqlite3.connect(readonly_uri(db), uri=True, isolation_level=None)
        try:
            rows = dict(conn.execute("SELECT key, value FROM meta WHERE key IN "
                                     "('schema_version', 'store_id')").fetchall())
            if st.st_size <= QUICK_CHECK_BYTES:
                _quick_check(conn)
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        trouble = disk_trouble(exc, db)
        if trouble is not None:
            raise trouble from None
        raise StoreUnusable(f"{db} is not a usable snapfs store database ({exc}): "
                            f"{_RESTORE}") from None
    try:
        version = int(rows["schema_version"])
    except (KeyError, ValueError):
        raise StoreUnusable(f"{db} is not a usable snapfs store database (no schema "
                            f"version): {_RESTORE}") from None
    return version, rows.get("store_id")


def _quick_check(conn: sqlite3.Connection) -> None:
    row = conn.execute("PRAGMA quick_check(1)").fetchone()
    if row is None or row[0] != "ok":
        # One line: SQLite's report spans several ("*** in database main ***\nPage 6...").
        found = " / ".join(str(row[0]).split("\n")) if row else "no answer"
        raise sqlite3.DatabaseError(f"damaged: {found}")


def readonly_uri(db: Path) -> str:
    """An SQLite URI that reads ``db`` without creating or changing any file: with
    its write-ahead log when one exists (another process has it open, or died with
    it open), else as immutable (the read-only connection would otherwise leave a
    -wal and -shm behind)."""
    mode = "mode=ro" if os.path.exists(f"{db}-wal") else "immutable=1"
    return f"file:{quote(os.fsencode(db))}?{mode}"  # bytes: a path need not be UTF-8


def open_private(path: Path, flags: int, what: str) -> int:
    """A descriptor of ``path`` opened without following a symlink, checked to be
    a regular file of ours and made 0600 if it was not."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreUnusable(f"cannot open {what}{path}: {_why(exc)}") from None
    try:
        st = _own_regular_file(fd, path)
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _why(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "it is a symlink, which is refused (check who put it there)"
    return str(exc.strerror)


def open_log(path: Path) -> IO[str]:
    """Open (appending, creating 0600) a log in the store without following a
    symlink, refusing one that is not a regular file of ours."""
    fd = open_private(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "the log ")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a", buffering=1)


def open_lock(path: Path) -> int:
    """The store's lock file's descriptor, opened without following a symlink."""
    try:
        fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError as exc:
        raise StoreUnusable(f"cannot open the lock {path / 'lock'}: {_why(exc)}") from None
    try:
        _own_regular_file(fd, path / "lock")
    except BaseException:
        os.close(fd)
        raise
    return fd


def private_database(path: Path) -> None:
    """Make sure an SQLite file of the store other than metadata.db (the mount's
    ``inodes.sqlite``) is a regular file of ours, 0600, before SQLite opens it:
    SQLite follows symlinks, and would create the file, its -wal and its -shm
    wherever a planted one points. A file of ours that cannot be written
    (immutable, a read-only filesystem) is left to SQLite to read: the mount
    then numbers new nodes for its own life (InodeTable)."""
    try:
        os.close(open_private(path, os.O_RDWR | os.O_CREAT, ""))
    except StoreUnusable:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreUnusable(f"cannot open {path}: {_why(exc)}") from None
        try:
            _own_regular_file(fd, path)
        finally:
            os.close(fd)
    for side in (Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            st = os.lstat(side)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise StoreUnusable(f"{side} is not a regular file of this user (a symlink "
                                "is refused): remove it (check who put it there)")


def managed_volume_file(store: Path, path: str) -> Path | None:
    """The file a store-managed volume lives in, if ``path`` really is one inside
    ``<store>/volumes/`` (defence in depth: metadata is not trusted to name any
    other file to delete)."""
    p = Path(path)
    if os.path.realpath(p.parent) != os.path.realpath(store / "volumes") \
            or not p.name.endswith(".raw") or p.name.startswith("."):
        return None
    try:
        if not stat.S_ISREG(os.lstat(p).st_mode):
            return None
    except FileNotFoundError:
        return None
    return p
