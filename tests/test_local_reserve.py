"""The store's space reserve (snapfs/local/reserve.py): what it holds on a disk
short of room, how it is given up, and the files it never touches."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import trio

from fixtures_store import (ZONE, all_tokens_held, deletes_done, fill_up, loop_mounted,
                            random_bytes, snapshot_of, tasks_waiting, wait_state, write_volume)
from fixtures_s3 import SeaweedServer
from snapfs.errors import NotFound, PreconditionFailed
from snapfs.local import LocalService, open_local_service
from snapfs.local.reserve import RESERVE_BYTES, STEP, SpaceReserve

MiB = 1 << 20


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs (less than a whole reserve); always unmounted."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6M,mode=0700", "none", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def held(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_a_disk_short_of_room_keeps_part_of_a_reserve_and_gives_it_in_steps(
        tiny_fs: Path) -> None:
    """A disk without 8 MiB free kept no reserve at all (what it had was cut to 0),
    and a delete gave up all of it at once, for a writer beside it to take."""
    reserve = SpaceReserve(tiny_fs)
    assert reserve.ensure() is False  # 6 MiB of room: whole steps that fit
    got = held(tiny_fs / "reserve")
    assert 4 * MiB <= got < RESERVE_BYTES and got % STEP == 0
    steps = 0
    while reserve.give_up():
        steps += 1
        assert held(tiny_fs / "reserve") == max(0, got - steps * STEP)
    assert steps == got // STEP and held(tiny_fs / "reserve") == 0
    assert reserve.give_up() is False
    (tiny_fs / "other").write_bytes(bytes(5 * MiB))  # a writer took most of it
    assert reserve.ensure() is False and held(tiny_fs / "reserve") <= MiB
    (tiny_fs / "other").unlink()
    assert reserve.ensure() is False and held(tiny_fs / "reserve") == got


def test_a_whole_reserve_where_there_is_room(tmp_path: Path) -> None:
    reserve = SpaceReserve(tmp_path)
    assert reserve.ensure() is True and held(tmp_path / "reserve") >= RESERVE_BYTES
    assert oct((tmp_path / "reserve").stat().st_mode & 0o777) == "0o600"
    assert reserve.give_up() is True
    assert (tmp_path / "reserve").stat().st_size == RESERVE_BYTES - STEP
    assert reserve.ensure() is True and held(tmp_path / "reserve") >= RESERVE_BYTES


@pytest.mark.parametrize("planted", ["hard link", "symlink", "directory", "fifo"])
def test_what_is_not_the_reserves_own_is_never_touched(tmp_path: Path, planted: str,
                                                       caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    """A hard link named `reserve` had the user's other file extended to 8 MiB of
    zeros, or cut to 0 bytes on a full disk; a directory made a delete on a full
    disk fail unexpectedly (IsADirectoryError) instead of ENOSPC."""
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious config\n")
    victim.chmod(0o644)
    name = store / "reserve"
    if planted == "hard link":
        os.link(victim, name)
    elif planted == "symlink":
        name.symlink_to(victim)
    elif planted == "directory":
        name.mkdir()
    else:
        os.mkfifo(name)
    reserve = SpaceReserve(store)
    assert reserve.ensure() is False
    assert reserve.give_up() is False
    assert reserve.ensure() is False
    assert victim.read_bytes() == b"precious config\n"
    assert victim.stat().st_mode & 0o777 == 0o644
    said = [r.getMessage() for r in caplog.records if "no space reserve" in r.getMessage()]
    assert len(said) == 1, said  # once, not every top-up


@pytest.fixture
def small_ext4(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB ext4 filesystem on a loop device (no reserved blocks)."""
    with loop_mounted(tmp_path, 64 * MiB, ["mkfs.ext4", "-q", "-F", "-m", "0"]) as mnt:
        yield mnt


async def test_a_delete_whose_space_cannot_be_freed_yet_is_tried_again(
        small_ext4: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The reserve given to a delete was taken by a writer beside it before the
    delete's background half ran: that half failed (StoreFull), the job ended,
    and the snapshot's space stayed taken until the next open. It waits and
    tries again; once there is room the space is freed and the reserve made."""
    store = small_ext4 / "store"
    vol = write_volume(tmp_path / "v.raw", 8 * MiB, [(0, random_bytes(8 * MiB, seed=3))])
    async with open_local_service(store) as svc:
        assert held(store / "reserve") >= RESERVE_BYTES
        snap = await snapshot_of(svc, vol, "s")
        packs_before = sum(held(p) for p in (store / "packs").iterdir())
        fillers = [fill_up(small_ext4, "filler0")]
        async with svc.index_lock:  # the delete's background half waits for it
            await svc.delete_snapshot(ZONE, snap.id)  # the reserve's first step
            while svc.reserve.give_up():  # ... the rest taken by a writer beside it
                fillers.append(fill_up(small_ext4, f"filler{len(fillers)}"))
        with trio.fail_after(30):
            while "cannot be freed yet" not in caplog.text:
                await trio.sleep(0.05)
        assert svc.freeing()
        for f in fillers:
            f.unlink()
        await deletes_done(svc, timeout=30)
        assert sum(held(p) for p in (store / "packs").iterdir()) <= packs_before - 7 * MiB
        with trio.fail_after(30):  # topped up once the release is done (its finally)
            while held(store / "reserve") < RESERVE_BYTES:
                await trio.sleep(0.05)
        with pytest.raises(NotFound):
            await svc.get_snapshot(ZONE, snap.id)


def full_to_the_last_block(svc: LocalService, fs: Path) -> list[Path]:
    """``fs`` filled, the service's reserve given up and taken too (by a writer
    beside it): the files taking the room."""
    fillers = [fill_up(fs, "filler0")]
    while svc.reserve.give_up():
        fillers.append(fill_up(fs, f"filler{len(fillers)}"))
    return fillers


async def said(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 60) -> None:
    with trio.fail_after(timeout):
        while text not in caplog.text:
            await trio.sleep(0.05)


async def test_a_capture_that_fills_the_disk_records_its_failure_once_there_is_room(
        small_ext4: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The capture failed on a disk full to the last block (its reserve taken by
    a writer beside it), and so did the record of that failure: the job ended
    with a traceback and the snapshot stayed ``snapshotting`` for the process's
    life, its volume not removable. The record is tried again until there is room."""
    store = small_ext4 / "store"
    vol = write_volume(tmp_path / "v.raw", 48 * MiB, [(0, random_bytes(48 * MiB, seed=4))])
    async with open_local_service(store) as svc:
        v = await svc.add_volume("v", vol)
        with all_tokens_held(svc.hash_limiter):  # the capture waits before its first chunk
            snap = await svc.create_snapshot(ZONE, name="s", volume_id=v.id)
            await tasks_waiting(svc.hash_limiter)
            fillers = full_to_the_last_block(svc, small_ext4)
        await said(caplog, "its failure cannot be recorded yet")
        assert svc.md.live_state(snap.id) == "snapshotting"
        with pytest.raises(PreconditionFailed):  # and nothing changed
            await svc.remove_volume(v.id)
        assert [x.id for x in await svc.list_all_volumes()] == [v.id]
        for f in fillers:
            f.unlink()
        failed = await wait_state(svc, snap.id)
        assert failed.state == "error" and "full" in (failed.error_reason or "")
        await deletes_done(svc, timeout=30)
        assert "Traceback" not in caplog.text and \
            not [r for r in caplog.records if r.exc_info], caplog.text
        await svc.remove_volume(v.id)
        with trio.fail_after(30):  # topped up once the release is done
            while held(store / "reserve") < RESERVE_BYTES:
                await trio.sleep(0.05)
    # What the failed capture wrote was given back: only the store's own files.
    packs = sum(held(p) for p in (store / "packs").iterdir())
    assert packs < 4 * MiB, packs


async def test_an_export_whose_end_finds_the_disk_full_records_it_once_there_is_room(
        small_ext4: Path, tmp_path: Path, s3_server: SeaweedServer, bucket: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """The store's disk filled (its reserve taken) during an export: the upload
    succeeded, but its progress commits failed the export as "the store is
    full", and its end could not be recorded: a traceback, the task left
    ``started`` and the snapshot ``exporting`` -- not deletable -- for the
    process's life. Progress waits for room; the end is recorded once there is."""
    store = small_ext4 / "store"
    vol = write_volume(tmp_path / "v.raw", 24 * MiB, [(0, random_bytes(24 * MiB, seed=5))])
    async with open_local_service(store, objects=s3_server.objects()) as svc:
        snap = await snapshot_of(svc, vol, "s")
        with all_tokens_held(svc.io_limiter):  # the export waits before its first read
            task = await svc.export_snapshot(ZONE, snap.id, bucket=bucket, key="s.qcow2")
            await tasks_waiting(svc.io_limiter)
            fillers = full_to_the_last_block(svc, small_ext4)
        await said(caplog, "its end cannot be recorded yet")
        assert (await svc.get_snapshot(ZONE, snap.id)).state == "exporting"
        with pytest.raises(PreconditionFailed):
            await svc.delete_snapshot(ZONE, snap.id)
        for f in fillers:
            f.unlink()
        with trio.fail_after(60):
            while (await svc.get_snapshot(ZONE, snap.id)).state == "exporting":
                await trio.sleep(0.05)
        done = await svc.get_task(ZONE, task.id)
        assert (done.status, done.progress, done.error) == ("success", 100, None), done
        assert not [r for r in caplog.records if r.exc_info], caplog.text
        head = s3_server.client().head_object(Bucket=bucket, Key="s.qcow2")
        assert head["ContentLength"] > 24 * MiB
        await svc.delete_snapshot(ZONE, snap.id)
        await deletes_done(svc, timeout=30)
