"""Window digests of chunk maps (snapfs/local/mapdigest.py): written when a map
is complete, what changes/ and map.json are computed from, computed on first use
for a map without one, gone with their map, checked by fsck and dropped by
fsck --repair -- on real captures in a real store."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from fixtures_store import MiB, ZONE, deletes_done, random_bytes, snapshot_of
from snapfs.extentmap import Extent
from snapfs.local import LocalService, open_local_service
from snapfs.local import mapdigest
from snapfs.local.extents import cover, runs
from snapfs.local.fsck import fsck, run_repair

#: Data chunks (MiB) of the volume: a few scattered, one window wholly allocated
#: (128-191 with WINDOW 64), and the image's partial last window.
DATA = [0, 1, 2, 3, 70, *range(128, 192), 200, 201, 290]
SIZE = 291 * MiB + 4096  # an unaligned end: the last chunk is short


def digest_rows(svc: LocalService) -> dict[int, bytes]:
    return {int(k): bytes(d) for k, d in svc.md.conn.execute(
        "SELECT snap, digests FROM map_digests")}


def entries(svc: LocalService, snapshot_id: str) -> dict[int, int]:
    key = svc.md.snap_key(snapshot_id)
    return dict(svc.md.conn.execute("SELECT idx, chunk FROM snapshot_chunks WHERE snap = ?",
                                    (key,)).fetchall())


def changed_by_scan(svc: LocalService, a: str, b: str) -> list[Extent]:
    """What changes/ must answer, entry by entry over both whole maps."""
    ma, mb = entries(svc, a), entries(svc, b)
    out: list[Extent] = []
    for kind in (True, False):
        idx = sorted(i for i in ma.keys() | mb.keys()
                     if ma.get(i) != mb.get(i) and (i in ma) == kind)
        out += [(s, n, kind) for s, n in runs(idx, SIZE)]
    return sorted(out)


async def two_snapshots(svc: LocalService, make: Callable[..., Path]) -> tuple[str, str]:
    path = make("vol", SIZE, [(i * MiB, random_bytes(MiB, seed=i)) for i in DATA])
    first = await snapshot_of(svc, path, "first")
    with open(path, "r+b") as f:
        for i, data in ((70, random_bytes(64 << 10, seed=99)), (150, b"x"),
                        (2, bytes(MiB)), (250, b"new")):
            f.seek(i * MiB + 1000 if len(data) < MiB else i * MiB)
            f.write(data)
    second = await snapshot_of(svc, path, "second")
    return first.id, second.id


async def test_changes_and_map_from_digests_match_a_full_scan(
        service: LocalService, volume_file: Callable[..., Path]) -> None:
    a, b = await two_snapshots(service, volume_file)
    rows = digest_rows(service)
    keys = {service.md.snap_key(a), service.md.snap_key(b)}
    assert set(rows) == keys  # written by the captures themselves
    assert all(len(d) == mapdigest.DIGEST * mapdigest.windows_of(SIZE) for d in rows.values())

    got = await service.changed_extents(ZONE, b, a)
    assert sorted(got) == changed_by_scan(service, b, a)
    assert [(s // MiB, n, d) for s, n, d in got] == [
        (2, MiB, False), (70, MiB, True), (150, MiB, True), (250, MiB, True)]
    assert sorted(await service.changed_extents(ZONE, a, b)) == changed_by_scan(service, a, b)
    assert await service.changed_extents(ZONE, a, a) == []
    for sid in (a, b):
        idx = sorted(entries(service, sid))
        assert await service.allocated_extents(ZONE, sid) == cover(runs(idx, SIZE), SIZE)


async def test_a_map_without_digests_gets_them_on_first_use(
        service: LocalService, volume_file: Callable[..., Path]) -> None:
    a, b = await two_snapshots(service, volume_file)
    expected = await service.changed_extents(ZONE, b, a)
    before = digest_rows(service)
    service.md.conn.execute("DELETE FROM map_digests")  # a store made before them
    assert await service.changed_extents(ZONE, b, a) == expected
    assert digest_rows(service) == before  # computed again, and stored


async def test_digests_go_with_their_map_and_fsck_checks_them(
        store_dir: Path, volume_file: Callable[..., Path]) -> None:
    async with open_local_service(store_dir) as svc:
        a, b = await two_snapshots(svc, volume_file)
        expected = await svc.changed_extents(ZONE, b, a)
        assert (await fsck(svc)).ok
        # A digest that lies about its map: fsck says so.
        key = svc.md.snap_key(a)
        with svc.md.transaction():
            svc.md.conn.execute("UPDATE map_digests SET digests = zeroblob(length(digests)) "
                                "WHERE snap = ?", (key,))
        report = await fsck(svc)
        assert [p for p in report.problems if "window digests" in p and a in p], report
    said: list[str] = []
    assert await run_repair(store_dir, said.append) == 0, said
    assert any("drop the window digests" in line for line in said), said
    async with open_local_service(store_dir) as svc:
        assert key not in digest_rows(svc)
        assert await svc.changed_extents(ZONE, b, a) == expected  # recomputed
        assert key in digest_rows(svc)
        await svc.delete_snapshot(ZONE, a)
        await deletes_done(svc)
        assert key not in digest_rows(svc)
        assert (await fsck(svc)).ok


def test_differing_windows_are_found_in_runs() -> None:
    n = 3 * 256 + 5  # past the blocks compared at once
    base = bytes(range(256)) * (mapdigest.DIGEST * n // 256 + 1)
    base = base[:mapdigest.DIGEST * n]
    a = mapdigest.MapDigest(base, bytes(n))
    changed = bytearray(base)
    for w in (0, 1, 2, 300, 767, 770):
        changed[w * mapdigest.DIGEST] ^= 1
    b = mapdigest.MapDigest(bytes(changed), bytes(n))
    assert mapdigest.differing(a, b) == [(0, 3), (300, 301), (767, 768), (770, 771)]
    assert mapdigest.differing(a, a) == []


async def test_a_map_reused_under_a_lease_takes_its_bases_digest(
        service: LocalService, volume_file: Callable[..., Path]) -> None:
    """The volume unchanged: the second snapshot copies the first's map (lease)
    and its digest row, without reading the map again -- a row equal to one
    computed from its own map."""
    path = volume_file("vol", SIZE, [(i * MiB, random_bytes(MiB, seed=i)) for i in DATA])
    first = await snapshot_of(service, path, "first")
    second = await snapshot_of(service, path, "second")
    k1, k2 = service.md.snap_key(first.id), service.md.snap_key(second.id)
    assert entries(service, first.id) == entries(service, second.id)
    rows = digest_rows(service)
    assert rows[k2] == rows[k1] == mapdigest.compute(service.md.conn, k2, SIZE).digests
    assert mapdigest.wrong(service.md.conn) == []


async def test_a_sparse_maps_digest_costs_its_entries_not_its_size(
        service: LocalService, volume_file: Callable[..., Path]) -> None:
    """A 64 GiB volume of three data chunks (1024 windows, three with entries):
    the digest is the window-by-window one, found with a couple of queries per
    window with entries. Checked by breaking it: a query per window (as before, 10 s
    for a 64 TiB map in tests/test_s3_scale.py) runs 1024 statements."""
    size = 64 << 30
    data = [0, 5000, size // MiB - 1]
    path = volume_file("sparse", size, [(i * MiB, random_bytes(MiB, seed=i)) for i in data])
    snap = await snapshot_of(service, path, "s")
    key, conn = service.md.snap_key(snap.id), service.md.conn
    reference = bytearray()  # one range scan per window, holes included
    for w in range(mapdigest.windows_of(size)):
        text = conn.execute("SELECT group_concat(idx || ':' || chunk, ' ') FROM snapshot_chunks"
                            " WHERE snap = ? AND idx >= ? AND idx < ?",
                            (key, w * mapdigest.WINDOW, (w + 1) * mapdigest.WINDOW)).fetchone()[0]
        reference += hashlib.blake2b((text or "").encode(), digest_size=mapdigest.DIGEST).digest()
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        digest = mapdigest.compute(conn, key, size)
    finally:
        conn.set_trace_callback(None)
    assert digest.digests == bytes(reference)
    assert [i for i, n in enumerate(digest.counts) if n] == [0, 5000 // 64, 1023]
    assert sum(digest.counts) == 3
    assert len(statements) <= 2 * 3 + 1, len(statements)
    assert digest_rows(service)[key] == digest.digests  # what the capture stored
