"""The snapshot service's rules on the local backend: real SQLite, real chunk store."""

from __future__ import annotations

import errno
import logging

from pathlib import Path
from typing import Callable

import pytest
import trio

from fixtures_store import MiB, ZONE, deletes_done, random_bytes, read_all, snapshot_of, wait_state
from snapfs.errors import (InvalidArgument, NotConfigured, NotFound, PreconditionFailed,
                           TooLarge, errno_for)
from snapfs.local import LocalService, capture, open_local_service
from snapfs.local.recovery import INTERRUPTED
from snapfs.local.service import NO_OBJECT_STORAGE
from snapfs.model import ZONES, Snapshot
from snapfs.qcow2.format import MAX_VIRTUAL_SIZE
from snapfs.objects import LeftFn, ObjectStorage, ProgressFn
from snapfs.service import ImageReader


async def state_of_store(svc: LocalService) -> tuple[object, ...]:
    """Everything a refused call must leave unchanged."""
    snaps = await svc.list_snapshots(ZONE, per_page=100)
    chunks = svc.md.conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
    tasks = svc.md.conn.execute("SELECT count(*) FROM tasks").fetchone()[0]
    return (tuple(tuple(sorted((k, str(v)) for k, v in s.to_api().items()))
                  for s in snaps.items),
        snaps.total_count, chunks, tasks, len(await svc.list_all_volumes()))


async def test_defaults_exist_from_the_first_run(service: LocalService) -> None:
    projects = await service.list_projects()
    assert [p.name for p in projects] == ["default"]
    assert projects[0].organization == service.organization
    zones = await service.list_zones()
    assert zones[0] == "fr-par-1" and sorted(zones) == sorted(ZONES)


async def test_capture_reads_back_byte_identical_and_stores_no_holes(
        service: LocalService, volume_file: Callable[..., Path]) -> None:
    data = random_bytes(3 * MiB + 4096, seed=1)
    path = volume_file("vol", 64 * MiB, [(5 * MiB + 100, data), (60 * MiB, b"tail")])
    snap = await snapshot_of(service, path, tags=["b", "a"])
    assert snap.state == "available" and snap.progress == 100
    assert snap.size == 64 * MiB and snap.tags == ["b", "a"]
    assert snap.base_volume is not None and snap.base_volume.name == "vol"
    assert await read_all(service, snap.id) == path.read_bytes()
    # Only chunks holding data were stored: 4 for the random run, 1 for "tail".
    assert service.md.conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == 5


async def test_unaligned_size_and_random_access(service: LocalService,
                                                volume_file: Callable[..., Path]) -> None:
    data = random_bytes(3 * MiB + 512, seed=2)
    path = volume_file("odd", len(data), [(0, data)])
    snap = await snapshot_of(service, path)
    reader = await service.open_image(ZONE, snap.id)
    assert reader.size == len(data)
    for off, n in ((0, 1), (MiB - 3, 10), (2 * MiB + 7, MiB + 100), (len(data) - 5, 100)):
        assert await reader.read(off, n) == data[off:off + n]
    assert await reader.read(len(data), 10) == b""
    await reader.aclose()


async def test_dedup_second_snapshot_stores_only_changed_chunks(
        service: LocalService, volume_file: Callable[..., Path]) -> None:
    path = volume_file("vol", 32 * MiB, [(0, random_bytes(16 * MiB, seed=3))])
    first = await snapshot_of(service, path, "first")
    with open(path, "r+b") as f:
        f.seek(4 * MiB)
        f.write(random_bytes(2 * MiB, seed=4))
    second = await snapshot_of(service, path, "second")
    assert service.md.conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == 18
    assert await read_all(service, second.id) == path.read_bytes()
    first_bytes = await read_all(service, first.id)
    assert first_bytes[4 * MiB:6 * MiB] != path.read_bytes()[4 * MiB:6 * MiB]


async def test_progress_is_visible_while_capturing(service: LocalService,
                                                   volume_file: Callable[..., Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Commit every 16 MiB, so progress moves in many visible steps on any machine.
    monkeypatch.setattr("snapfs.local.capture.GROUP_BYTES", 16 * MiB)
    path = volume_file("big", 192 * MiB, [(0, random_bytes(192 * MiB, seed=5))])
    vol = await service.add_volume("big", path)
    snap = await service.create_snapshot(ZONE, name="s", volume_id=vol.id)
    assert snap.state == "snapshotting" and snap.progress == 0
    seen = set()
    while (cur := await service.get_snapshot(ZONE, snap.id)).state == "snapshotting":
        seen.add(cur.progress)
        await trio.sleep(0.005)
    assert cur.state == "available" and cur.progress == 100
    assert any(0 < p < 100 for p in seen), seen


async def test_list_pages_filters_and_total_count(service: LocalService,
                                                  volume_file: Callable[..., Path]) -> None:
    a = await service.add_volume("a", volume_file("a", MiB, [(0, b"a")]))
    b = await service.add_volume("b", volume_file("b", MiB, [(0, b"b")]))
    other = await service.create_project("other")
    made = []
    for i in range(7):
        vol = a if i % 2 == 0 else b
        tags = ["even"] if i % 2 == 0 else ["odd", f"n{i}"]
        kw = {"project": other.id} if i == 6 else {}
        s = await service.create_snapshot(ZONE, name=f"snap-{i}", volume_id=vol.id, tags=tags,
                                          **kw)  # type: ignore[arg-type]
        made.append(s.id)
    pages = [await service.list_snapshots(ZONE, per_page=3, page=p) for p in (1, 2, 3, 4)]
    assert [p.total_count for p in pages] == [7] * 4
    assert [s.id for p in pages for s in p.items] == made  # stable creation order
    assert pages[3].items == []
    assert (await service.list_snapshots(ZONE, name="snap-3")).total_count == 1
    assert (await service.list_snapshots(ZONE, name="snap")).total_count == 7  # substring
    assert (await service.list_snapshots(ZONE, tags=["odd"])).total_count == 3
    assert (await service.list_snapshots(ZONE, tags=["odd", "n3"])).total_count == 1
    assert (await service.list_snapshots(ZONE, base_volume_id=b.id)).total_count == 3
    assert (await service.list_snapshots(ZONE, project=other.id)).total_count == 1
    assert (await service.list_snapshots(ZONE, organization=service.organization)
            ).total_count == 7
    assert (await service.list_snapshots("nl-ams-1")).total_count == 0
    for bad in ({"per_page": 101}, {"per_page": 0, "page": -1}):
        with pytest.raises(InvalidArgument):
            await service.list_snapshots(ZONE, **bad)  # type: ignore[arg-type]


async def test_create_refusals_change_nothing(service: LocalService,
                                              volume_file: Callable[..., Path]) -> None:
    vol = await service.add_volume("v", volume_file("v", MiB, [(0, b"x")]))
    before = await state_of_store(service)
    cases = [
        (NotFound, dict(name="s", volume_id="00000000-0000-0000-0000-000000000000")),
        (InvalidArgument, dict(name="s", volume_id="not-a-uuid")),
        (InvalidArgument, dict(name="a/b", volume_id=vol.id)),
        (InvalidArgument, dict(name="s", volume_id=vol.id, volume_type="floppy")),
        (InvalidArgument, dict(name="s", volume_id=vol.id, tags=["a,b"])),
        (InvalidArgument, dict(name="s", volume_id=vol.id, project=service.organization,
                               organization=service.organization)),
        (InvalidArgument, dict(name="s", bucket="bkt", key="k", size=1000)),
        (InvalidArgument, dict(name="s", bucket="bkt", key="k", size=0)),
        (InvalidArgument, dict(name="s", bucket="", key="k")),
        (InvalidArgument, dict(name="s", bucket="bkt", key="")),
    ]
    for kind, kw in cases:
        with pytest.raises(kind):
            await service.create_snapshot(ZONE, **kw)  # type: ignore[arg-type]
    with pytest.raises(NotFound):  # the volume lives in fr-par-1
        await service.create_snapshot("nl-ams-1", name="s", volume_id=vol.id)
    assert await state_of_store(service) == before


async def test_import_without_object_storage_is_refused_at_once(
        service: LocalService) -> None:
    before = await state_of_store(service)
    with pytest.raises(NotConfigured) as exc:
        await service.create_snapshot(ZONE, name="imp", bucket="bkt", key="k.qcow2",
                                      size=512 * 1024)
    assert NO_OBJECT_STORAGE in str(exc.value) and errno_for(exc.value) == errno.ENXIO
    assert await state_of_store(service) == before  # no snapshot left in error


async def test_set_applies_mutable_fields_and_refuses_immutable_ones(
        service: LocalService, volume_file: Callable[..., Path]) -> None:
    snap = await snapshot_of(service, volume_file("v", MiB, [(0, b"x")]), tags=["t"])
    for field, value in (("size", snap.size + 512), ("volume_type", "l_ssd"),
                         ("project", "00000000-0000-0000-0000-000000000000"),
                         ("creation_date", "2020-01-01T00:00:00+00:00"), ("base_volume", None),
                         ("zone", "nl-ams-1")):
        bad = Snapshot.from_api({**snap.to_api(), field: value})
        with pytest.raises(InvalidArgument) as info:
            await service.set_snapshot(ZONE, bad)
        assert info.value.field == field
        assert await service.get_snapshot(ZONE, snap.id) == snap
    new = Snapshot.from_api({**snap.to_api(), "name": "renamed", "tags": ["x", "y"]})
    got = await service.set_snapshot(ZONE, new)
    assert (got.name, got.tags) == ("renamed", ["x", "y"])
    assert got.modification_date >= snap.modification_date


async def test_update_name_and_tags(service: LocalService,
                                    volume_file: Callable[..., Path]) -> None:
    snap = await snapshot_of(service, volume_file("v", MiB, [(0, b"x")]))
    got = await service.update_snapshot(ZONE, snap.id, tags=["z", "a"])
    assert (got.name, got.tags) == ("snap", ["z", "a"])
    got = await service.update_snapshot(ZONE, snap.id, name="new")
    assert (got.name, got.tags) == ("new", ["z", "a"])
    with pytest.raises(InvalidArgument):
        await service.update_snapshot(ZONE, snap.id, name="")
    with pytest.raises(NotFound):
        await service.update_snapshot(ZONE, "00000000-0000-0000-0000-000000000000", name="x")
    assert await service.get_snapshot(ZONE, snap.id) == got


async def test_delete_reclaims_chunks_and_space(service: LocalService,
                                                volume_file: Callable[..., Path],
                                                store_dir: Path) -> None:
    path = volume_file("v", 16 * MiB, [(0, random_bytes(8 * MiB, seed=6))])
    first = await snapshot_of(service, path, "first")
    with open(path, "r+b") as f:
        f.write(random_bytes(2 * MiB, seed=7))
    second = await snapshot_of(service, path, "second")
    packs = list((store_dir / "packs").glob("*.pack"))
    blocks = sum(p.stat().st_blocks for p in packs)
    await service.delete_snapshot(ZONE, first.id)
    await deletes_done(service)
    # The 2 chunks only the first snapshot had are gone, their space punched out.
    assert service.md.conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == 8
    assert sum(p.stat().st_blocks for p in packs) <= blocks - (2 * MiB) // 512
    assert await read_all(service, second.id) == path.read_bytes()
    await service.delete_snapshot(ZONE, second.id)
    await deletes_done(service)
    assert service.md.conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == 0
    assert service.md.conn.execute("SELECT count(*) FROM snapshot_chunks").fetchone()[0] == 0
    with pytest.raises(NotFound):
        await service.get_snapshot(ZONE, first.id)


class GatedStorage(ObjectStorage):
    """Holds an export open until released, then fails: lets a test observe the
    service's own `exporting` state machine. The real S3 path is tested against
    SeaweedFS in the Object Storage tests."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.started = trio.Event()

    async def export_qcow2(self, image: ImageReader, bucket: str, key: str,
                           progress: ProgressFn, *, zone: str | None = None,
                           left: LeftFn | None = None) -> int:
        self.started.set()
        progress(1, 2)
        await self.release.wait()
        raise NotFound("bucket", bucket)

    async def open_qcow2(self, bucket: str, key: str, *, zone: str | None = None,
                         nursery: trio.Nursery | None = None) -> ImageReader:
        self.started.set()
        await self.release.wait()
        raise NotFound("bucket", bucket)


async def test_delete_refused_while_exporting_and_stops_an_import(
        store_dir: Path, volume_file: Callable[..., Path]) -> None:
    gate = GatedStorage()
    async with open_local_service(store_dir, objects=gate) as svc:
        snap = await snapshot_of(svc, volume_file("v", MiB, [(0, b"x")]))
        task = await svc.export_snapshot(ZONE, snap.id, bucket="bkt", key="k.qcow2")
        assert task.status == "pending" and task.description == "export_snapshot"
        with trio.fail_after(10):
            await gate.started.wait()
        assert (await svc.get_snapshot(ZONE, snap.id)).state == "exporting"
        imp = await svc.create_snapshot(ZONE, name="imp", bucket="bkt", key="k")
        before = await state_of_store(svc)
        with pytest.raises(PreconditionFailed):
            await svc.delete_snapshot(ZONE, snap.id)
        with pytest.raises(PreconditionFailed):  # one export at a time
            await svc.export_snapshot(ZONE, snap.id, bucket="bkt", key="again")
        assert await state_of_store(svc) == before
        # An import is stopped by its delete (its object may never answer).
        with trio.fail_after(10):
            await svc.delete_snapshot(ZONE, imp.id)
        with pytest.raises(NotFound):
            await svc.get_snapshot(ZONE, imp.id)
        # (Its map released before the export ends: a main-connection transaction
        # racing a worker connection's write fails "database is locked" today.)
        await deletes_done(svc)
        t = await svc.get_task(ZONE, task.id)
        assert t.status == "started" and t.progress == 50
        gate.release.set()
        done = await wait_state(svc, snap.id)
        assert done.state == "available"
        t = await svc.get_task(ZONE, task.id)
        assert t.status == "failure" and "not found" in (t.error or "")
        assert t.terminated_at is not None
        await svc.delete_snapshot(ZONE, snap.id)


async def test_export_without_object_storage_is_refused_at_once(
        service: LocalService, volume_file: Callable[..., Path]) -> None:
    snap = await snapshot_of(service, volume_file("v", MiB, [(0, b"x")]))
    await wait_state(service, snap.id)
    before = await state_of_store(service)
    with pytest.raises(NotConfigured) as exc:
        await service.export_snapshot(ZONE, snap.id, bucket="bkt", key="k")
    assert NO_OBJECT_STORAGE in str(exc.value) and errno_for(exc.value) == errno.ENXIO
    assert await service.latest_export(ZONE, snap.id) is None
    assert await state_of_store(service) == before
    assert (await service.get_snapshot(ZONE, snap.id)).state == "available"
    with pytest.raises(InvalidArgument):
        await service.export_snapshot(ZONE, snap.id, bucket="", key="k")


async def test_snapshot_of_a_vanished_volume_is_refused(
        service: LocalService, volume_file: Callable[..., Path]) -> None:
    path = volume_file("gone", MiB, [(0, b"x")])
    vol = await service.add_volume("gone", path)
    path.unlink()
    with pytest.raises(InvalidArgument, match="does not exist"):
        await service.create_snapshot(ZONE, name="s", volume_id=vol.id)
    assert (await service.list_snapshots(ZONE)).total_count == 0


async def test_restart_keeps_everything(store_dir: Path,
                                        volume_file: Callable[..., Path]) -> None:
    path = volume_file("v", 8 * MiB, [(MiB, random_bytes(3 * MiB, seed=8))])
    async with open_local_service(store_dir) as svc:
        snap = await snapshot_of(svc, path)
    async with open_local_service(store_dir) as svc:
        assert await svc.get_snapshot(ZONE, snap.id) == snap
        assert await read_all(svc, snap.id) == path.read_bytes()
        assert [v.name for v in await svc.list_all_volumes()] == ["v"]


async def test_a_1_tib_sparse_volume_is_captured_without_reading_its_holes(
        service: LocalService, volume_file: Callable[..., Path]) -> None:
    TiB = 1 << 40
    runs = [(0, random_bytes(2 * MiB, seed=20)), (TiB // 2 + 12345, b"middle"),
            (TiB - MiB, random_bytes(MiB, seed=21))]
    path = volume_file("huge", TiB, runs)
    with trio.fail_after(30):
        snap = await snapshot_of(service, path)
    assert snap.state == "available" and snap.size == TiB
    assert service.md.conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == 4
    reader = await service.open_image(ZONE, snap.id)
    for off, data in runs:
        assert await reader.read(off, len(data)) == data
    assert await reader.read(TiB // 4, 1 << 20) == bytes(1 << 20)
    await reader.aclose()


async def test_delete_refused_while_the_image_is_open(service: LocalService,
                                                      volume_file: Callable[..., Path]) -> None:
    path = volume_file("v", 2 * MiB, [(0, random_bytes(2 * MiB, seed=22))])
    snap = await snapshot_of(service, path)
    reader = await service.open_image(ZONE, snap.id)
    with pytest.raises(PreconditionFailed, match="open for reading"):
        await service.delete_snapshot(ZONE, snap.id)
    assert await reader.read(0, 2 * MiB) == path.read_bytes()
    await reader.aclose()
    await service.delete_snapshot(ZONE, snap.id)
    with pytest.raises(NotFound):
        await service.get_snapshot(ZONE, snap.id)


async def test_a_delete_is_immediate_while_a_capture_holds_the_index(
        service: LocalService, volume_file: Callable[..., Path]) -> None:
    snap = await snapshot_of(service, volume_file("v", 2 * MiB, [(0, random_bytes(MiB, 23))]))
    await service.index_lock.acquire()  # as a capture's write group would
    try:
        # A delete that waited for the index would wait forever (it is held until
        # the end): the bound is only that guard, wide for a commit on a busy disk.
        with trio.fail_after(10):
            await service.delete_snapshot(ZONE, snap.id)
        # Gone for everyone at once; its map waits for the index to be released.
        for attempt in (service.get_snapshot(ZONE, snap.id), service.open_image(ZONE, snap.id),
                        service.export_snapshot(ZONE, snap.id, bucket="b", key="k"),
                        service.delete_snapshot(ZONE, snap.id)):
            with pytest.raises(NotFound):
                await attempt
        assert service.md.conn.execute("SELECT count(*) FROM snapshot_chunks").fetchone()[0]
    finally:
        service.index_lock.release()
    await deletes_done(service)
    assert service.md.conn.execute("SELECT count(*) FROM snapshot_chunks").fetchone()[0] == 0


async def test_deleting_an_import_in_flight_never_shows_it_in_error(
        store_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A delete of a snapshot still being made goes from importing to gone: an SDK
    wait loop must never see `error` (it is terminal), and the log must not say the
    service stopped. A real stop of the service still records the interruption."""
    caplog.set_level(logging.INFO, logger="snapfs.local")
    gate = GatedStorage()
    async with open_local_service(store_dir, objects=gate) as svc:
        imp = await svc.create_snapshot(ZONE, name="imp", bucket="bkt", key="k")
        with trio.fail_after(10):
            await gate.started.wait()
        seen: list[str] = []
        done = trio.Event()

        async def watch() -> None:  # Get as often as the loop lets it, until the 404
            while not done.is_set():
                try:
                    seen.append((await svc.get_snapshot(ZONE, imp.id)).state)
                except NotFound:
                    seen.append("gone")
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            with trio.fail_after(10):
                await svc.delete_snapshot(ZONE, imp.id)
            done.set()
        assert set(seen) <= {"importing", "gone"} and seen[-1] == "gone", seen
        await deletes_done(svc)
        assert svc.md.conn.execute("SELECT count(*) FROM snapshot_chunks").fetchone()[0] == 0
        assert INTERRUPTED not in caplog.text and "failed" not in caplog.text
        # The service stopping mid-import: that one is recorded as interrupted.
        other = await svc.create_snapshot(ZONE, name="cut", bucket="bkt", key="k")
    async with open_local_service(store_dir, objects=GatedStorage()) as svc:
        cut = await svc.get_snapshot(ZONE, other.id)
        assert (cut.state, cut.error_reason) == ("error", INTERRUPTED)


async def test_an_export_no_import_could_take_back_is_refused(
        store_dir: Path, reflink_dir: Path) -> None:
    """A snapshot over 64 TiB (a sparse file on XFS or btrfs) was exported, and
    the object was then refused by every import (the decoder's virtual size
    bound). The export is refused at once (EFBIG), before any upload or task."""
    path = reflink_dir / "vast.raw"
    with open(path, "wb") as f:
        f.truncate(MAX_VIRTUAL_SIZE + MiB)
        f.write(b"data at the start")
    async with open_local_service(store_dir) as svc:
        snap = await snapshot_of(svc, path)
        assert snap.size == MAX_VIRTUAL_SIZE + MiB
        before = await state_of_store(svc)
        with pytest.raises(TooLarge, match="64 TiB") as exc:
            await svc.export_snapshot(ZONE, snap.id, bucket="bkt", key="k")
        assert errno_for(exc.value) == errno.EFBIG
        assert await svc.latest_export(ZONE, snap.id) is None
        assert await state_of_store(svc) == before
        assert (await svc.get_snapshot(ZONE, snap.id)).state == "available"


async def test_a_volume_is_not_removed_while_a_snapshot_of_it_is_captured(
        store_dir: Path, volume_file: Callable[..., Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Removed under its capture, the accepted snapshot ended in error ("reading the
    source failed"); the volume showed ``available`` all along. Now it shows
    ``snapshotting`` and is refused (EBUSY / 412), changing nothing, until then."""
    gate = trio.Event()
    read_batch = capture.FileSource.read_batch

    async def held(self: capture.FileSource, first: int, count: int) -> object:
        await gate.wait()
        return await read_batch(self, first, count)
    monkeypatch.setattr(capture.FileSource, "read_batch", held)
    data = random_bytes(2 * MiB, 21)
    async with open_local_service(store_dir) as svc:
        added = await svc.add_volume("added", volume_file("v", 2 * MiB, [(0, data)]))
        made = await svc.create_volume("made", 2 * MiB, zone=ZONE)
        snaps = [await svc.create_snapshot(ZONE, name=f"s-{v.name}", volume_id=v.id)
                 for v in (added, made)]
        for vol, remove in ((added, lambda: svc.remove_volume(added.id)),
                            (made, lambda: svc.delete_volume(ZONE, made.id))):
            assert (await svc.get_volume(ZONE, vol.id)).state == "snapshotting"
            with pytest.raises(PreconditionFailed, match="being snapshotted") as exc:
                await remove()
            assert errno_for(exc.value) == errno.EBUSY
            assert (await svc.get_volume(ZONE, vol.id)).path == vol.path
        gate.set()
        for s in snaps:
            assert (await wait_state(svc, s.id)).state == "available"
        assert await read_all(svc, snaps[0].id) == data
        assert [v.state for v in await svc.list_all_volumes()] == ["available"] * 2
        await svc.remove_volume(added.id)
        await svc.delete_volume(ZONE, made.id)
        assert await svc.list_all_volumes() == []
        # A snapshot of a volume removed since it was looked up is not made.
        vol = await svc.create_volume("late", MiB, zone=ZONE)
        svc.md.remove_volume(vol.id)
        monkeypatch.setattr(svc.md, "volume", lambda zone, ref: vol)
        with pytest.raises(NotFound):
            await svc.create_snapshot(ZONE, name="late", volume_id=vol.id)
        assert (await svc.list_snapshots(ZONE)).total_count == 2
