"""Reflink shadows (snapfs/local/shadows.py): on XFS and btrfs a capture reads a clone of the
volume, and the next one reads only the chunks whose extents differ between the
previous clone and its own -- whoever wrote them and however."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import random
import re
import sqlite3
import subprocess
import sys
import textwrap
from contextlib import closing
from pathlib import Path

import pytest
import trio

from fixtures_store import (MiB, ZONE, all_tokens_held, bytes_read, chunks_stored, deletes_done,
                            kill_mid_way, proc_io, random_bytes, read_all, shadow_files,
                            snapfs_cli, snapshot_of, tasks_waiting, wait_state, write_elsewhere,
                            write_volume)
from snapfs.local import LocalService, jobs, open_local_service
from snapfs.errors import NoMoreData
from snapfs.fs.allocation import seek
from snapfs.local.image import WINDOW, ShadowReader
from snapfs.local.shadows import (FIEMAP_EXTENT_UNWRITTEN, Extent, changed_chunks, complement,
                                  in_ranges)
from snapfs.model import Snapshot
from snapfs.service import ImageReader

C = 1 << 20  # chunk size in the pure tests
SIZE = 32 * MiB
DELALLOC = 0x4


# --- the comparison, without a filesystem ------------------------------------------

def test_identical_extents_change_nothing() -> None:
    ext = [Extent(0, 100 * C, 3 * C, 0), Extent(5 * C, 900 * C, 2 * C, 0)]
    assert changed_chunks(ext, list(ext), 8 * C, C) == []


def test_a_remapped_block_changes_exactly_its_chunks() -> None:
    old = [Extent(0, 100 * C, 8 * C, 0)]
    # A 4 KiB copy-on-write inside chunk 5: the new file's extent is split around it.
    new = [Extent(0, 100 * C, 5 * C + 8192, 0), Extent(5 * C + 8192, 7, 4096, 0),
           Extent(5 * C + 12288, 105 * C + 12288, 3 * C - 12288, 0)]
    assert changed_chunks(old, new, 8 * C, C) == [(5, 5)]
    # Across a chunk boundary: both chunks.
    new = [Extent(0, 100 * C, 2 * C - 4096, 0), Extent(2 * C - 4096, 7, 8192, 0),
           Extent(2 * C + 4096, 102 * C + 4096, 6 * C - 4096, 0)]
    assert changed_chunks(old, new, 8 * C, C) == [(1, 2)]


def test_holes_compare_as_holes() -> None:
    old = [Extent(2 * C, 100 * C, C, 0)]
    assert changed_chunks(old, list(old), 4 * C, C) == []  # holes in both: unchanged
    assert changed_chunks(old, [], 4 * C, C) == [(2, 2)]  # punched
    assert changed_chunks([], old, 4 * C, C) == [(2, 2)]  # written into a hole
    # The same place, once unwritten (reads as zeros) and once written: changed.
    unwritten = [Extent(2 * C, 100 * C, C, FIEMAP_EXTENT_UNWRITTEN)]
    assert changed_chunks(unwritten, old, 4 * C, C) == [(2, 2)]


def test_extents_without_a_stable_place_are_never_trusted() -> None:
    old = [Extent(0, 100 * C, 2 * C, 0)]
    new = [Extent(0, 100 * C, C, 0), Extent(C, 101 * C, C, DELALLOC)]
    assert changed_chunks(old, new, 2 * C, C) == [(1, 1)]


def test_a_partial_last_chunk_and_extents_past_the_size() -> None:
    old = [Extent(0, 100 * C, 3 * C, 0)]
    new = [Extent(0, 100 * C, 2 * C + 4096, 0), Extent(2 * C + 4096, 9, C, 0)]
    assert changed_chunks(old, new, 2 * C + 4096, C) == []  # the rest is past the size
    assert changed_chunks(old, new, 2 * C + 8192, C) == [(2, 2)]


def test_ranges_helpers() -> None:
    assert complement([(2, 3), (7, 7)], 10) == [(0, 1), (4, 6), (8, 9)]
    assert complement([], 3) == [(0, 2)] and complement([(0, 2)], 3) == []
    ranges = [(2, 3), (7, 7)]
    assert [in_ranges(ranges, i) for i in (0, 2, 3, 4, 7, 8)] == [2, 2, 3, 7, 7, None]


# --- on a real XFS filesystem --------------------------------------------------------

def shadows(store: Path) -> list[str]:
    """Shadow file names (<key>.<snapshot id>.<boot id>) in the store."""
    return [p.name for p in shadow_files(store)]


def changed_logged(caplog: pytest.LogCaptureFixture, snapshot_id: str) -> tuple[int, int]:
    for r in caplog.records:
        m = re.search(r"(\d+) of (\d+) chunks changed", r.getMessage())
        if m and snapshot_id in r.getMessage():
            return int(m[1]), int(m[2])
    raise AssertionError(f"no incremental capture logged for {snapshot_id}")


async def stored_snapshot(svc: LocalService, path: Path, name: str) -> Snapshot:
    """A snapshot whose chunks are stored, not only available from its shadow."""
    snap = await snapshot_of(svc, path, name)
    await chunks_stored(svc)
    assert svc.md.shadow_of(snap.id) is None
    return snap


@pytest.fixture
def volume(reflink_dir: Path) -> Path:
    return write_volume(reflink_dir / "v.raw", SIZE, [(0, random_bytes(SIZE - 4 * MiB, seed=1))])


async def test_the_next_capture_reads_only_what_changed_even_after_a_restart(
        reflink_dir: Path, volume: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="snapfs.local")
    original = volume.read_bytes()
    async with open_local_service(reflink_dir / "store") as svc:
        first = await stored_snapshot(svc, volume, "first")
    [one] = shadows(reflink_dir / "store")
    assert first.id in one
    write_elsewhere(volume, 10 * MiB + 123, b"x" * 5000)
    async with open_local_service(reflink_dir / "store") as svc:  # leases died with the process
        before = bytes_read()
        second = await stored_snapshot(svc, volume, "second")
        assert bytes_read() - before < 4 * MiB  # one chunk, not 32
        assert changed_logged(caplog, second.id) == (1, SIZE // MiB)
        assert await read_all(svc, second.id) == volume.read_bytes()
        assert await read_all(svc, first.id) == original
        # Window digests written when the chunks were stored (mapdigest.py).
        digested = {k for (k,) in svc.md.conn.execute("SELECT snap FROM map_digests")}
        assert {svc.md.snap_key(first.id), svc.md.snap_key(second.id)} <= digested
        assert [(s // MiB, d) for s, _, d in
                await svc.changed_extents(ZONE, second.id, first.id)] == [(10, True)]
    [two] = shadows(reflink_dir / "store")
    assert second.id in two


WRITERS = {
    # A shared mapping: no write(2) at all, only dirtied pages.
    "mmap": """
import mmap, sys
with open(sys.argv[1], "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
    m[int(sys.argv[2]):int(sys.argv[2]) + 4096] = b"m" * 4096
    m.flush()
""",
    # O_DIRECT writes that bypass the page cache.
    "direct": """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 4096); buf.write(b"d" * 4096)
os.pwrite(fd, buf, int(sys.argv[2])); os.close(fd)
""",
}


@pytest.mark.parametrize("writer", ["mmap", "direct", "loop device"])
async def test_every_kind_of_writer_is_seen(reflink_dir: Path, volume: Path, writer: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="snapfs.local")
    at = 20 * MiB + 8192
    async with open_local_service(reflink_dir / "store") as svc:
        await stored_snapshot(svc, volume, "first")
        if writer == "loop device":
            loop = subprocess.run(["losetup", "--find", "--show", str(volume)], check=True,
                                  capture_output=True, text=True).stdout.strip()
            try:
                subprocess.run(["dd", f"of={loop}", "bs=4096", f"seek={at // 4096}",
                                "oflag=direct", "conv=notrunc", "status=none"],
                               input=b"L" * 4096, check=True)
            finally:
                subprocess.run(["losetup", "-d", loop], check=True)
        else:
            subprocess.run([sys.executable, "-c", WRITERS[writer], str(volume), str(at)],
                           check=True)
        second = await stored_snapshot(svc, volume, "second")
        # Copy on write may give a whole new extent around the write (XFS gave
        # mmap writes 2 MiB here): those chunks are read too.
        changed, total = changed_logged(caplog, second.id)
        assert 1 <= changed <= 4 and total == SIZE // MiB
        data = await read_all(svc, second.id)
        assert data == volume.read_bytes()
        assert data[at:at + 4096] in (b"m" * 4096, b"d" * 4096, b"L" * 4096)


async def test_no_usable_base_means_a_full_capture(
        reflink_dir: Path, volume: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="snapfs.local")
    store = reflink_dir / "store"
    async with open_local_service(store) as svc:
        first = await stored_snapshot(svc, volume, "first")
        await svc.delete_snapshot(ZONE, first.id)
        assert shadows(store) == []  # it pinned blocks the volume may rewrite
        write_elsewhere(volume, 0, b"y" * 4096)
        second = await stored_snapshot(svc, volume, "second")
        with pytest.raises(AssertionError):
            changed_logged(caplog, second.id)
        assert await read_all(svc, second.id) == volume.read_bytes()
        # A grown volume: another size, read in full too. (truncate(1) opens with
        # O_NONBLOCK: a read lease would make it fail once; shadows need none.)
        r = subprocess.run(["truncate", "-s", str(SIZE + MiB), str(volume)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        vol = (await svc.list_all_volumes())[0]
        third = await svc.create_snapshot(ZONE, name="third", volume_id=vol.id)
        assert (await wait_state(svc, third.id)).state == "available"
        await chunks_stored(svc)
        with pytest.raises(AssertionError):
            changed_logged(caplog, third.id)
        assert (await svc.get_snapshot(ZONE, third.id)).size == SIZE + MiB
        assert await read_all(svc, third.id) == volume.read_bytes()
        await svc.remove_volume(vol.id)
    assert shadows(store) == []


async def test_a_shadow_of_another_boot_is_not_trusted(
        reflink_dir: Path, volume: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="snapfs.local")
    store = reflink_dir / "store"
    async with open_local_service(store) as svc:
        await stored_snapshot(svc, volume, "first")
    [name] = shadows(store)
    [path] = (store / "shadows").rglob(name)
    path.rename(path.with_name(name.rsplit(".", 1)[0] + ".0123456789abcdef"))
    write_elsewhere(volume, 0, b"z" * 4096)
    async with open_local_service(store) as svc:
        assert shadows(store) == []  # an exclusive open tidies it away
        second = await stored_snapshot(svc, volume, "second")
        with pytest.raises(AssertionError):
            changed_logged(caplog, second.id)
        assert await read_all(svc, second.id) == volume.read_bytes()


async def test_a_volume_on_another_filesystem_is_read_as_before(
        reflink_dir: Path, tmp_path: Path) -> None:
    vol = write_volume(tmp_path / "ext4.raw", 8 * MiB, [(0, random_bytes(MiB, seed=5))])
    async with open_local_service(reflink_dir / "store") as svc:
        snap = await stored_snapshot(svc, vol, "first")
        assert await read_all(svc, snap.id) == vol.read_bytes()
    assert shadows(reflink_dir / "store") == []


KILLED = textwrap.dedent("""
    import os, sys, trio
    from snapfs.local import open_local_service

    async def main():
        async with open_local_service(sys.argv[1]) as svc:
            vol = await svc.add_volume("v", sys.argv[2])
            base = await svc.create_snapshot("fr-par-1", name="base", volume_id=vol.id)
            while (await svc.get_snapshot("fr-par-1", base.id)).state != "available" \
                    or svc.storing():
                await trio.sleep(0.01)
            with open(sys.argv[2], "r+b") as f:  # every chunk changes: a long capture
                f.write(os.urandom(int(sys.argv[3])))
            await svc.create_snapshot("fr-par-1", name="doomed", volume_id=vol.id)
            print("started", flush=True)
            await trio.sleep_forever()
    trio.run(main)
""")


def partial_map(store: Path, name: str) -> int:
    """How many map entries snapshot ``name`` has (read beside any snapfs process)."""
    with closing(sqlite3.connect(store / "metadata.db")) as db:
        return int(db.execute("SELECT count(*) FROM snapshot_chunks WHERE snap = "
                              "(SELECT rowid FROM snapshots WHERE name = ?)",
                              (name,)).fetchone()[0])


def test_storing_killed_mid_way_is_resumed_and_the_base_is_intact(
        reflink_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="snapfs.local")
    size = 384 * MiB
    original = random_bytes(size, seed=6)
    path = write_volume(reflink_dir / "big.raw", size, [(0, original)])
    store = reflink_dir / "store"
    progress = kill_mid_way(KILLED, store, path, size)
    assert 10 <= progress < 100, progress
    assert len(shadows(store)) == 2  # the base's and the killed capture's
    # A short-lived command leaves the storing to the next long-lived open: it
    # would release what was stored, begin again, and be stopped at its exit.
    stored = partial_map(store, "doomed")
    assert stored > 0
    checked = snapfs_cli("fsck", store=store)  # reads every stored chunk: a while
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert partial_map(store, "doomed") == stored

    async def after() -> None:
        async with open_local_service(store) as svc:
            [base] = (await svc.list_snapshots(ZONE, name="base")).items
            [doomed] = (await svc.list_snapshots(ZONE, name="doomed")).items
            assert doomed.state == "available"  # its clone is its data meanwhile
            assert await read_all(svc, doomed.id) == path.read_bytes()
            await chunks_stored(svc)
            assert await read_all(svc, base.id) == original
            assert await read_all(svc, doomed.id) == path.read_bytes()
            [kept] = shadows(store)
            assert doomed.id in kept
            write_elsewhere(path, 5 * MiB, b"k" * 4096)
            again = await stored_snapshot(svc, path, "again")
            assert changed_logged(caplog, again.id)[1] == size // MiB
            assert await read_all(svc, again.id) == path.read_bytes()
    trio.run(after)
    assert snapfs_cli("fsck", store=store).returncode == 0


async def test_a_snapshot_is_available_from_its_clone_before_its_chunks_are_stored(
        reflink_dir: Path, volume: Path) -> None:
    """As `zfs snapshot` is: once Create returns, the snapshot is available, of
    that instant, and durable (its clone fsynced, its row committed)."""
    store = reflink_dir / "store"
    original = volume.read_bytes()
    async with open_local_service(store) as svc:
        vol = await svc.add_volume("v", volume)
        async with svc.index_lock:  # storing needs it: held, the snapshot stays on its clone
            snap = await svc.create_snapshot(ZONE, name="first", volume_id=vol.id)
            assert snap.state == "available" and snap.progress == 0
            assert svc.storing() and svc.md.shadow_of(snap.id) is not None
            write_elsewhere(volume, 0, random_bytes(SIZE, seed=11))  # the volume moves on
            assert await read_all(svc, snap.id) == original
        await chunks_stored(svc)
        assert svc.md.shadow_of(snap.id) is None
        assert await read_all(svc, snap.id) == original
    assert snapfs_cli("fsck", store=store).returncode == 0


async def test_reads_from_a_clone_in_any_pattern(reflink_dir: Path, volume: Path) -> None:
    """ShadowReader reads windows and reads ahead of a sequential reader: every
    pattern gets the right bytes, and a close with read-ahead in flight is clean."""
    original = volume.read_bytes()
    size = len(original)
    async with open_local_service(reflink_dir / "store") as svc:
        vol = await svc.add_volume("v", volume)
        async with svc.index_lock:  # storing waits: every read is from the clone
            snap = await svc.create_snapshot(ZONE, name="s", volume_id=vol.id)
            reader = await svc.open_image(ZONE, snap.id)
            assert isinstance(reader, ShadowReader)
            step = 128 * 1024  # as FUSE asks
            got = b"".join([await reader.read(off, step) for off in range(0, size, step)])
            assert got == original
            rng = random.Random(5)
            for _ in range(200):
                off = rng.randrange(size)
                n = rng.choice([1, 4096, step, WINDOW - 1, WINDOW, WINDOW + 3, 3 * WINDOW])
                assert await reader.read(off, n) == original[off:off + n], (off, n)
            assert await reader.read(WINDOW - 10, 20) == original[WINDOW - 10:WINDOW + 10]
            assert await reader.read(size - 5, 100) == original[-5:]
            assert await reader.read(size, 100) == b""
            await reader.aclose()
            reader = await svc.open_image(ZONE, snap.id)
            assert isinstance(reader, ShadowReader)
            await reader.read(0, step)  # sequential: windows 1 and 2 are read ahead
            async with trio.open_nursery() as n:
                with all_tokens_held(svc.io_limiter):  # before the read-ahead tasks first run
                    await tasks_waiting(svc.io_limiter, 2)
                    assert reader.ra.in_flight() == [WINDOW, 2 * WINDOW]
                    n.start_soon(reader.aclose)  # waits for them before closing the descriptor
                    await trio.sleep(0.05)
                    assert reader.ra.in_flight()
            assert not reader.ra.in_flight() and not reader.ra.cached_windows()
        await chunks_stored(svc)


async def test_a_clone_that_fails_means_a_capture_of_the_volume_without_a_lease(
        reflink_dir: Path, volume: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = reflink_dir / "store"
    async with open_local_service(store) as svc:
        vol = await svc.add_volume("v", volume)
        blocker = store / "shadows" / vol.id  # a file where the clone's directory goes
        blocker.parent.mkdir()
        blocker.touch()
        snap = await svc.create_snapshot(ZONE, name="read", volume_id=vol.id)
        assert snap.state == "snapshotting"  # no clone: the capture reads the volume
        assert (await wait_state(svc, snap.id)).state == "available"
        assert not svc.storing() and svc._leases._by_volume == {}
        assert "cannot clone volume" in caplog.text
        assert svc.md.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again
        blocker.unlink()
        assert await read_all(svc, snap.id) == volume.read_bytes()
    assert snapfs_cli("fsck", store=store).returncode == 0


async def test_storing_that_fails_is_tried_again_while_the_service_runs(
        reflink_dir: Path, volume: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger="snapfs.local")
    monkeypatch.setattr(jobs, "STORE_RETRY_FIRST", 0.2)
    store = reflink_dir / "store"
    original = volume.read_bytes()
    async with open_local_service(store) as svc:
        packs = store / "packs"
        subprocess.run(["chattr", "+i", str(packs)], check=True)  # no pack can be made
        try:
            vol = await svc.add_volume("v", volume)
            snap = await svc.create_snapshot(ZONE, name="first", volume_id=vol.id)
            with trio.fail_after(30):
                while caplog.text.count("storing its chunks failed") < 2:
                    await trio.sleep(0.05)
            assert (await svc.get_snapshot(ZONE, snap.id)).state == "available"
            assert svc.storing() and list(packs.iterdir()) == []
            assert await read_all(svc, snap.id) == original  # from its clone meanwhile
        finally:
            subprocess.run(["chattr", "-i", str(packs)], check=True)
        await chunks_stored(svc)  # the next try, within the service's life
        assert svc.md.shadow_of(snap.id) is None
        assert await read_all(svc, snap.id) == original
    assert snapfs_cli("fsck", store=store).returncode == 0


async def test_storing_cut_short_by_a_close_is_resumed_at_the_next_open(
        reflink_dir: Path, volume: Path) -> None:
    store = reflink_dir / "store"
    original = volume.read_bytes()
    async with open_local_service(store) as svc:
        await svc.index_lock.acquire()  # never released: the close finds both unstored
        a = await snapshot_of(svc, volume, "a")
        write_elsewhere(volume, 0, b"a" * 4096)
        b = await snapshot_of(svc, volume, "b")
        assert svc.md.shadow_of(a.id) and svc.md.shadow_of(b.id)
    expected_b = volume.read_bytes()
    write_elsewhere(volume, 0, b"c" * 4096)
    async with open_local_service(store) as svc:
        assert len(shadows(store)) == 2  # both are snapshots' data: the open keeps them
        await chunks_stored(svc)
        assert await read_all(svc, a.id) == original
        assert await read_all(svc, b.id) == expected_b
    assert snapfs_cli("fsck", store=store).returncode == 0


async def test_a_snapshot_deleted_before_its_chunks_are_stored(
        reflink_dir: Path, volume: Path) -> None:
    store = reflink_dir / "store"
    async with open_local_service(store) as svc:
        await svc.index_lock.acquire()
        snap = await snapshot_of(svc, volume, "first")
        await svc.delete_snapshot(ZONE, snap.id)
        assert shadows(store) == []
        svc.index_lock.release()
        await deletes_done(svc)
        assert not svc.storing()
    assert snapfs_cli("fsck", store=store).returncode == 0


async def test_map_copy_and_capture_of_a_sparse_volume(
        reflink_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Holes stay holes: chunks punched or written into holes since the last clone."""
    caplog.set_level(logging.INFO, logger="snapfs.local")
    path = write_volume(reflink_dir / "sparse.raw", 64 * MiB,
                        [(0, random_bytes(2 * MiB, seed=7)), (40 * MiB, random_bytes(MiB))])
    async with open_local_service(reflink_dir / "store") as svc:
        await stored_snapshot(svc, path, "first")
        with open(path, "r+b") as f:
            fd = f.fileno()
            os.pwrite(fd, b"h" * 4096, 20 * MiB)  # into a hole
            FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
            libc = ctypes.CDLL(None, use_errno=True)
            assert libc.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
                                  ctypes.c_long(40 * MiB), ctypes.c_long(MiB)) == 0
        second = await stored_snapshot(svc, path, "second")
        assert changed_logged(caplog, second.id) == (2, 64)
        data = await read_all(svc, second.id)
        assert data == path.read_bytes()
        assert data[40 * MiB:41 * MiB] == bytes(MiB)


async def test_new_chunks_are_cloned_into_packs_not_written(
        reflink_dir: Path, volume: Path) -> None:
    store = reflink_dir / "store"
    original = volume.read_bytes()
    async with open_local_service(store) as svc:
        before = proc_io("wchar")
        first = await stored_snapshot(svc, volume, "first")
        assert proc_io("wchar") - before < SIZE // 4  # metadata only: 28 MiB were cloned
        # Every byte of the volume rewritten: the packs keep the old blocks.
        write_elsewhere(volume, 0, random_bytes(SIZE, seed=8))
        assert await read_all(svc, first.id) == original
    assert snapfs_cli("fsck", store=store).returncode == 0  # every chunk against its hash


async def test_fsck_reports_a_lost_clone_of_an_unstored_snapshot(
        reflink_dir: Path, volume: Path) -> None:
    store = reflink_dir / "store"
    async with open_local_service(store) as svc:
        await svc.index_lock.acquire()  # never released: the snapshot stays on its clone
        snap = await snapshot_of(svc, volume, "first")
    [name] = shadows(store)
    next((store / "shadows").rglob(name)).unlink()  # as a careless cleanup would
    r = snapfs_cli("fsck", store=store)
    assert r.returncode != 0 and snap.id in r.stdout + r.stderr


async def test_removing_the_volume_keeps_the_clone_of_an_unstored_snapshot(
        reflink_dir: Path, volume: Path) -> None:
    """Snapshots outlive their volume: one not stored yet still needs its clone."""
    store = reflink_dir / "store"
    original = volume.read_bytes()
    async with open_local_service(store) as svc:
        await svc.index_lock.acquire()
        snap = await snapshot_of(svc, volume, "first")
        await svc.remove_volume("v")
        volume.unlink()
        assert len(shadows(store)) == 1
        assert await read_all(svc, snap.id) == original
        svc.index_lock.release()
        await chunks_stored(svc)
        assert await read_all(svc, snap.id) == original
    assert snapfs_cli("fsck", store=store).returncode == 0


async def test_a_clone_still_in_the_making_is_never_dropped(
        reflink_dir: Path, volume: Path) -> None:
    """Another snapshot of the volume stored meanwhile drops the earlier clones, but
    not one whose snapshot is still being captured (its clone may be in the making)."""
    store = reflink_dir / "store"
    async with open_local_service(store) as svc:
        first = await stored_snapshot(svc, volume, "first")
        svc.md.conn.execute("UPDATE snapshots SET state = 'snapshotting' WHERE id = ?",
                            (first.id,))  # as a capture between its clone and its commit
        write_elsewhere(volume, 0, b"w" * 4096)
        second = await stored_snapshot(svc, volume, "second")
        assert [first.id in n for n in shadows(store)].count(True) == 1
        svc.md.conn.execute("UPDATE snapshots SET state = 'available' WHERE id = ?",
                            (first.id,))
        write_elsewhere(volume, 0, b"x" * 4096)
        await stored_snapshot(svc, volume, "third")
        assert not any(first.id in n or second.id in n for n in shadows(store))


async def test_seek_data_and_hole_from_the_clone_then_from_the_map(
        reflink_dir: Path) -> None:
    """lseek's SEEK_DATA/SEEK_HOLE of a snapshot still read from its clone are the
    clone's own (its filesystem's 4 KiB extents: the volume's); once its chunks
    are stored, the map's whole chunks: holes may turn into data, data never into
    holes. At and past the end, and before the start: NoMoreData (ENXIO)."""
    size = 8 * MiB + 4096
    runs = [(0, random_bytes(4096, seed=30)), (MiB + 8192, random_bytes(4096, seed=31)),
            (3 * MiB, random_bytes(2 * MiB, seed=32)), (8 * MiB, random_bytes(4096, seed=33))]
    path = write_volume(reflink_dir / "v.raw", size, runs)
    data = [(off, off + len(raw)) for off, raw in runs]
    offsets = sorted({o + d for o in range(0, size, 4096) for d in (0, 1)} | {size - 1})
    ENXIO = -1

    async def answers(reader: ImageReader) -> list[tuple[int, int]]:
        out = []
        for off in offsets:
            got = []
            for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                try:
                    got.append(await seek(off, whence, size, reader.next_allocated,
                                          reader.next_hole))
                except NoMoreData:
                    got.append(ENXIO)
            out.append((got[0], got[1]))
        return out

    def volume_answers() -> list[tuple[int, int]]:
        fd = os.open(path, os.O_RDONLY)
        try:
            out = []
            for off in offsets:
                try:
                    d = os.lseek(fd, off, os.SEEK_DATA)
                except OSError as exc:
                    assert exc.errno == errno.ENXIO
                    d = ENXIO
                out.append((d, os.lseek(fd, off, os.SEEK_HOLE)))
            return out
        finally:
            os.close(fd)

    # The map: a chunk with any data is mapped, the others are holes.
    mapped = {c for a, b in data for c in range(a // MiB, (b - 1) // MiB + 1)}
    chunks = -(-size // MiB)

    def map_answer(off: int) -> tuple[int, int]:
        c = off // MiB
        d = off if c in mapped else next((i * MiB for i in range(c, chunks) if i in mapped),
                                         ENXIO)
        h = off if c not in mapped else min(size, next(
            (i * MiB for i in range(c, chunks) if i not in mapped), size))
        return d, h

    async with open_local_service(reflink_dir / "store") as svc:
        vol = await svc.add_volume("v", path)
        async with svc.index_lock:  # storing waits: the reader is the clone's
            snap = await svc.create_snapshot(ZONE, name="s", volume_id=vol.id)
            reader = await svc.open_image(ZONE, snap.id)
            assert isinstance(reader, ShadowReader)
            assert await answers(reader) == volume_answers()
            for bad in (size, size + 1, -1, 2**63 - 1):
                for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                    with pytest.raises(NoMoreData):
                        await seek(bad, whence, size, reader.next_allocated, reader.next_hole)
            await reader.aclose()
        await chunks_stored(svc)
        reader = await svc.open_image(ZONE, snap.id)
        assert not isinstance(reader, ShadowReader)
        got = await answers(reader)
        assert got == [map_answer(off) for off in offsets]
        for off, (d, h) in zip(offsets, got):  # never data called a hole
            assert not any(a < (size if d == ENXIO else d) and b > off for a, b in data
                           if d != off), (off, d)
            assert not any(a <= h < b for a, b in data), (off, h)
        await reader.aclose()
