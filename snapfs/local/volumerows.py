"""The volumes' rows of the store's database (Metadata's share of them): short
queries, as everywhere in metadata.py."""

from __future__ import annotations

import json
import sqlite3
from contextlib import AbstractContextManager

import sqlite_utils

from ..errors import InvalidArgument, NotFound, PreconditionFailed
from ..model import Page, Volume, utf8_len, now

#: Volumes with whether a snapshot of theirs is being captured (or queued): shown as
#: the API's ``snapshotting`` state, in which a volume is not deleted.
_VOLUMES = ("SELECT *, EXISTS (SELECT 1 FROM snapshots s WHERE s.base_volume_id = volumes.id "
            "AND s.state = 'snapshotting' AND s.deleting = 0) AS capturing FROM volumes")


def _volume(row: sqlite3.Row) -> Volume:
    return Volume(
        id=row["id"], name=row["name"], size=row["size"], volume_type=row["volume_type"],
        zone=row["zone"], project=row["project"], organization=row["organization"],
        state="snapshotting" if row["capturing"] else row["state"],
        creation_date=row["creation_date"],
        modification_date=row["modification_date"], tags=json.loads(row["tags"]),
        path=row["path"])


class VolumeRows:
    """Mixed into Metadata, whose connection and transactions these use."""

    conn: sqlite3.Connection
    db: sqlite_utils.Database

    def transaction(self) -> AbstractContextManager[sqlite_utils.Database]:
        raise NotImplementedError

    def add_volume(self, v: Volume, managed: bool, identity: str | None = None) -> None:
        if self.conn.execute("SELECT 1 FROM volumes WHERE zone = ? AND name = ?",
                             (v.zone, v.name)).fetchone():
            raise InvalidArgument("name", f"a volume named {v.name!r} already exists in {v.zone}")
        row = v.to_api()
        for k in ("export_uri", "server"):
            row.pop(k)
        row.update(tags=json.dumps(v.tags), managed=int(managed), identity=identity)
        self.db.table("volumes").insert(row)

    def volume(self, zone: str | None, ref: str) -> Volume:
        """A volume by ID, or by name within ``zone`` (any zone when None)."""
        if utf8_len(ref) is None:  # undecodable bytes: no volume is named so
            raise NotFound("volume", ref)
        rows = self.conn.execute(
            f"{_VOLUMES} WHERE (id = ? OR name = ?) AND (? IS NULL OR zone = ?) "
            "ORDER BY id = ? DESC", (ref, ref, zone, zone, ref)).fetchall()
        if not rows:
            raise NotFound("volume", ref)
        if len(rows) > 1 and rows[0]["id"] != ref:
            raise InvalidArgument("volume", f"{ref!r} names volumes in several zones; "
                                            "give --zone or the ID")
        return _volume(rows[0])

    def volume_managed(self, volume_id: str) -> bool:
        row = self.conn.execute("SELECT managed FROM volumes WHERE id = ?",
                                (volume_id,)).fetchone()
        return bool(row and row[0])

    def list_volumes(self, zone: str, project: str | None, name: str | None,
                     per_page: int, page: int) -> Page[Volume]:
        where = "zone = ? AND (? IS NULL OR project = ?) AND (? IS NULL OR instr(name, ?) > 0)"
        args = (zone, project, project, name, name)
        total = self.conn.execute(f"SELECT count(*) FROM volumes WHERE {where}", args).fetchone()[0]
        rows = self.conn.execute(f"{_VOLUMES} WHERE {where} ORDER BY rowid "
                                 "LIMIT ? OFFSET ?", args + (per_page, (page - 1) * per_page))
        return Page([_volume(r) for r in rows], total)

    def all_volumes(self) -> list[Volume]:
        return [_volume(r) for r in self.conn.execute(f"{_VOLUMES} ORDER BY rowid")]

    def remove_volume(self, volume_id: str) -> None:
        """PreconditionFailed while a snapshot of it is being captured (or queued):
        removing it under the capture failed that snapshot, which had been accepted
        (Scaleway refuses a volume in ``snapshotting`` too)."""
        with self.transaction():
            busy = self.conn.execute(
                "SELECT id, name FROM snapshots WHERE base_volume_id = ? AND deleting = 0 "
                "AND state = 'snapshotting' LIMIT 1", (volume_id,)).fetchone()
            if busy is not None:
                raise PreconditionFailed(f"volume {volume_id} is being snapshotted (snapshot "
                                         f"{busy[0]}, {busy[1]!r}): remove it once that "
                                         "snapshot is available, or delete the snapshot")
            self.conn.execute("DELETE FROM volumes WHERE id = ?", (volume_id,))

    def update_volume(self, volume_id: str, zone: str, name: str | None,
                      tags: list[str] | None) -> None:
        """A new name (unique in the zone, as add_volume keeps it) and/or tags."""
        with self.transaction():
            if name is not None and self.conn.execute(
                    "SELECT 1 FROM volumes WHERE zone = ? AND name = ? AND id != ?",
                    (zone, name, volume_id)).fetchone():
                raise InvalidArgument("name", f"a volume named {name!r} already exists in "
                                              f"{zone}")
            self.conn.execute(
                "UPDATE volumes SET name = coalesce(?, name), tags = coalesce(?, tags), "
                "modification_date = ? WHERE id = ?",
                (name, None if tags is None else json.dumps(tags), now(), volume_id))

    def set_volume_size(self, volume_id: str, size: int) -> None:
        self.conn.execute("UPDATE volumes SET size = ? WHERE id = ?", (size, volume_id))

    def volume_identity(self, volume_id: str) -> str | None:
        """The identity of the volume's file (schema v7), None if not recorded yet."""
        row = self.conn.execute("SELECT identity FROM volumes WHERE id = ?",
                                (volume_id,)).fetchone()
        return row[0] if row else None

    def set_volume_file(self, volume_id: str, identity: str, path: str | None = None,
                        size: int | None = None) -> None:
        """Record the file a volume is (its identity; a re-pointed path and size)."""
        self.conn.execute(
            "UPDATE volumes SET identity = ?, path = coalesce(?, path), "
            "size = coalesce(?, size), modification_date = ? WHERE id = ?",
            (identity, path, size, now(), volume_id))
