"""Short, synchronous metadata operations on the store's SQLite database.

Each method is one small query or one short transaction, cheap enough to run on
the trio thread; bulk data never passes through here.
"""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Iterable

import sqlite_utils

from ..errors import AlreadyExists, InvalidArgument, NotFound
from ..model import (BaseVolume, FileAccess, Page, Project, Snapshot, Task, export_href,
                     new_id, now)
from .connection import connect, transaction, worker_connection
from .owner import this_process
from .volumerows import VolumeRows

_SNAPSHOT_COLS = ("rowid, id, name, zone, project, organization, tags, volume_type, size, state, "
                  "base_volume_id, base_volume_name, creation_date, modification_date, "
                  "error_reason, progress, warning, image_uid, image_gid, image_mode")


def _snapshot(row: sqlite3.Row) -> Snapshot:
    bv = (BaseVolume(row["base_volume_id"], row["base_volume_name"])
          if row["base_volume_id"] else None)
    return Snapshot(
        id=row["id"], name=row["name"], organization=row["organization"],
        project=row["project"], tags=json.loads(row["tags"]), volume_type=row["volume_type"],
        size=row["size"], state=row["state"], base_volume=bv,
        creation_date=row["creation_date"], modification_date=row["modification_date"],
        error_reason=row["error_reason"], zone=row["zone"], progress=row["progress"],
        warning=row["warning"],
        access=(FileAccess(row["image_uid"], row["image_gid"], row["image_mode"])
                if row["image_mode"] is not None else None))


def _snapshot_filter(zone: str, organization: str | None, project: str | None,
                     name: str | None, tags: list[str] | None, base_volume_id: str | None
                     ) -> tuple[str, list[Any]]:
    """The WHERE clause (and its arguments) of a snapshot list's filters."""
    where = ["zone = ?", "deleting = 0"]
    args: list[Any] = [zone]
    for col, val in (("organization", organization), ("project", project),
                     ("base_volume_id", base_volume_id)):
        if val is not None:
            where.append(f"{col} = ?")
            args.append(val)
    if name:
        where.append("instr(name, ?) > 0")
        args.append(name)
    for tag in tags or ():
        where.append("EXISTS (SELECT 1 FROM json_each(snapshots.tags) WHERE value = ?)")
        args.append(tag)
    return " AND ".join(where), args


def _task(row: sqlite3.Row) -> Task:
    return Task(
        id=row["id"], description=row["description"], progress=row["progress"],
        status=row["status"], zone=row["zone"], started_at=row["started_at"],
        terminated_at=row["terminated_at"],
        href_from=export_href(row["snapshot_id"]), href_result="",
        error=row["error"], bucket=row["bucket"], key=row["key"], bytes=row["bytes"])


class Metadata(VolumeRows):
    """The store's database: projects, volumes, snapshots, chunk map, tasks."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        """``readonly``: a connection that changes no file (store.readonly_uri); the
        caller (store.open_store) checked that no migration is due."""
        self.path = path
        conn = connect(path, readonly)
        self.conn = conn
        self.db = sqlite_utils.Database(conn)
        self.organization = self._ensure_defaults() if not readonly else self._org()
        #: Changes this connection made to what lists show (see _count_changes).
        self.changes = 0
        if not readonly:
            self._count_changes()

    def _count_changes(self) -> None:
        """Count every change this process makes to the snapshots and volumes lists
        show, whichever code path makes it (TEMP triggers fire for this connection
        only; progress alone is not shown): `snapfs serve` drops the lists it keeps
        between pages when the count moves (LocalService.store_version)."""
        def bump() -> None:
            self.changes += 1
        self.conn.create_function("snapfs_listed_change", 0, bump)
        shown = " OR ".join(f"OLD.{c} IS NOT NEW.{c}" for c in (
            "state", "name", "tags", "deleting", "size", "modification_date"))
        for name, event in (("snapshots_in", "INSERT ON main.snapshots"),
                            ("snapshots_out", "DELETE ON main.snapshots"),
                            ("snapshots_up", f"UPDATE ON main.snapshots WHEN {shown}"),
                            ("volumes_in", "INSERT ON main.volumes"),
                            ("volumes_out", "DELETE ON main.volumes"),
                            ("volumes_up", "UPDATE ON main.volumes")):
            self.conn.execute(f"CREATE TEMP TRIGGER IF NOT EXISTS listed_{name} AFTER {event} "
                              "BEGIN SELECT snapfs_listed_change(); END")

    def close(self) -> None:
        self.conn.close()

    def worker_connection(self) -> sqlite3.Connection:
        """A connection of its own for long jobs in a worker thread (releasing a
        million-chunk map): WAL lets the trio thread's connection keep reading, and
        the job's short transactions let its writes in between."""
        return worker_connection(self.path)

    def transaction(self) -> AbstractContextManager[sqlite_utils.Database]:
        """``with md.transaction():`` -- one atomic write (connection.transaction)."""
        return transaction(self.conn, self.db)

    def _org(self) -> str:
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'organization'").fetchone()
        return str(row[0]) if row else ""

    def _ensure_defaults(self) -> str:
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'organization'").fetchone()
        if row:
            return str(row[0])
        with self.transaction():
            # Again under the write lock: another process may be making it too.
            row = self.conn.execute("SELECT value FROM meta WHERE key = 'organization'"
                                    ).fetchone()
            if row:
                return str(row[0])
            org = new_id()
            self.db.table("meta").insert({"key": "organization", "value": org})
            t = now()
            self.db.table("projects").insert({"id": org, "name": "default", "organization": org,
                                        "description": "", "created_at": t, "updated_at": t})
        return org

    # --- projects --------------------------------------------------------------------

    def projects(self) -> list[Project]:
        return [Project(r["id"], r["name"], r["organization"], r["created_at"],
                        r["updated_at"], r["description"])
                for r in self.conn.execute("SELECT * FROM projects ORDER BY rowid")]

    def add_project(self, name: str) -> Project:
        if self.conn.execute("SELECT 1 FROM projects WHERE name = ?", (name,)).fetchone():
            raise InvalidArgument("name", f"a project named {name!r} already exists")
        t = now()
        p = Project(new_id(), name, self.organization, t, t, "")
        self.db.table("projects").insert({"id": p.id, "name": p.name,
                                          "organization": p.organization, "description": "",
                                          "created_at": t, "updated_at": t})
        return p

    def project(self, ref: str) -> Project:
        """A project by ID or by name."""
        for p in self.projects():
            if ref in (p.id, p.name):
                return p
        raise NotFound("project", ref)

    # --- snapshots -------------------------------------------------------------------

    def insert_snapshot(self, s: Snapshot, source: dict[str, Any] | None,
                        durable: bool = True, unique_name: bool = False) -> int:
        """The new snapshot's map key. ``durable=False``: its commit is not synced
        (WAL, synchronous NORMAL) -- for a row whose next commit comes before
        Create returns (that one syncs both), or else after ``sync()``.
        ``unique_name``: AlreadyExists if the project has a live snapshot of that
        name in the zone, checked under the write lock the insert holds."""
        if not durable:
            self.conn.execute("PRAGMA synchronous = NORMAL")
        try:
            return self._insert_snapshot(s, source, unique_name)
        finally:
            if not durable:
                self.conn.execute("PRAGMA synchronous = FULL")

    def sync(self) -> None:
        """Make every commit so far durable, as a synchronous FULL commit would:
        fsync the write-ahead log that holds them (or the checkpoint did)."""
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _insert_snapshot(self, s: Snapshot, source: dict[str, Any] | None,
                         unique_name: bool) -> int:
        # The rowid is the map key, and work in flight (a capture in another
        # process, a lease's base map) holds keys: a key is never given twice,
        # though SQLite would hand out a deleted highest rowid again. The highest
        # one given is kept in meta (and map rows left by a snapshot an older
        # snapfs deleted under a capture count too).
        with self.transaction():
            if s.base_volume is not None and s.state == "snapshotting" and not \
                    self.conn.execute("SELECT 1 FROM volumes WHERE id = ?",
                                      (s.base_volume.id,)).fetchone():
                raise NotFound("volume", s.base_volume.id)  # removed since it was looked up
            if unique_name:
                other = self.conn.execute(
                    "SELECT id FROM snapshots WHERE zone = ? AND project = ? AND name = ? "
                    "AND deleting = 0 LIMIT 1", (s.zone, s.project, s.name)).fetchone()
                if other is not None:
                    raise AlreadyExists(f"snapshot {s.name!r} already exists in project "
                                        f"{s.project} (snapshot {other[0]})")
            row = self.conn.execute(
                "SELECT max(coalesce((SELECT CAST(value AS INTEGER) FROM meta "
                "WHERE key = 'last_snapshot_key'), 0), "
                "coalesce((SELECT max(rowid) FROM snapshots), 0), "
                "coalesce((SELECT max(snap) FROM snapshot_chunks), 0)) + 1").fetchone()
            key = int(row[0])
            self.conn.execute(
                "INSERT INTO snapshots (rowid, id, name, zone, project, organization, tags, "
                "volume_type, size, state, base_volume_id, base_volume_name, creation_date, "
                "modification_date, error_reason, progress, source, owner, image_uid, "
                "image_gid, image_mode) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (key, s.id, s.name, s.zone, s.project, s.organization, json.dumps(s.tags),
                 s.volume_type, s.size, s.state, s.base_volume.id if s.base_volume else None,
                 s.base_volume.name if s.base_volume else None, s.creation_date,
                 s.modification_date, s.error_reason, s.progress,
                 json.dumps(source) if source else None,
                 this_process() if s.state in ("snapshotting", "importing") else None,
                 *((s.access.uid, s.access.gid, s.access.mode) if s.access
                   else (None,) * 3)))
            self.conn.execute("INSERT OR REPLACE INTO meta (key, value) "
                              "VALUES ('last_snapshot_key', ?)", (str(key),))
        return key

    def _snapshot_row(self, snapshot_id: str) -> sqlite3.Row:
        row = self.conn.execute(f"SELECT {_SNAPSHOT_COLS} FROM snapshots "
                                "WHERE id = ? AND deleting = 0", (snapshot_id,)).fetchone()
        if row is None:
            raise NotFound("snapshot", snapshot_id)
        return row

    def snapshot(self, zone: str | None, snapshot_id: str) -> Snapshot:
        row = self._snapshot_row(snapshot_id)
        if zone is not None and row["zone"] != zone:
            raise NotFound("snapshot", snapshot_id)
        return _snapshot(row)

    def snap_key(self, snapshot_id: str) -> int:
        return int(self._snapshot_row(snapshot_id)["rowid"])

    def map_usable(self, key: int, volume_id: str, size: int) -> bool:
        """Whether snapshot ``key`` is a finished capture of that volume at that size,
        its map complete: a map a new snapshot of the volume may build on."""
        return self.conn.execute(
            "SELECT 1 FROM snapshots WHERE rowid = ? AND deleting = 0 AND state IN "
            "('available', 'exporting') AND shadow IS NULL AND base_volume_id = ? "
            "AND size = ?", (key, volume_id, size)).fetchone() is not None

    def usable_maps(self) -> dict[int, str]:
        """Volume id by map key of every finished capture of a volume (its map
        complete or still being stored from its shadow)."""
        return {int(k): v for k, v in self.conn.execute(
            "SELECT rowid, base_volume_id FROM snapshots WHERE deleting = 0 AND state IN "
            "('available', 'exporting') AND base_volume_id IS NOT NULL")}

    def shadow_backed(self, snapshot_id: str, shadow: str) -> None:
        """The capture's clone is durable: the snapshot is available from now on,
        read from ``shadow`` until its chunks are stored (by this process)."""
        self.conn.execute("UPDATE snapshots SET state = 'available', shadow = ?, "
                          "modification_date = ? WHERE id = ? AND deleting = 0",
                          (shadow, now(), snapshot_id))

    def stored(self, snapshot_id: str) -> None:
        """The snapshot's chunk map is complete: its shadow is no longer its data."""
        self.conn.execute("UPDATE snapshots SET shadow = NULL, owner = NULL, progress = 100 "
                          "WHERE id = ? AND deleting = 0", (snapshot_id,))

    def needing_shadows(self) -> set[int]:
        """Map keys of the snapshots whose shadow must stay: still being captured
        (a clone may be in the making) or still read from it."""
        return {int(r[0]) for r in self.conn.execute(
            "SELECT rowid FROM snapshots WHERE state = 'snapshotting' OR "
            "(shadow IS NOT NULL AND deleting = 0)")}

    def snapshot_keys(self) -> set[tuple[int, str]]:
        """(map key, id) of every snapshot row, deleted or not: what the metadata
        accounts for (shadows.tidy drops no file of another)."""
        return {(int(r[0]), str(r[1])) for r in self.conn.execute(
            "SELECT rowid, id FROM snapshots")}

    def shadow_of(self, snapshot_id: str) -> str | None:
        row = self.conn.execute("SELECT shadow FROM snapshots WHERE id = ?",
                                (snapshot_id,)).fetchone()
        return row[0] if row else None

    def shadow_backed_snapshots(self) -> list[tuple[str, int, str, str | None, str, int]]:
        """(id, map key, shadow, owner, volume id, size) of the snapshots still read
        from their shadow."""
        return [(r[0], int(r[1]), r[2], r[3], r[4], int(r[5])) for r in self.conn.execute(
            "SELECT id, rowid, shadow, owner, base_volume_id, size FROM snapshots "
            "WHERE shadow IS NOT NULL AND deleting = 0")]

    def list_snapshots(self, zone: str, organization: str | None, project: str | None,
                       name: str | None, tags: list[str] | None, base_volume_id: str | None,
                       per_page: int, page: int) -> Page[Snapshot]:
        clause, args = _snapshot_filter(zone, organization, project, name, tags,
                                        base_volume_id)
        total = self.conn.execute(f"SELECT count(*) FROM snapshots WHERE {clause}",
                                  args).fetchone()[0]
        rows = self.conn.execute(
            f"SELECT {_SNAPSHOT_COLS} FROM snapshots WHERE {clause} ORDER BY rowid "
            "LIMIT ? OFFSET ?", args + [per_page, (page - 1) * per_page])
        return Page([_snapshot(r) for r in rows], total)

    def all_snapshots(self, zone: str, organization: str | None, project: str | None,
                      name: str | None, tags: list[str] | None, base_volume_id: str | None,
                      volume_types: tuple[str, ...] | None = None) -> list[Snapshot]:
        """Every snapshot list_snapshots pages through, in its order, in one scan
        (paging with OFFSET rescans the table per page: quadratic in a listing).
        ``volume_types``: only snapshots of these types."""
        clause, args = _snapshot_filter(zone, organization, project, name, tags,
                                        base_volume_id)
        if volume_types is not None:
            clause += f" AND volume_type IN ({','.join('?' * len(volume_types))})"
            args += list(volume_types)
        rows = self.conn.execute(
            f"SELECT {_SNAPSHOT_COLS} FROM snapshots WHERE {clause} ORDER BY rowid", args)
        return [_snapshot(r) for r in rows]

    def mark_deleting(self, snapshot_id: str, reason: str) -> bool:
        """Hide the snapshot for good (see schema v4): it reads as gone from now on,
        and as an error to anything that still holds its map key. False (nothing
        changed) when it is already deleting or gone, or exporting: one statement,
        so an export starting in another process (start_export) cannot slip in."""
        with self.transaction():
            return self.conn.execute(
                "UPDATE snapshots SET deleting = 1, state = 'error', error_reason = ?, "
                "owner = ?, modification_date = ? WHERE id = ? AND deleting = 0 "
                "AND state != 'exporting'",
                (reason, this_process(), now(), snapshot_id)).rowcount == 1

    def start_export(self, snapshot_id: str) -> bool:
        """available -> exporting, in one statement (see mark_deleting); False when
        it is not available (any more) or being deleted."""
        return self.conn.execute(
            "UPDATE snapshots SET state = 'exporting', modification_date = ? "
            "WHERE id = ? AND deleting = 0 AND state = 'available'",
            (now(), snapshot_id)).rowcount == 1

    def live_state(self, snapshot_id: str) -> str | None:
        """The snapshot's state; None once a delete (of any process) has begun."""
        row = self.conn.execute("SELECT state FROM snapshots WHERE id = ? AND deleting = 0",
                                (snapshot_id,)).fetchone()
        return None if row is None else str(row[0])

    def take_over(self, snapshot_id: str, owner: str | None) -> bool:
        """This process takes over the background work (a delete, storing) of the
        snapshot from ``owner`` (a dead process, or None) -- unless another one
        just did: two processes storing one snapshot would release each other's
        chunks."""
        with self.transaction():
            return self.conn.execute(
                "UPDATE snapshots SET owner = ? WHERE id = ? AND owner IS ?",
                (this_process(), snapshot_id, owner)).rowcount == 1

    def deleting(self) -> list[tuple[str, int, str | None]]:
        """(id, map key, owner) of the snapshots whose delete is under way or cut short."""
        return [(r[0], int(r[1]), r[2]) for r in self.conn.execute(
            "SELECT id, rowid, owner FROM snapshots WHERE deleting = 1")]

    def snapshots_in_states(self, states: Iterable[str]) -> list[tuple[Snapshot, str | None]]:
        """(snapshot, owner token) of the snapshots in those states."""
        states = list(states)
        marks = ",".join("?" * len(states))
        rows = self.conn.execute(f"SELECT {_SNAPSHOT_COLS}, owner FROM snapshots "
                                 f"WHERE state IN ({marks})", states)
        return [(_snapshot(r), r["owner"]) for r in rows]

    def snapshot_source(self, snapshot_id: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT source FROM snapshots WHERE id = ?",
                                (snapshot_id,)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def update_snapshot(self, snapshot_id: str, unique_name: bool = False,
                        **fields: Any) -> None:
        """Set columns; ``tags`` is given as a list. Touches modification_date unless
        the change is only progress. ``unique_name``: AlreadyExists if another live
        snapshot of the project in the zone has the new ``name``, checked under the
        write lock of the update (as insert_snapshot does): two processes renaming
        two snapshots to one name cannot both succeed."""
        if unique_name and "name" in fields:
            with self.transaction():
                other = self.conn.execute(
                    "SELECT o.id FROM snapshots o JOIN snapshots s ON s.id = ? "
                    "WHERE o.zone = s.zone AND o.project = s.project AND o.name = ? "
                    "AND o.id != s.id AND o.deleting = 0 LIMIT 1",
                    (snapshot_id, fields["name"])).fetchone()
                if other is not None:
                    raise AlreadyExists(f"snapshot {fields['name']!r} already exists in "
                                        f"its project (snapshot {other[0]})")
                return self.update_snapshot(snapshot_id, **fields)
        if "tags" in fields:
            fields["tags"] = json.dumps(fields["tags"])
        if set(fields) - {"progress"}:
            fields.setdefault("modification_date", now())
        cols = ", ".join(f"{k} = ?" for k in fields)
        if fields.get("state") not in (None, "snapshotting", "importing"):
            # The capture/import is over; but a snapshot still stored from its
            # shadow keeps the owner doing that (an export must not free it for
            # another process's resume_storing).
            cols += ", owner = CASE WHEN shadow IS NULL THEN NULL ELSE owner END"
        # Never a row being deleted: its delete (maybe another process's) owns it.
        self.conn.execute(f"UPDATE snapshots SET {cols} WHERE id = ? AND deleting = 0",
                          list(fields.values()) + [snapshot_id])

    # --- tasks -----------------------------------------------------------------------

    def insert_task(self, t: Task, snapshot_id: str) -> None:
        self.db.table("tasks").insert({
            "id": t.id, "snapshot_id": snapshot_id, "zone": t.zone,
            "description": t.description, "status": t.status, "progress": t.progress,
            "started_at": t.started_at, "terminated_at": t.terminated_at,
            "bucket": t.bucket, "key": t.key, "bytes": t.bytes, "error": t.error,
            "owner": this_process()})

    def update_task(self, task_id: str, **fields: Any) -> None:
        self.db.table("tasks").update(task_id, fields)

    def task(self, zone: str, task_id: str) -> Task:
        row = self.conn.execute("SELECT * FROM tasks WHERE id = ? AND zone = ?",
                                (task_id, zone)).fetchone()
        if row is None:
            raise NotFound("task", task_id)
        return _task(row)

    def latest_task(self, snapshot_id: str) -> Task | None:
        row = self.conn.execute("SELECT * FROM tasks WHERE snapshot_id = ? "
                                "ORDER BY rowid DESC LIMIT 1", (snapshot_id,)).fetchone()
        return _task(row) if row else None

    def unfinished_tasks(self) -> list[tuple[Task, str | None]]:
        """(task, owner token) of the exports not finished."""
        return [(_task(r), r["owner"]) for r in self.conn.execute(
            "SELECT * FROM tasks WHERE status IN ('pending', 'started')")]

    def task_snapshot(self, task_id: str) -> str:
        return str(self.conn.execute("SELECT snapshot_id FROM tasks WHERE id = ?",
                                     (task_id,)).fetchone()[0])
