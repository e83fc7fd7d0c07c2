"""The chunk store under the service: corruption, crashes, fsck, reclaiming."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from contextlib import closing
from pathlib import Path
from typing import Callable

import pytest
import trio

from fixtures_store import (PACED_CAPTURE, MiB, ZONE, all_tokens_held, chunk_place,
                            deletes_done, flip_bits,
                            kill_mid_way, random_bytes, read_all, snapfs_cli, snapshot_of,
                            tasks_waiting, undo_reference_counts, wait_state,
                            write_elsewhere)
from snapfs.errors import CorruptData, NotFound
from snapfs.local import LocalService, open_local_service
from snapfs.local.chunkindex import _release_step
from snapfs.local.fsck import fsck
from snapfs.local.jobs import WRITTEN_WHILE_READ
from snapfs.local.recovery import DELETING


async def test_corrupt_chunk_reads_as_an_error_and_fsck_reports_it(
        store_dir: Path, volume_file: Callable[..., Path]) -> None:
    path = volume_file("v", 4 * MiB, [(0, random_bytes(4 * MiB, seed=10))])
    async with open_local_service(store_dir) as svc:
        snap = await snapshot_of(svc, path, "s")
        place = chunk_place(svc, 2)
    assert snapfs_cli("fsck", store=store_dir).returncode == 0
    flip_bits(store_dir, place, at=1234, mask=0x01)
    async with open_local_service(store_dir) as svc:
        reader = await svc.open_image(ZONE, snap.id)
        assert await reader.read(0, MiB) == path.read_bytes()[:MiB]  # other chunks fine
        with pytest.raises(CorruptData, match="does not match its hash"):
            await reader.read(2 * MiB + 10, 100)
        await reader.aclose()
    res = snapfs_cli("fsck", store=store_dir)
    assert res.returncode == 1
    assert "does not match its hash" in res.stdout
    assert "1 problem(s)" in res.stdout


async def test_fsck_beside_a_delete_reports_no_freed_chunk(
        store_dir: Path, volume_file: Callable[..., Path]) -> None:
    """fsck lists the chunks, then reads them one by one: a delete (the mount's,
    say) may free some meanwhile. Those read as holes, and are not corruption."""
    size = 32 * MiB
    kept = volume_file("kept", size, [(0, random_bytes(size, seed=22))])
    doomed = volume_file("doomed", size, [(0, random_bytes(size, seed=23))])
    async with open_local_service(store_dir) as svc:
        await snapshot_of(svc, kept, "kept")
        gone = await snapshot_of(svc, doomed, "doomed")  # its chunks lie after kept's
        report = None

        async def check() -> None:
            nonlocal report
            report = await fsck(svc)
        async with trio.open_nursery() as n:
            with all_tokens_held(svc.io_limiter):  # fsck stops at its first read, list taken
                n.start_soon(check)
                await tasks_waiting(svc.io_limiter)
                await svc.delete_snapshot(ZONE, gone.id)
        await deletes_done(svc)
        assert report is not None and report.ok, report.problems
        assert report.chunks == 2 * size // MiB
        again = await fsck(svc)
        assert again.ok and again.chunks == size // MiB


async def test_fsck_reports_a_chunk_past_its_packs_committed_length(
        store_dir: Path, volume_file: Callable[..., Path]) -> None:
    path = volume_file("v", 2 * MiB, [(0, random_bytes(2 * MiB, seed=24))])
    async with open_local_service(store_dir) as svc:
        await snapshot_of(svc, path, "s")
    with closing(sqlite3.connect(store_dir / "metadata.db")) as conn, conn:
        conn.execute("UPDATE packs SET committed = ?", (MiB,))  # the second chunk is past it
    res = snapfs_cli("fsck", store=store_dir)
    assert res.returncode == 1
    assert "ends past pack 1's committed length" in res.stdout
    assert "1 problem(s)" in res.stdout


async def test_fsck_reports_a_dangling_reference(store_dir: Path,
                                                 volume_file: Callable[..., Path]) -> None:
    path = volume_file("v", 2 * MiB, [(0, random_bytes(2 * MiB, seed=11))])
    async with open_local_service(store_dir) as svc:
        await snapshot_of(svc, path, "s")
    conn = sqlite3.connect(store_dir / "metadata.db")
    with conn:
        conn.execute("PRAGMA foreign_keys = OFF")
        conn.execute("UPDATE snapshot_chunks SET chunk = 999 WHERE idx = 1")
    conn.close()
    res = snapfs_cli("fsck", store=store_dir)
    assert res.returncode == 1
    assert "refers to missing chunk 999" in res.stdout


def kill_capture_mid_way(store_dir: Path, volume: Path) -> int:
    """Run PACED_CAPTURE of ``volume`` in a subprocess and SIGKILL it once the
    snapshot 'doomed' shows >= 10% progress; returns the progress last seen."""
    return kill_mid_way(PACED_CAPTURE, store_dir, volume)


def test_sigkill_mid_capture_damages_nothing(store_dir: Path, tmp_path: Path,
                                             volume_file: Callable[..., Path]) -> None:
    import trio

    keep = volume_file("keep", 6 * MiB, [(0, random_bytes(6 * MiB, seed=12))])
    big = volume_file("big", 384 * MiB, [(0, random_bytes(384 * MiB, seed=13))])

    async def first() -> str:
        async with open_local_service(store_dir) as svc:
            vol = await svc.add_volume("keep", keep)
            return (await wait_state(svc, (await svc.create_snapshot(
                ZONE, name="keeper", volume_id=vol.id)).id)).id
    keeper = trio.run(first)
    keep_bytes = keep.read_bytes()
    blocks_before = sum(p.stat().st_blocks for p in (store_dir / "packs").glob("*.pack"))

    progress = kill_capture_mid_way(store_dir, big)
    assert 10 <= progress < 100, progress

    async def after() -> None:
        async with open_local_service(store_dir) as svc:
            doomed = (await svc.list_snapshots(ZONE, name="doomed")).items[0]
            assert doomed.state == "error"
            assert "interrupted" in (doomed.error_reason or "")
            assert await read_all(svc, keeper) == keep_bytes
            # Its partial chunks were reclaimed: only the keeper's 6 remain.
            assert svc.md.conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == 6
    trio.run(after)
    blocks_after = sum(p.stat().st_blocks for p in (store_dir / "packs").glob("*.pack"))
    assert blocks_after <= blocks_before + 64  # metadata noise only, no leaked chunk data
    res = snapfs_cli("fsck", store=store_dir)
    assert res.returncode == 0, res.stdout
    assert "clean" in res.stdout


def test_store_directory_is_private(tmp_path: Path) -> None:
    store = tmp_path / "fresh"
    res = snapfs_cli("project", "create", "p", store=store)
    assert res.returncode == 0
    assert (os.stat(store).st_mode & 0o777) == 0o700


async def test_chunks_without_a_fast_check_are_verified_by_their_digest(
        store_dir: Path, volume_file: Callable[..., Path]) -> None:
    """Chunks stored before schema v2 have no xxh3 check: reads fall back to blake3."""
    path = volume_file("v", 2 * MiB, [(0, random_bytes(2 * MiB, seed=14))])
    async with open_local_service(store_dir) as svc:
        snap = await snapshot_of(svc, path, "s")
        assert svc.md.conn.execute("SELECT count(*) FROM chunks WHERE xxh IS NULL"
                                   ).fetchone()[0] == 0
        svc.md.conn.execute("UPDATE chunks SET xxh = NULL")
        assert await read_all(svc, snap.id) == path.read_bytes()
        pack, offset = svc.md.conn.execute("SELECT pack, offset FROM chunks LIMIT 1").fetchone()
    with open(store_dir / "packs" / f"{pack:08d}.pack", "r+b") as f:
        f.seek(offset + 7)
        f.write(b"\xff\x00")
    async with open_local_service(store_dir) as svc:
        with pytest.raises(CorruptData):
            await read_all(svc, snap.id)


async def test_a_version_1_store_is_migrated_and_reads_the_same(
        store_dir: Path, volume_file: Callable[..., Path]) -> None:
    """Migrations run on open, one per transaction, and keep the data readable."""
    from snapfs.local.schema import MIGRATIONS, SCHEMA_VERSION
    path = volume_file("v", 3 * MiB, [(0, random_bytes(3 * MiB, seed=15))])
    async with open_local_service(store_dir) as svc:
        snap = await snapshot_of(svc, path, "s")
    # Turn the store back into what version 1 wrote: no later columns.
    conn = sqlite3.connect(store_dir / "metadata.db")
    with conn:
        conn.execute("ALTER TABLE chunks DROP COLUMN xxh")
        conn.execute("ALTER TABLE chunks DROP COLUMN raw_length")
        conn.execute("ALTER TABLE snapshots DROP COLUMN owner")
        conn.execute("ALTER TABLE tasks DROP COLUMN owner")
        conn.execute("ALTER TABLE snapshots DROP COLUMN deleting")
        conn.execute("ALTER TABLE snapshots DROP COLUMN shadow")
        conn.execute("ALTER TABLE snapshots DROP COLUMN warning")
        conn.execute("ALTER TABLE volumes DROP COLUMN identity")
        for col in ("image_uid", "image_gid", "image_mode"):
            conn.execute(f"ALTER TABLE snapshots DROP COLUMN {col}")
        conn.execute("DROP TABLE left_uploads")
        conn.execute("DROP TABLE map_digests")
        conn.execute("DROP TABLE damaged_chunks")
        undo_reference_counts(conn)
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.close()
    assert SCHEMA_VERSION == len(MIGRATIONS) >= 2
    async with open_local_service(store_dir) as svc:
        version = svc.md.conn.execute(
            "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        assert int(version) == SCHEMA_VERSION
        assert svc.md.conn.execute("SELECT count(*) FROM chunks WHERE xxh IS NULL"
                                   ).fetchone()[0] == 3
        assert await read_all(svc, snap.id) == path.read_bytes()
    res = snapfs_cli("fsck", store=store_dir)
    assert res.returncode == 0, res.stdout


HOLDER = textwrap.dedent("""
    import sys, trio
    from snapfs.local import open_local_service

    async def main():
        async with open_local_service(sys.argv[1]):
            print("open", flush=True)
            await trio.sleep_forever()
    trio.run(main)
""")


def test_a_dead_processs_capture_fails_while_others_keep_the_store_open(
        store_dir: Path, volume_file: Callable[..., Path]) -> None:
    """The open that follows a SIGKILL is not exclusive here (another process holds
    the store), yet the killed process's capture is failed at once, not left
    `snapshotting` until everyone closes the store."""
    import trio

    big = volume_file("big", 384 * MiB, [(0, random_bytes(384 * MiB, seed=16))])
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(store_dir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        kill_capture_mid_way(store_dir, big)

        async def reopen() -> None:
            async with open_local_service(store_dir) as svc:
                doomed = (await svc.list_snapshots(ZONE, name="doomed")).items[0]
                assert doomed.state == "error" and "interrupted" in (doomed.error_reason or "")
                assert svc.md.conn.execute("SELECT count(*) FROM snapshot_chunks"
                                           ).fetchone()[0] == 0
                # A capture of a live process (this one) is left alone by another open.
                vol = (await svc.list_all_volumes())[0]
                live = await svc.create_snapshot(ZONE, name="live", volume_id=vol.id)
                async with open_local_service(store_dir) as other:
                    assert (await other.get_snapshot(ZONE, live.id)).state in (
                        "snapshotting", "available")
                assert (await wait_state(svc, live.id)).state == "available"
        trio.run(reopen)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def add_synthetic_chunks(svc: LocalService, snap_id: str, n: int) -> None:
    """Map ``n`` more (tiny, never read) chunks into a snapshot: the rows of a
    1 TiB snapshot's worth of map without writing a TiB. They lie past 1 GiB in
    pack 1, clear of real chunks (their release punches there)."""
    key, conn = svc.md.snap_key(snap_id), svc.md.conn
    with svc.md.transaction():
        conn.executemany("INSERT INTO chunks (hash, pack, offset, length, xxh) "
                         "VALUES (?, 1, ?, 4096, ?)",
                         ((os.urandom(32), (i + 1024) << 20, os.urandom(16)) for i in range(n)))
        conn.execute("INSERT INTO snapshot_chunks (snap, idx, chunk) "
                     "SELECT ?, id + 100, id FROM chunks WHERE id > 4", (key,))


def table_counts(svc: LocalService) -> list[int]:
    """Rows in chunks, snapshot_chunks and free_extents."""
    return [svc.md.conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("chunks", "snapshot_chunks", "free_extents")]


async def test_a_delete_returns_at_once_and_frees_in_the_background_responsively(
        store_dir: Path, volume_file: Callable[..., Path]) -> None:
    path = volume_file("v", 4 * MiB, [(0, random_bytes(4 * MiB, seed=20))])
    async with open_local_service(store_dir) as svc:
        snap = await snapshot_of(svc, path, "s")
        add_synthetic_chunks(svc, snap.id, 200_000)
        stalls: list[float] = []
        done = False

        async def ticker() -> None:
            last = time.perf_counter()
            while not done:
                await trio.sleep(0.01)
                now = time.perf_counter()
                stalls.append(now - last)
                last = now
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            t = time.perf_counter()
            await svc.delete_snapshot(ZONE, snap.id)
            returned = time.perf_counter() - t
            # Gone at once for everyone, while its map is still being released.
            with pytest.raises(NotFound):
                await svc.get_snapshot(ZONE, snap.id)
            assert (await svc.list_snapshots(ZONE)).total_count == 0
            assert table_counts(svc)[1] > 0
            await deletes_done(svc)
            done = True
        # One transaction took ~1.5 s for this map on the trio thread; steps in a
        # worker leave the loop free (~15 ms at worst for a million entries).
        assert returned < 0.5, returned
        assert max(stalls) < 0.5, max(stalls)
        assert table_counts(svc) == [0, 0, 0]
    assert snapfs_cli("fsck", store=store_dir).returncode == 0


@pytest.mark.parametrize("cut", ["crash", "close"])
async def test_a_delete_cut_short_is_finished_by_the_next_open(
        store_dir: Path, volume_file: Callable[..., Path], cut: str) -> None:
    path = volume_file("v", 8 * MiB, [(0, random_bytes(8 * MiB, seed=21))])
    async with open_local_service(store_dir) as svc:
        snap = await snapshot_of(svc, path, "s")
        kept = await snapshot_of(svc, volume_file("w", 2 * MiB, [(0, b"kept")]), "kept")
        if cut == "crash":  # what a crash mid-delete leaves: the mark, the first steps
            key = svc.md.snap_key(snap.id)
            svc.md.mark_deleting(snap.id, DELETING)
            svc.md.conn.execute("UPDATE snapshots SET owner = 'dead:1:1' WHERE id = ?",
                                (snap.id,))
            with svc.md.transaction():
                assert _release_step(svc.md.conn, key, 3)
        else:  # the service closing while a big map is being released
            add_synthetic_chunks(svc, snap.id, 200_000)
            await svc.delete_snapshot(ZONE, snap.id)
    async with open_local_service(store_dir) as svc:
        with pytest.raises(NotFound):  # never a half map, never listed
            await svc.get_snapshot(ZONE, snap.id)
        assert [s.id for s in (await svc.list_snapshots(ZONE)).items] == [kept.id]
        await deletes_done(svc)
        assert table_counts(svc)[1:] == [1, 0]  # the kept snapshot's one chunk
        assert (await read_all(svc, kept.id))[:4] == b"kept"
    assert snapfs_cli("fsck", store=store_dir).returncode == 0


async def test_a_delete_cut_short_under_schema_3_is_finished_after_the_migration(
        store_dir: Path, volume_file: Callable[..., Path]) -> None:
    path = volume_file("v", 4 * MiB, [(0, random_bytes(4 * MiB, seed=22))])
    async with open_local_service(store_dir) as svc:
        snap = await snapshot_of(svc, path, "s")
        key = svc.md.snap_key(snap.id)
    # What version 3 left after a crash mid-delete: no deleting column, the old
    # reason, part of the map.
    conn = sqlite3.connect(store_dir / "metadata.db")
    with conn:
        conn.execute("ALTER TABLE chunks DROP COLUMN raw_length")
        conn.execute("ALTER TABLE snapshots DROP COLUMN deleting")
        conn.execute("ALTER TABLE snapshots DROP COLUMN shadow")
        conn.execute("ALTER TABLE snapshots DROP COLUMN warning")
        conn.execute("ALTER TABLE volumes DROP COLUMN identity")
        for col in ("image_uid", "image_gid", "image_mode"):
            conn.execute(f"ALTER TABLE snapshots DROP COLUMN {col}")
        conn.execute("DROP TABLE left_uploads")
        conn.execute("UPDATE snapshots SET state = 'error', error_reason = 'being deleted; "
                     "if this stays, the delete was interrupted: delete it again'")
        assert _release_step(conn, key, 2)
        conn.execute("DROP TABLE map_digests")  # after the step, which deletes its row
        conn.execute("DROP TABLE damaged_chunks")
        undo_reference_counts(conn)
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    conn.close()
    async with open_local_service(store_dir) as svc:
        with pytest.raises(NotFound):
            await svc.get_snapshot(ZONE, snap.id)
        await deletes_done(svc)
        assert table_counts(svc) == [0, 0, 0]
    assert snapfs_cli("fsck", store=store_dir).returncode == 0


async def test_a_volume_written_while_it_is_read_gets_a_warning(
        store_dir: Path, volume_file: Callable[..., Path],
        caplog: pytest.LogCaptureFixture) -> None:
    """Like GNU tar's "file changed as we read it": a plain capture of a volume
    someone writes meanwhile is not of one instant, and says so (schema v6)."""
    size = 32 * MiB
    path = volume_file("v", size, [(0, random_bytes(size, seed=21))])
    async with open_local_service(store_dir) as svc:
        quiet = await snapshot_of(svc, path, "quiet")
        assert quiet.warning is None
        write_elsewhere(path, 0, b"q" * 4096)  # before the next capture: no warning for that
        [vol] = await svc.list_all_volumes()
        async with svc.index_lock:  # the capture stops at its first commit
            snap = await svc.create_snapshot(ZONE, name="busy", volume_id=vol.id)
            with trio.fail_after(30):
                while not svc.index_lock.statistics().tasks_waiting:
                    await trio.sleep(0.001)
            write_elsewhere(path, size - 4096, b"w" * 4096)  # while it is being read
        busy = await wait_state(svc, snap.id)
        assert busy.state == "available" and busy.warning == WRITTEN_WHILE_READ
        assert f"snapshot {snap.id}: the volume was written while it was read" in caplog.text
        assert (await svc.get_snapshot(ZONE, quiet.id)).warning is None
    async with open_local_service(store_dir) as svc:  # kept
        assert (await svc.get_snapshot(ZONE, snap.id)).warning == WRITTEN_WHILE_READ
