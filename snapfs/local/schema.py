"""The local store's SQLite schema, documented beside its DDL, and its migrations.

The database (``<store>/metadata.db``, WAL mode) holds all metadata; snapshot
bytes live in pack files (see ``chunks.py``). A chunk row is committed only after
the pack bytes it points at are fsynced, so every committed reference is backed
by durable data; pack bytes that no row points at are garbage that recovery
truncates (at a pack's tail) or punches out (``free_extents``).

``MIGRATIONS[i]`` takes the schema from version ``i`` to ``i + 1``; the current
version is stored in ``meta.schema_version``. Never edit a released migration:
append a new one.
"""

from __future__ import annotations

import sqlite3

from ..errors import SnapfsError

MIGRATIONS: list[str] = [
    # --- version 1 -----------------------------------------------------------------
    """
    -- Key/value facts about the store.
    --   schema_version: the number of migrations applied.
    --   organization:   the default organization's ID (made on first run).
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );

    -- Projects. A project named 'default' exists from the first run.
    CREATE TABLE projects (
        id           TEXT PRIMARY KEY,          -- UUID
        name         TEXT NOT NULL UNIQUE,
        organization TEXT NOT NULL,             -- organization UUID
        description  TEXT NOT NULL DEFAULT '',
        created_at   TEXT NOT NULL,             -- RFC 3339
        updated_at   TEXT NOT NULL
    );

    -- Volumes: raw image files or block devices snapshots are captured from.
    CREATE TABLE volumes (
        id                TEXT PRIMARY KEY,     -- UUID
        name              TEXT NOT NULL,
        zone              TEXT NOT NULL,
        project           TEXT NOT NULL REFERENCES projects(id),
        organization      TEXT NOT NULL,
        size              INTEGER NOT NULL,     -- bytes; refreshed from the file at capture
        volume_type       TEXT NOT NULL,        -- l_ssd | b_ssd | unified
        state             TEXT NOT NULL,        -- always 'available' locally
        path              TEXT NOT NULL,        -- absolute path of the image / device
        managed           INTEGER NOT NULL,     -- 1: file made by 'volume create' inside
                                                --    the store (removed with the volume)
        tags              TEXT NOT NULL,        -- JSON list of strings
        creation_date     TEXT NOT NULL,
        modification_date TEXT NOT NULL,
        UNIQUE (zone, name)                     -- the CLI names volumes
    );

    -- Snapshots, in the API's shape. The implicit rowid is the stable List
    -- order (creation order) and the compact key of the chunk map.
    CREATE TABLE snapshots (
        id                TEXT NOT NULL UNIQUE, -- UUID
        name              TEXT NOT NULL,
        zone              TEXT NOT NULL,
        project           TEXT NOT NULL,
        organization      TEXT NOT NULL,
        tags              TEXT NOT NULL,        -- JSON list of strings, order kept
        volume_type       TEXT NOT NULL,
        size              INTEGER NOT NULL,     -- bytes (import: 0 until the header is read)
        state             TEXT NOT NULL,        -- available | snapshotting | error |
                                                -- invalid_data | importing | exporting
        base_volume_id    TEXT,                 -- NULL: imported (no base volume)
        base_volume_name  TEXT,
        creation_date     TEXT NOT NULL,
        modification_date TEXT NOT NULL,
        error_reason      TEXT,                 -- NULL unless state is error/invalid_data
        progress          INTEGER NOT NULL,     -- 0-100 while capturing/importing, else 100
        source            TEXT                  -- import: JSON {bucket, key}; else NULL
    );
    CREATE INDEX snapshots_zone ON snapshots (zone, project);
    CREATE INDEX snapshots_base ON snapshots (base_volume_id);

    -- Pack files <store>/packs/<id>.pack: chunks appended back to back at
    -- 4 KiB-aligned offsets. 'committed' is the length up to which the file's
    -- bytes are described by committed rows; anything past it is the tail of an
    -- interrupted write and is truncated at the next open.
    CREATE TABLE packs (
        id        INTEGER PRIMARY KEY,
        committed INTEGER NOT NULL
    );

    -- Distinct stored chunks (content-addressed). All-zero chunks are never
    -- stored: a missing map entry reads as zeros.
    CREATE TABLE chunks (
        id     INTEGER PRIMARY KEY,
        hash   BLOB NOT NULL UNIQUE,            -- blake3 digest, 32 bytes
        pack   INTEGER NOT NULL REFERENCES packs(id),
        offset INTEGER NOT NULL,                -- byte offset in the pack file
        length INTEGER NOT NULL                 -- bytes (<= chunk size; last chunk shorter)
    );
    CREATE INDEX chunks_pack ON chunks (pack);

    -- The chunk map: snapshot rowid x chunk index -> chunk. Absent = hole.
    CREATE TABLE snapshot_chunks (
        snap  INTEGER NOT NULL,                 -- snapshots.rowid
        idx   INTEGER NOT NULL,                 -- offset // chunk size
        chunk INTEGER NOT NULL,                 -- chunks.id
        PRIMARY KEY (snap, idx)
    ) WITHOUT ROWID;
    CREATE INDEX snapshot_chunks_chunk ON snapshot_chunks (chunk);  -- until v11

    -- Pack ranges whose chunk rows were deleted in a committed transaction but
    -- whose space is not yet punched out; processed after each delete and at open,
    -- so a crash between the commit and the punch leaks nothing.
    CREATE TABLE free_extents (
        pack   INTEGER NOT NULL,
        offset INTEGER NOT NULL,
        length INTEGER NOT NULL
    );

    -- Export tasks (the API's Task), kept for status reads.
    CREATE TABLE tasks (
        id            TEXT PRIMARY KEY,         -- UUID
        snapshot_id   TEXT NOT NULL,
        zone          TEXT NOT NULL,
        description   TEXT NOT NULL,
        status        TEXT NOT NULL,            -- pending | started | success | failure
        progress      INTEGER NOT NULL,         -- 0-100
        started_at    TEXT,
        terminated_at TEXT,
        bucket        TEXT NOT NULL,
        key           TEXT NOT NULL,
        bytes         INTEGER NOT NULL,         -- object bytes uploaded so far / in all
        error         TEXT                      -- NULL unless status is failure
    );
    """,
    # --- version 2 -----------------------------------------------------------------
    """
    -- xxh3-128 of the chunk's bytes, checked on every read: ~5x cheaper than
    -- blake3 (25 vs 4.7 GB/s, scripts/bench/hash.py), which stays the content
    -- address and what fsck verifies. NULL for chunks stored before version 2:
    -- reads verify their blake3 digest instead.
    ALTER TABLE chunks ADD COLUMN xxh BLOB;
    """,
    # --- version 3 -----------------------------------------------------------------
    """
    -- The process doing a snapshot's capture/import or a task's export
    -- ("<boot id>:<pid>:<start time>", see owner.py); NULL once it ended. Any
    -- process opening the store fails the work of owners that died, even while
    -- other processes keep the store open.
    ALTER TABLE snapshots ADD COLUMN owner TEXT;
    ALTER TABLE tasks ADD COLUMN owner TEXT;
    """,
    # --- version 4 -----------------------------------------------------------------
    """
    -- 1 once a Delete was accepted: the row is invisible to List and Get from then
    -- on, while its map is released in the background (state 'error', owner = the
    -- releasing process); the row goes with the map's last step. A release cut
    -- short is resumed by the next open that finds its owner dead.
    ALTER TABLE snapshots ADD COLUMN deleting INTEGER NOT NULL DEFAULT 0;
    -- Deletes interrupted under version 3 (marked by their reason) resume too.
    UPDATE snapshots SET deleting = 1
        WHERE state = 'error' AND error_reason LIKE 'being deleted%';
    """,
    # --- version 5 -----------------------------------------------------------------
    """
    -- An available snapshot whose bytes are still only in its shadow (a durable
    -- reflink clone of the volume, shadows.py), as '<volume id>/<file name>' under
    -- <store>/shadows, while its chunks are being stored (owner = the storing
    -- process); NULL once its chunk map is complete. Reads are served from the
    -- shadow meanwhile; an open resumes the storing of those whose owner died,
    -- their partial map released first.
    ALTER TABLE snapshots ADD COLUMN shadow TEXT;
    """,
    # --- version 6 -----------------------------------------------------------------
    """
    -- Why an available snapshot may not hold the volume of one instant: the volume
    -- (a plain capture's source, not a clone) was written while it was read, as
    -- its size or times show (GNU tar's "file changed as we read it"). NULL:
    -- nothing to say. Not part of the API object; the mount shows it as
    -- user.warning.
    ALTER TABLE snapshots ADD COLUMN warning TEXT;
    """,
    # --- version 7 -----------------------------------------------------------------
    """
    -- A volume is the file it was registered as (volumefile.py): the identity of
    -- the file at 'path' (resolved) when it was added or re-pointed,
    -- 'file:<st_dev>:<st_ino>' or 'block:<major>:<minor>'. Every capture opens
    -- the path without following symlinks and checks it. NULL: registered before
    -- this version; its next snapshot records it (trust on first use).
    ALTER TABLE volumes ADD COLUMN identity TEXT;
    -- image.raw's owner, group and permission bits (the mount shows the read
    -- bits): those of the volume file when the snapshot was taken. NULL
    -- (imports, older snapshots): the mount's owner, 0400.
    ALTER TABLE snapshots ADD COLUMN image_uid INTEGER;
    ALTER TABLE snapshots ADD COLUMN image_gid INTEGER;
    ALTER TABLE snapshots ADD COLUMN image_mode INTEGER;
    """,
    # --- version 8 -----------------------------------------------------------------
    """
    -- Multipart uploads that a failed export could not abort (Object Storage did
    -- not answer): their parts stay billed on the server until aborted. Any
    -- process with Object Storage aborts them once it answers -- retried with
    -- backoff while it runs, and at every open (uploads.py) -- and drops the row.
    CREATE TABLE left_uploads (
        upload_id  TEXT PRIMARY KEY,            -- the S3 UploadId
        bucket     TEXT NOT NULL,
        key        TEXT NOT NULL,
        zone       TEXT NOT NULL,               -- picks the Object Storage region
        left_at    TEXT NOT NULL                -- RFC 3339: when the abort failed
    );
    """,
    # --- version 9 -----------------------------------------------------------------
    """
    -- Compressed chunks (compression.py). NULL: the chunk is stored raw, as every
    -- chunk before this version and every chunk cloned in (FICLONERANGE) -- its
    -- 'length' bytes in the pack are the chunk. Else the 'length' stored bytes are
    -- one zstd frame that decompresses to raw_length bytes. 'length' stays what the
    -- chunk occupies in its pack (free_extents, tails); 'hash' (blake3, the content
    -- address) covers the raw bytes, 'xxh' (the read check) the stored bytes,
    -- checked before decompressing.
    ALTER TABLE chunks ADD COLUMN raw_length INTEGER;
    """,
    # --- version 10 ----------------------------------------------------------------
    """
    -- Per-window digests of a complete chunk map (mapdigest.py): changes/ skips
    -- the windows two maps share, map.json the wholly full or empty ones. Written
    -- once the map is complete, deleted when its release begins; a complete map
    -- without a row gets one on first use. fsck recomputes them.
    CREATE TABLE map_digests (
        snap    INTEGER PRIMARY KEY,            -- snapshots.rowid (the map key)
        window  INTEGER NOT NULL,               -- map entries per window
        digests BLOB NOT NULL,                  -- 16 bytes per window: blake2b of its
                                                -- "idx:chunk" entries
        counts  BLOB NOT NULL                   -- 1 byte per window: its entries
    );
    """,
    # --- version 11 ----------------------------------------------------------------
    """
    -- Reference counts (chunkindex.py): a chunk's refs is how many map entries name
    -- it, kept by the three triggers below whatever statement writes the maps. They
    -- replace the index snapshot_chunks (chunk), whose entries for one chunk sit
    -- together: copying a map put one new entry beside every other snapshot's
    -- entry of each of its chunks, so a copy rewrote most of that index (128
    -- entries at 300 snapshots: ~430 KiB read and rewritten, growing with every
    -- snapshot). A chunk's refs lives in its own row, beside its volume's other
    -- chunks. A release frees the chunks whose refs reached 0; fsck recounts.
    ALTER TABLE chunks ADD COLUMN refs INTEGER NOT NULL DEFAULT 0;
    UPDATE chunks SET refs = (SELECT count(*) FROM snapshot_chunks m
                              WHERE m.chunk = chunks.id);
    CREATE TRIGGER snapshot_chunks_ref AFTER INSERT ON snapshot_chunks BEGIN
        UPDATE chunks SET refs = refs + 1 WHERE id = NEW.chunk;
    END;
    CREATE TRIGGER snapshot_chunks_unref AFTER DELETE ON snapshot_chunks BEGIN
        UPDATE chunks SET refs = refs - 1 WHERE id = OLD.chunk;
    END;
    CREATE TRIGGER snapshot_chunks_reref AFTER UPDATE OF chunk ON snapshot_chunks BEGIN
        UPDATE chunks SET refs = refs - 1 WHERE id = OLD.chunk;
        UPDATE chunks SET refs = refs + 1 WHERE id = NEW.chunk;
    END;
    DROP INDEX snapshot_chunks_chunk;
    """,
    # --- version 12 ----------------------------------------------------------------
    """
    -- Chunks whose stored bytes are known bad: fsck --repair found them missing
    -- (their pack gone) or not matching their hash. Deduplication skips them
    -- (chunkindex.known): the next capture or import that meets their content
    -- stores it anew and points the chunk's row at the new copy, which heals every
    -- snapshot that names the chunk; the row here then goes. Until then they read
    -- as EIO, never as wrong bytes.
    CREATE TABLE damaged_chunks (
        chunk  INTEGER PRIMARY KEY,             -- chunks.id
        found  TEXT NOT NULL                    -- RFC 3339: when it was marked
    );
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the database to SCHEMA_VERSION, one migration per transaction."""
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
    version = 0
    if has_meta:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise SnapfsError(f"store schema version {version} is newer than this snapfs "
                          f"({SCHEMA_VERSION}); upgrade snapfs")
    for i in range(version, SCHEMA_VERSION):
        conn.executescript("BEGIN;" + MIGRATIONS[i] + ";" +
                               "INSERT OR REPLACE INTO meta (key, value) VALUES "
                               f"('schema_version', '{i + 1}'); COMMIT;")
