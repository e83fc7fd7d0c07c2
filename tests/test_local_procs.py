"""Several services on one store, as several processes would have it open (a mount
and `snapfs serve`): two LocalService instances hold their own SQLite connections
and their own descriptors of the store's lock file, whose OFD locks exclude each
other exactly as between processes (storelocks.py). The real processes are in
test_mount_procs.py."""

from __future__ import annotations

import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import trio

from fixtures_store import (PACED_CAPTURE, MiB, ZONE, deletes_done, kill_mid_way,
                            random_bytes, read_all, shadow_files, snapshot_of, write_volume)
from snapfs.errors import AlreadyExists, NotFound, PreconditionFailed
from snapfs.local import open_local_service
from snapfs.local import adoption as adoption_module
from snapfs.local.fsck import fsck
from snapfs.local.metadata import Metadata
from snapfs.local.owner import _boot_id, _start_time, alive


def map_rows(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM snapshot_chunks").fetchone()[0])


async def test_a_reader_in_one_process_keeps_deletes_of_another_away(
        store_dir: Path, volume_file: Callable[..., Path]) -> None:
    data = random_bytes(3 * MiB, 1)
    path = volume_file("v", 4 * MiB, [(0, data)])
    async with open_local_service(store_dir) as a, open_local_service(store_dir) as b:
        snap = await snapshot_of(a, path)
        rows = map_rows(a.md.conn)
        reader = await a.open_image(ZONE, snap.id)
        with pytest.raises(PreconditionFailed, match="open for reading"):
            await b.delete_snapshot(ZONE, snap.id)
        # Nothing changed: still there for both, its map whole, its bytes right.
        assert (await b.get_snapshot(ZONE, snap.id)).state == "available"
        assert map_rows(b.md.conn) == rows
        assert await reader.read(0, 3 * MiB) == data
        # A second reader, in the deleting process itself, is no different.
        other = await b.open_image(ZONE, snap.id)
        await reader.aclose()
        with pytest.raises(PreconditionFailed, match="open for reading"):
            await a.delete_snapshot(ZONE, snap.id)
        await other.aclose()
        await b.delete_snapshot(ZONE, snap.id)
        with pytest.raises(NotFound):
            await a.open_image(ZONE, snap.id)
        await deletes_done(b)
        assert map_rows(a.md.conn) == 0


async def test_a_unique_name_is_taken_by_one_process_only(
        store_dir: Path, volume_file: Callable[..., Path]) -> None:
    """The tree's names are unique in a project; two mounts of one store must not
    both pass their own check and create (unique_name is checked under the write
    lock of the insert). The API itself allows duplicates (unique_name False)."""
    path = volume_file("v", 4 * MiB, [(0, random_bytes(MiB, 3))])
    async with open_local_service(store_dir) as a, open_local_service(store_dir) as b:
        first = await snapshot_of(a, path, "x", unique_name=True)
        vol = first.base_volume
        assert vol is not None
        before = await b.list_snapshots(ZONE)
        for svc in (a, b):
            with pytest.raises(AlreadyExists, match="already exists"):
                await svc.create_snapshot(ZONE, name="x", volume_id=vol.id, unique_name=True)
        assert await b.list_snapshots(ZONE) == before
        # Another name, or the API's create, is not held to it.
        await snapshot_of(b, path, "y", unique_name=True)
        await snapshot_of(b, path, "x")
        assert sorted(s.name for s in (await a.list_snapshots(ZONE)).items) == ["x", "x", "y"]


async def test_a_rename_takes_a_name_in_one_process_only(
        store_dir: Path, volume_file: Callable[..., Path]) -> None:
    """mv checks the name in its own mount first; between that check and the update
    another mount may rename (or mkdir) to the same name. The update itself checks
    under the write lock: the second rename is refused and changes nothing."""
    path = volume_file("v", 4 * MiB, [(0, random_bytes(MiB, 4))])
    async with open_local_service(store_dir) as a, open_local_service(store_dir) as b:
        s1 = await snapshot_of(a, path, "one", unique_name=True)
        s2 = await snapshot_of(b, path, "two", unique_name=True)
        await a.update_snapshot(ZONE, s1.id, name="z", unique_name=True)
        before = await b.get_snapshot(ZONE, s2.id)
        with pytest.raises(AlreadyExists, match="'z' already exists"):
            await b.update_snapshot(ZONE, s2.id, name="z", unique_name=True)
        assert await a.get_snapshot(ZONE, s2.id) == before
        # Its own name again, tags alongside, and the API's update are not held to it.
        again = await b.update_snapshot(ZONE, s1.id, name="z", tags=["t"], unique_name=True)
        assert (again.name, again.tags) == ("z", ["t"])
        await b.update_snapshot(ZONE, s2.id, name="z")
        assert sorted(s.name for s in (await a.list_snapshots(ZONE)).items) == ["z", "z"]


async def test_an_export_in_one_process_keeps_deletes_of_another_away(
        store_dir: Path, volume_file: Callable[..., Path]) -> None:
    path = volume_file("v", 2 * MiB, [(0, random_bytes(MiB, 2))])
    async with open_local_service(store_dir) as a, open_local_service(store_dir) as b:
        snap = await snapshot_of(a, path)
        a.md.start_export(snap.id)  # as export_snapshot does, before its upload starts
        with pytest.raises(PreconditionFailed, match="exporting"):
            await b.delete_snapshot(ZONE, snap.id)
        assert (await b.get_snapshot(ZONE, snap.id)).state == "exporting"
        a.md.update_snapshot(snap.id, state="available")
        # And the other way round: once a delete has begun, no export starts.
        await b.delete_snapshot(ZONE, snap.id)
        assert not a.md.start_export(snap.id)


async def test_the_index_lock_holds_off_the_other_process(
        store_dir: Path, volume_file: Callable[..., Path]) -> None:
    data = random_bytes(2 * MiB, 3)
    path = volume_file("v", 2 * MiB, [(0, data)])
    async with open_local_service(store_dir) as a, open_local_service(store_dir) as b:
        vol = await b.add_volume("v", path)
        await a.index_lock.acquire()
        try:
            snap = await b.create_snapshot(ZONE, name="s", volume_id=vol.id)
            await trio.sleep(0.5)  # its first commit waits for a's lock all along
            assert (await b.get_snapshot(ZONE, snap.id)).state == "snapshotting"
            assert map_rows(b.md.conn) == 0
        finally:
            a.index_lock.release()
        with trio.fail_after(30):
            while (await b.get_snapshot(ZONE, snap.id)).state == "snapshotting":
                await trio.sleep(0.02)
        assert await read_all(a, snap.id) == data


async def test_a_capture_whose_snapshot_another_process_deletes_leaves_nothing(
        store_dir: Path, volume_file: Callable[..., Path],
        caplog: pytest.LogCaptureFixture) -> None:
    """The cause of fsck's "chunk map rows of a deleted snapshot": a capture went on
    committing map rows after another process had deleted its snapshot."""
    path = volume_file("v", 8 * MiB, [(0, random_bytes(8 * MiB, 4))])
    async with open_local_service(store_dir) as a, open_local_service(store_dir) as b:
        vol = await a.add_volume("v", path)
        await a.index_lock.acquire()  # a's capture waits at its first commit
        try:
            snap = await a.create_snapshot(ZONE, name="doomed", volume_id=vol.id)
            await trio.sleep(0.2)
            await b.delete_snapshot(ZONE, snap.id)  # a capture of another process: no EBUSY
            await trio.sleep(0.2)  # b's release is under way (or waits for the lock)
        finally:
            a.index_lock.release()
        with trio.fail_after(30):
            await a.jobs.idle()
            await b.jobs.idle()
        await deletes_done(b)
        assert map_rows(a.md.conn) == 0
        assert a.md.conn.execute("SELECT count(*) FROM snapshots").fetchone()[0] == 0
        assert a.md.conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == 0
        report = await fsck(a)
        assert report.ok, report.problems
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def test_an_exclusive_open_releases_map_rows_left_by_a_deleted_snapshot(
        store_dir: Path, volume_file: Callable[..., Path]) -> None:
    """Stores that an older snapfs left so: the rows are released, and meanwhile no
    new snapshot is given their key (it would read them as its own)."""
    path = volume_file("v", 4 * MiB, [(0, random_bytes(2 * MiB, 5))])
    async with open_local_service(store_dir) as svc:
        snap = await snapshot_of(svc, path)
        key = svc.md.snap_key(snap.id)
        svc.md.conn.execute("DELETE FROM snapshots WHERE id = ?", (snap.id,))
        assert map_rows(svc.md.conn) == 2
        fresh = await svc.create_snapshot(ZONE, name="fresh",
                                          volume_id=(await svc.list_all_volumes())[0].id)
        assert svc.md.snap_key(fresh.id) > key
        await svc.delete_snapshot(ZONE, fresh.id)
        await deletes_done(svc)
    async with open_local_service(store_dir) as svc:  # to itself: recovery runs
        assert map_rows(svc.md.conn) == 0
        assert svc.md.conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == 0
        report = await fsck(svc)
        assert report.ok, report.problems


async def test_a_map_key_is_never_given_twice(
        store_dir: Path, volume_file: Callable[..., Path]) -> None:
    """SQLite hands out a deleted highest rowid again; work holding the old key (a
    volume's lease naming the map it may reuse, a capture in another process) would
    then read or write the new snapshot's map: another volume's bytes."""
    one, two = random_bytes(2 * MiB, 6), random_bytes(2 * MiB, 7)
    p1, p2 = volume_file("one", 2 * MiB, [(0, one)]), volume_file("two", 2 * MiB, [(0, two)])
    async with open_local_service(store_dir) as svc:
        first = await snapshot_of(svc, p1, "first")  # the lease on p1 names its map
        first_key = svc.md.snap_key(first.id)
        await svc.delete_snapshot(ZONE, first.id)
        await deletes_done(svc)
        other = await snapshot_of(svc, p2, "other")
        assert svc.md.snap_key(other.id) > first_key
        again = await snapshot_of(svc, p1, "again")  # p1 untouched since its lease
        assert await read_all(svc, again.id) == one
        assert await read_all(svc, other.id) == two


async def test_a_write_waits_for_another_connections_transaction(store_dir: Path) -> None:
    async with open_local_service(store_dir) as svc:
        other = sqlite3.connect(store_dir / "metadata.db", isolation_level=None,
                                check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        other.execute("UPDATE projects SET description = 'x'")
        timer = threading.Timer(0.3, lambda: other.execute("COMMIT"))
        timer.start()
        t0 = time.monotonic()
        try:
            project = await svc.create_project("waited")  # "database is locked" before
        finally:
            timer.join()
            other.close()
        assert time.monotonic() - t0 >= 0.25
        assert project.name in [p.name for p in await svc.list_projects()]
        # A transaction takes the write lock at once (BEGIN IMMEDIATE): one that
        # reads first never fails on a write another process committed meanwhile.
        probe = sqlite3.connect(store_dir / "metadata.db", timeout=0, isolation_level=None)
        with svc.md.transaction():
            svc.md.conn.execute("SELECT count(*) FROM projects").fetchone()
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                probe.execute("BEGIN IMMEDIATE")
        probe.close()


def test_a_killed_process_not_yet_reaped_counts_as_dead() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    token = f"{_boot_id()}:{proc.pid}:{_start_time(proc.pid)}"
    assert alive(token)
    proc.kill()
    # A zombie once the kernel has run its exit (its parent, this test, has not
    # waited): polled, not a fixed sleep -- a loaded machine may take longer.
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the killed process never became a zombie"
        time.sleep(0.01)
    assert not alive(token)
    proc.wait()



def test_processes_opening_a_new_store_at_once_agree_on_it(tmp_path: Path) -> None:
    """A mount and `serve` started together on a new store: each migrates and
    makes the default project, neither fails, one organization results."""
    for round_ in range(5):
        path = tmp_path / f"s{round_}" / "metadata.db"
        path.parent.mkdir()
        orgs: list[str] = []
        errors: list[BaseException] = []

        def open_it() -> None:
            try:
                md = Metadata(path)
                orgs.append(md.organization)
                md.close()
            except BaseException as exc:
                errors.append(exc)
        threads = [threading.Thread(target=open_it) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(set(orgs)) == 1 and len(orgs) == 3
        db = sqlite3.connect(path)
        assert db.execute("SELECT count(*) FROM projects").fetchone()[0] == 1
        db.close()




async def test_a_process_that_dies_beside_a_running_one_is_recovered_by_it(
        store_dir: Path, volume_file: Callable[..., Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A server OOM-killed mid-capture beside a mount: the mount fails the capture
    (and frees what it stored) without waiting for some process to open the store."""
    monkeypatch.setattr(adoption_module, "ORPHAN_SWEEP", 0.1)
    keep = random_bytes(2 * MiB, 8)
    big = volume_file("big", 96 * MiB, [(0, random_bytes(96 * MiB, 9))])
    async with open_local_service(store_dir) as svc:
        keeper = await snapshot_of(svc, volume_file("keep", 2 * MiB, [(0, keep)]))
        progress = await trio.to_thread.run_sync(kill_mid_way, PACED_CAPTURE, store_dir, big)
        assert 10 <= progress < 100
        with trio.fail_after(30):
            while True:
                doomed = (await svc.list_snapshots(ZONE, name="doomed")).items[0]
                if doomed.state != "snapshotting":
                    break
                await trio.sleep(0.05)
        assert doomed.state == "error" and "interrupted" in (doomed.error_reason or "")
        await deletes_done(svc)
        assert svc.md.conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == 2
        assert await read_all(svc, keeper.id) == keep


async def test_a_clone_backed_snapshot_deleted_by_another_process_while_it_is_stored(
        reflink_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """On XFS/btrfs: the storing process stops at its next commit, quietly (no
    retry, no error), and the deleting one frees everything."""
    store = reflink_dir / "store"
    path = write_volume(reflink_dir / "v.raw", 16 * MiB, [(0, random_bytes(12 * MiB, 10))])
    async with open_local_service(store) as a, open_local_service(store) as b:
        vol = await a.add_volume("v", path)
        async with a.index_lock:  # a's storing waits at its first commit
            snap = await a.create_snapshot(ZONE, name="s", volume_id=vol.id)
            assert snap.state == "available" and a.md.shadow_of(snap.id) is not None
            await b.delete_snapshot(ZONE, snap.id)
            await trio.sleep(0.2)
        with trio.fail_after(30):
            await a.jobs.idle()
            await b.jobs.idle()
        await deletes_done(b)
        for table in ("snapshots", "snapshot_chunks", "chunks"):
            assert a.md.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0
        assert shadow_files(store) == []
        report = await fsck(a)
        assert report.ok, report.problems
    assert "storing its chunks failed" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def test_an_open_does_not_wait_for_the_index_lock_without_dead_work(
        store_dir: Path) -> None:
    """A CLI command beside a mount releasing a huge map (which holds the index lock
    for seconds) opens at once: only the recovery of dead processes' work needs it."""
    async with open_local_service(store_dir) as a:
        await a.index_lock.acquire()
        try:
            with trio.fail_after(5):
                async with open_local_service(store_dir, resume=False) as b:
                    assert [p.name for p in await b.list_projects()] == ["default"]
        finally:
            a.index_lock.release()
