"""Snapshots of a volume nobody opened for writing since the last one reuse its map
(read leases, snapfs/local/leases.py); any write open makes the next one read all."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import pytest
import trio

from fixtures_store import (MiB, ZONE, bytes_read, kill_mid_way, random_bytes, read_all,
                            snapfs_cli, snapshot_of)
from snapfs.local import LocalService, leases, open_local_service
from snapfs.local.recovery import INTERRUPTED
from snapfs.local.volumefile import VolumeFile

SIZE = 16 * MiB


@pytest.fixture
def volume(volume_file: Callable[..., Path]) -> Path:
    return volume_file("v", SIZE, [(0, random_bytes(SIZE - MiB, seed=1))])


async def test_an_untouched_volume_is_snapshotted_without_reading_it(
        service: LocalService, volume: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="snapfs.local")
    first = await snapshot_of(service, volume, "first")
    before = bytes_read()
    second = await snapshot_of(service, volume, "second")
    assert bytes_read() - before < SIZE // 4  # metadata only: the volume was not read
    assert any("map reused" in r.getMessage() and second.id in r.getMessage()
               for r in caplog.records)
    third = await snapshot_of(service, volume, "third")  # a chain: still no read
    assert await read_all(service, third.id) == await read_all(service, first.id) \
        == volume.read_bytes()
    assert (await service.get_snapshot(ZONE, second.id)).size == SIZE


@pytest.mark.parametrize("writer", ["this process", "dd", "truncate"])
async def test_any_write_open_makes_the_next_snapshot_read_the_volume(
        service: LocalService, volume: Path, writer: str) -> None:
    await snapshot_of(service, volume, "first")
    new = random_bytes(MiB, seed=2)
    t = time.monotonic()
    if writer == "this process":  # the lease holder's own thread must not wait for itself
        with open(volume, "r+b") as f:
            f.seek(5 * MiB)
            f.write(new)
    elif writer == "dd":
        subprocess.run(["dd", f"of={volume}", "bs=1M", "seek=5", "conv=notrunc", "status=none"],
                       input=new, check=True)
    else:  # truncate(2) by path, no open at all; the size stays the same
        subprocess.run([sys.executable, "-c", f"import os; os.truncate({str(volume)!r}, "
                        f"{5 * MiB}); os.truncate({str(volume)!r}, {SIZE})"], check=True)
        new = bytes(MiB)
    assert time.monotonic() - t < 5  # the lease was handed back at once, not after 45 s
    before = bytes_read()
    second = await snapshot_of(service, volume, "second")
    assert bytes_read() - before >= MiB  # read again
    data = await read_all(service, second.id)
    assert data == volume.read_bytes()
    assert data[5 * MiB:6 * MiB] == new


async def test_a_deleted_base_means_a_full_capture(service: LocalService,
                                                   volume: Path) -> None:
    first = await snapshot_of(service, volume, "first")
    await service.delete_snapshot(ZONE, first.id)
    second = await snapshot_of(service, volume, "second")
    assert await read_all(service, second.id) == volume.read_bytes()


async def test_no_lease_while_someone_has_the_volume_open_for_writing(
        service: LocalService, volume: Path) -> None:
    with open(volume, "r+b") as f:  # a VM with its disk attached, say
        await snapshot_of(service, volume, "first")
        assert await leases.take(VolumeFile("v", str(volume), None), SIZE) is None
        f.seek(0)
        f.write(b"changed")
    second = await snapshot_of(service, volume, "second")
    assert (await read_all(service, second.id))[:7] == b"changed"


async def test_a_replaced_volume_file_is_read_again(service: LocalService,
                                                    volume: Path) -> None:
    first = await snapshot_of(service, volume, "first")
    other = volume.with_name("other.raw")
    other.write_bytes(random_bytes(SIZE, seed=3))  # written elsewhere, renamed over it
    os.replace(other, volume)
    # Not the file registered (volumefile.py): refused until re-pointed on purpose.
    assert first.base_volume is not None
    refused = await service.create_snapshot(ZONE, name="refused",
                                            volume_id=first.base_volume.id)
    assert refused.state == "error" and "snapfs volume repoint" in str(refused.error_reason)
    await service.repoint_volume(first.base_volume.id, volume)
    second = await snapshot_of(service, volume, "second")
    assert await read_all(service, second.id) == volume.read_bytes()


KILLED_COPY = textwrap.dedent("""
    import sys, trio
    from snapfs.local import chunkindex, open_local_service

    chunkindex.RELEASE_STEP = 500  # many small steps: the kill lands mid-copy

    async def main():
        async with open_local_service(sys.argv[1]) as svc:
            vol = await svc.add_volume("v", sys.argv[2])
            base = await svc.create_snapshot("fr-par-1", name="base", volume_id=vol.id)
            while (await svc.get_snapshot("fr-par-1", base.id)).state != "available":
                await trio.sleep(0.01)
            # A long map: every chunk of the sparse volume mapped to its one real chunk.
            key, conn = svc.md.snap_key(base.id), svc.md.conn
            with svc.md.transaction():
                chunk = conn.execute("SELECT chunk FROM snapshot_chunks WHERE snap = ?",
                                     (key,)).fetchone()[0]
                conn.executemany("INSERT INTO snapshot_chunks (snap, idx, chunk) "
                                 "VALUES (?, ?, ?)",
                                 ((key, i, chunk) for i in range(1, int(sys.argv[3]) + 1)))
                # Grown by hand after it was complete: its window digests go (they
                # are computed again when needed), or fsck would rightly object.
                conn.execute("DELETE FROM map_digests WHERE snap = ?", (key,))
            await svc.create_snapshot("fr-par-1", name="doomed", volume_id=vol.id)
            print("started", flush=True)
            await trio.sleep_forever()
    trio.run(main)
""")


def test_a_map_copy_killed_mid_way_damages_nothing(store_dir: Path,
                                                    volume_file: Callable[..., Path]) -> None:
    entries = 50_000
    path = volume_file("v", (entries + 1) * MiB, [(0, random_bytes(MiB, seed=4))])
    progress = kill_mid_way(KILLED_COPY, store_dir, path, entries)
    assert 10 <= progress < 100, progress

    async def after() -> None:
        async with open_local_service(store_dir) as svc:
            [doomed] = (await svc.list_snapshots(ZONE, name="doomed")).items
            assert (doomed.state, doomed.error_reason) == ("error", INTERRUPTED)
            [base] = (await svc.list_snapshots(ZONE, name="base")).items
            assert svc.md.conn.execute(
                "SELECT count(*) FROM snapshot_chunks WHERE snap = ?",
                (svc.md.snap_key(base.id),)).fetchone()[0] == entries + 1
            assert svc.md.conn.execute(
                "SELECT count(*) FROM snapshot_chunks WHERE snap = ?",
                (svc.md.snap_key(doomed.id),)).fetchone()[0] == 0
            reader = await svc.open_image(ZONE, base.id)
            with open(path, "rb") as f:
                assert await reader.read(0, MiB) == f.read(MiB)
            await reader.aclose()
    trio.run(after)
    assert snapfs_cli("fsck", store=store_dir).returncode == 0
