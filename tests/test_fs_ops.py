"""The Operations object called directly (no kernel) on a real local store: the
error wrapper, lookups, mkdir/rename/rmdir, xattrs, reads with read-ahead, and
the listing cache."""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from typing import Any

import pyfuse3
import pytest
import trio

from fixtures_store import MiB, ZONE, random_bytes, wait_state
from snapfs.fs.context import FsContext
from snapfs.fs.nodes import node_for
from snapfs.fs.ops import SnapfsOperations


@dataclass
class Ctx:
    """Stands in for pyfuse3.RequestContext (which only the kernel side makes)."""

    pid: int = os.getpid()
    uid: int = 0
    gid: int = 0
    umask: int = 0o022


CTX: Any = Ctx()


async def child(ops: SnapfsOperations, inode: int, *names: str) -> int:
    for name in names:
        inode = (await ops.lookup(inode, name.encode(), CTX)).st_ino
    return inode


async def fuse_errno(coro: Any) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await coro
    return info.value.errno


@pytest.fixture
async def fs(service: Any, volume_file: Any, nursery: trio.Nursery) -> SnapfsOperations:
    data = random_bytes(3 * MiB + 4096, seed=7)
    path = volume_file("vol1", len(data), [(0, data)])
    await service.add_volume("vol1", path)
    ctx = FsContext.create(service)
    ops = SnapfsOperations(ctx)
    ops.volume_data = data  # type: ignore[attr-defined]
    return ops


async def make_snapshot(fs: SnapfsOperations, name: str) -> int:
    vol = await child(fs, pyfuse3.ROOT_INODE, ZONE, "default", "volumes", "vol1")
    attrs = await fs.mkdir(vol, name.encode(), 0o755, CTX)
    sid = (await fs.getxattr(attrs.st_ino, b"user.id", CTX)).decode()
    await wait_state(fs.ctx.svc, sid)  # type: ignore[arg-type]
    return attrs.st_ino


async def test_tree_and_refusal_wrapper(fs: SnapfsOperations, caplog: Any) -> None:
    project = await child(fs, pyfuse3.ROOT_INODE, ZONE, "default")
    assert (await fs.getattr(project, CTX)).st_mode & 0o170000 == 0o040000
    snaps = await child(fs, project, "snapshots")
    assert await fuse_errno(fs.lookup(snaps, b"missing", CTX)) == errno.ENOENT
    with caplog.at_level(logging.INFO, logger="snapfs.fs"):
        assert await fuse_errno(fs.mkdir(snaps, b"x", 0o755, CTX)) == errno.EPERM
    lines = [r.getMessage() for r in caplog.records if r.name == "snapfs.fs"]
    assert len(lines) == 1 and "EPERM" in lines[0] and "volumes/<volume>/" in lines[0]
    assert await fuse_errno(fs.getattr(999999, CTX)) == errno.ENOENT
    assert await fuse_errno(fs.getxattr(project, b"security.selinux", CTX)) == errno.EOPNOTSUPP
    assert await fuse_errno(fs.getxattr(project, b"user.nothing", CTX)) == errno.ENODATA
    assert await fuse_errno(fs.setxattr(project, b"user.name", b"x", CTX)) == errno.EPERM


async def test_mkdir_rename_setxattr_rmdir(fs: SnapfsOperations) -> None:
    ino = await make_snapshot(fs, "one")
    snaps = await child(fs, pyfuse3.ROOT_INODE, ZONE, "default", "snapshots")
    assert await child(fs, snaps, "one") != ino  # another view: another inode
    vol = await child(fs, pyfuse3.ROOT_INODE, ZONE, "default", "volumes", "vol1")
    assert await fuse_errno(fs.mkdir(vol, b"one", 0o755, CTX)) == errno.EEXIST
    await fs.rename(snaps, b"one", snaps, b"two", 0, CTX)
    assert await fuse_errno(fs.lookup(snaps, b"one", CTX)) == errno.ENOENT
    two = await child(fs, snaps, "two")
    assert await fuse_errno(fs.rename(snaps, b"two", vol, b"three", 0, CTX)) == errno.EPERM
    # RENAME_WHITEOUT (overlayfs asks it) was done as a plain rename: refused.
    assert await fuse_errno(fs.rename(snaps, b"two", snaps, b"four", 4, CTX)) == errno.EINVAL
    assert await fuse_errno(fs.rename(snaps, b"two", snaps, b"four",
                                      pyfuse3.RENAME_NOREPLACE | 4, CTX)) == errno.EINVAL
    await fs.rename(snaps, b"two", snaps, b"four", pyfuse3.RENAME_NOREPLACE, CTX)
    await fs.rename(snaps, b"four", snaps, b"two", 0, CTX)
    await fs.setxattr(two, b"user.tags", b"a,b", CTX)
    assert await fs.getxattr(two, b"user.tags", CTX) == b"a,b"
    assert b"user.state" in await fs.listxattr(two, CTX)
    tagged = await child(fs, pyfuse3.ROOT_INODE, ZONE, "default", "tags", "b", "two")
    assert await fs.getxattr(tagged, b"user.name", CTX) == b"two"
    await fs.removexattr(two, b"user.tags", CTX)
    assert await fs.getxattr(two, b"user.tags", CTX) == b""
    await fs.rmdir(snaps, b"two", CTX)
    assert await fuse_errno(fs.lookup(snaps, b"two", CTX)) == errno.ENOENT
    assert await fuse_errno(fs.getattr(two, CTX)) == errno.ENOENT


async def test_concurrent_mkdirs_and_renames_to_one_name_leave_one_snapshot(
        fs: SnapfsOperations) -> None:
    """Each checks that the name is free, then awaits the service: without a claim
    on the name, all of them would pass the check and all would succeed."""
    vol = await child(fs, pyfuse3.ROOT_INODE, ZONE, "default", "volumes", "vol1")
    snaps = await child(fs, pyfuse3.ROOT_INODE, ZONE, "default", "snapshots")
    svc = fs.ctx.svc
    results: list[int] = []

    async def attempt(op: Any) -> None:
        try:
            await op
            results.append(0)
        except pyfuse3.FUSEError as exc:
            results.append(exc.errno)

    async def settle(name: str) -> None:
        assert sorted(results) == [0] + [errno.EEXIST] * (len(results) - 1)
        assert (await svc.list_snapshots(ZONE, name=name)).total_count == 1
        for snap in (await svc.list_snapshots(ZONE)).items:
            await wait_state(svc, snap.id)  # type: ignore[arg-type]
        results.clear()

    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(attempt, fs.mkdir(vol, b"same", 0o755, CTX))
    await settle("same")
    # Across views (the kernel serializes requests per directory, not across
    # them): a rename in snapshots/ and a mkdir in volumes/vol1/ to one name.
    current = "same"
    for i in range(4):  # trio orders the two at random: either may go first
        name = f"taken{i}"
        async with trio.open_nursery() as n:
            n.start_soon(attempt, fs.rename(snaps, current.encode(), snaps, name.encode(),
                                            0, CTX))
            n.start_soon(attempt, fs.mkdir(vol, name.encode(), 0o755, CTX))
        if not (await svc.list_snapshots(ZONE, name=current)).total_count:
            current = name  # the rename won
        await settle(name)


async def test_image_cache_mode_follows_the_mount_option(fs: SnapfsOperations) -> None:
    image = await child(fs, await make_snapshot(fs, "mode"), "image.raw")
    for option, direct in ((True, True), (False, False)):
        fs.ctx.direct_io = option
        info = await fs.open(image, os.O_RDONLY, CTX)
        assert (info.direct_io, info.keep_cache) == (direct, not direct)
        await fs.release(info.fh)


async def test_image_reads_sequential_and_random(fs: SnapfsOperations) -> None:
    snap = await make_snapshot(fs, "img")
    image = await child(fs, snap, "image.raw")
    st = await fs.getattr(image, CTX)
    data: bytes = fs.volume_data  # type: ignore[attr-defined]
    assert st.st_size == len(data) and st.st_blksize == MiB
    assert await fuse_errno(fs.open(image, os.O_WRONLY, CTX)) == errno.EROFS
    info = await fs.open(image, os.O_RDONLY, CTX)
    # The default: through the page cache (bytes never change: kept across opens).
    assert not info.direct_io and info.keep_cache
    # bytes(): a read's result is lent until the next await (pyfuse3 replies at once)
    got = b"".join([bytes(await fs.read(info.fh, off, MiB))
                    for off in range(0, len(data), MiB)])
    assert got == data
    assert await fs.read(info.fh, 5, 10) == data[5:15]
    assert await fs.read(info.fh, len(data) - 3, 100) == data[-3:]
    assert await fs.read(info.fh, len(data) + 10, 100) == b""
    await fs.release(info.fh)


async def test_lseek_enxio_is_an_answer_other_refusals_are_logged(
        fs: SnapfsOperations, caplog: Any) -> None:
    """SEEK_DATA past the last data is ENXIO as a matter of course (cp asks it of
    every sparse file): not worth a log line. EINVAL or EIO from lseek is."""
    image = await child(fs, await make_snapshot(fs, "seek"), "image.raw")
    info = await fs.open(image, os.O_RDONLY, CTX)
    size = len(fs.volume_data)  # type: ignore[attr-defined]
    try:
        with caplog.at_level(logging.INFO, logger="snapfs.fs"):
            assert await fs.lseek(info.fh, 5, os.SEEK_DATA) == 5
            assert await fs.lseek(info.fh, 5, os.SEEK_HOLE) == size  # all data
            assert await fuse_errno(fs.lseek(info.fh, size, os.SEEK_DATA)) == errno.ENXIO
            assert not [r for r in caplog.records if r.name == "snapfs.fs"]
            assert await fuse_errno(fs.lseek(info.fh + 1000, 0, os.SEEK_DATA)) == errno.EINVAL
            assert await fuse_errno(fs.lseek(info.fh, 0, os.SEEK_SET)) == errno.EINVAL
        lines = [r.getMessage() for r in caplog.records if r.name == "snapfs.fs"]
        assert len(lines) == 2 and all("lseek" in x and "EINVAL" in x for x in lines), lines
        assert fs.unexpected == 0
    finally:
        await fs.release(info.fh)


async def test_snapshot_json_applied_at_flush(fs: SnapfsOperations) -> None:
    import json
    snap = await make_snapshot(fs, "j")
    f = await child(fs, snap, "snapshot.json")
    info = await fs.open(f, os.O_RDONLY, CTX)
    obj = json.loads(await fs.read(info.fh, 0, 1 << 16))
    await fs.release(info.fh)
    info = await fs.open(f, os.O_WRONLY | os.O_TRUNC, CTX)
    await fs.write(info.fh, 0, json.dumps(dict(obj, size=1)).encode())
    assert await fuse_errno(fs.flush(info.fh)) == errno.EINVAL
    await fs.write(info.fh, 0, json.dumps(dict(obj, name="k")).encode())
    await fs.flush(info.fh)
    await fs.release(info.fh)
    assert await fs.getxattr(snap, b"user.name", CTX) == b"k"


async def test_listing_cache_and_invalidation(fs: SnapfsOperations) -> None:
    calls = 0
    svc = fs.ctx.svc
    original = svc.list_snapshots

    async def counting(*a: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        return await original(*a, **kw)

    svc.list_snapshots = counting  # type: ignore[method-assign]
    snaps_key = (await node_for(fs.ctx, fs.ctx.inodes.key(
        await child(fs, pyfuse3.ROOT_INODE, ZONE, "default", "snapshots"))).entries())
    assert snaps_key == []
    first = calls
    snaps = await child(fs, pyfuse3.ROOT_INODE, ZONE, "default", "snapshots")
    await node_for(fs.ctx, fs.ctx.inodes.key(snaps)).entries()
    assert calls == first  # within the TTL: no new List
    await make_snapshot(fs, "c")  # the mount's own change invalidates
    entries = await node_for(fs.ctx, fs.ctx.inodes.key(snaps)).entries()
    assert [e[0] for e in entries] == ["c"]


async def test_control_file_writes_beyond_64k_are_efbig_and_allocate_nothing(
        fs: SnapfsOperations) -> None:
    import resource
    from types import SimpleNamespace
    snap = await make_snapshot(fs, "big")
    f = await child(fs, snap, "snapshot.json")
    before = await fs.getxattr(snap, b"user.name", CTX)
    info = await fs.open(f, os.O_WRONLY, CTX)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert await fuse_errno(fs.write(info.fh, 4 << 30, b"x")) == errno.EFBIG
    assert await fuse_errno(fs.write(info.fh, 64 << 10, b"x")) == errno.EFBIG
    assert await fs.write(info.fh, (64 << 10) - 1, b"x") == 1  # the last byte it takes
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 1 << 40
    fields: Any = SimpleNamespace(update_size=True)  # what the kernel sets for ftruncate
    assert await fuse_errno(fs.setattr(f, attr, fields, info.fh, CTX)) == errno.EFBIG
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 16 << 10  # KiB
    assert await fuse_errno(fs.flush(info.fh)) == errno.EINVAL  # 64 KiB of NULs: not JSON
    await fs.release(info.fh)
    assert await fs.getxattr(snap, b"user.name", CTX) == before


async def held_nodes(fs: SnapfsOperations) -> int:
    st = await fs.statfs(CTX)
    assert st.f_ffree == st.f_favail > 1 << 30  # never "100% of inodes used"
    return st.f_files - st.f_ffree


async def test_forget_frees_what_the_kernel_dropped(fs: SnapfsOperations, tmp_path: Any) -> None:
    """FORGET takes a node out of memory (statfs's f_files - f_ffree, df -i's
    IUsed, counts the ones held);
    its number stays in the map: a stale inode still answers, a new lookup gets
    the same number."""
    from snapfs.fs.inodes import InodeTable
    fs.ctx.inodes = InodeTable.in_store(tmp_path)
    snap = await make_snapshot(fs, "s")
    img = await child(fs, snap, "image.raw")
    assert await child(fs, snap, "image.raw") == img  # given twice
    held = await held_nodes(fs)
    await fs.forget([(img, 1)])
    assert await held_nodes(fs) == held
    await fs.forget([(img, 1)])
    assert await held_nodes(fs) == held - 1
    assert (await fs.getattr(img, CTX)).st_ino == img
    assert await child(fs, snap, "image.raw") == img
    assert await held_nodes(fs) == held
    fs.ctx.inodes.close()
