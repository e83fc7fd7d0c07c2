"""Hostile names and documents against the Operations object on a real store
(issue 13): every refusal is one errno from the table with one escaped log line
and nothing changed; names and tags the tree cannot show are listed under
escaped labels and stay reachable; an unexpected exception is counted."""

from __future__ import annotations

import errno
import json
import logging
import os
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest
import trio

from fixtures_store import MiB, ZONE, random_bytes
from snapfs.fs.context import FsContext
from snapfs.fs.nodes.views import ViewNode
from snapfs.fs.ops import SnapfsOperations
from test_fs_ops import CTX, child, fuse_errno, make_snapshot


@pytest.fixture
async def fs(service: Any, volume_file: Any, nursery: trio.Nursery) -> SnapfsOperations:
    path = volume_file("vol1", 1 * MiB, [(0, random_bytes(4096, seed=3))])
    await service.add_volume("vol1", path)
    ctx = FsContext.create(service)
    return SnapfsOperations(ctx)


async def listing(fs: SnapfsOperations, inode: int) -> list[str]:
    fh = await fs.opendir(inode, CTX)
    try:
        # Past `.` and `..`, which every listing starts with.
        names = [name for name, _, _ in fs._dirs[fh]]
        assert names[:2] == [".", ".."]
        return names[2:]
    finally:
        await fs.releasedir(fh)


async def place(fs: SnapfsOperations, *names: str) -> int:
    return await child(fs, pyfuse3.ROOT_INODE, ZONE, "default", *names)


#: Names the kernel may pass that the naming rule refuses.
BAD_NAMES: list[bytes] = [
    b"a~b", b"new\nline", b"nul-free\x01", b"del\x7f", "c1\x85".encode(), b"\xff\xfe",
    b"caf\xe9", b"6f1b4a3e-7d3c-4c55-9a53-0d6f3f8b7c01",
    b"6F1B4A3E7D3C4C559A530D6F3F8B7C01", b"", b".", b"..",
]


async def test_names_over_255_bytes_are_enametoolong_and_change_nothing(
        fs: SnapfsOperations) -> None:
    """As a local filesystem answers (lookups too: ENOENT said such a name could
    exist); a name value of user.name is no path component: EINVAL."""
    snap = await make_snapshot(fs, "keep")
    vol, snaps, imports = (await place(fs, "volumes", "vol1"), await place(fs, "snapshots"),
                           await place(fs, "imports"))
    before = (await listing(fs, snaps), await listing(fs, imports))
    long = "é".encode() * 128  # 256 bytes
    assert await fuse_errno(fs.mkdir(vol, long, 0o755, CTX)) == errno.ENAMETOOLONG
    assert await fuse_errno(fs.rename(snaps, b"keep", snaps, long, 0, CTX)) \
        == errno.ENAMETOOLONG
    assert await fuse_errno(fs.create(imports, long, 0o644, os.O_WRONLY, CTX)) \
        == errno.ENAMETOOLONG
    for op in (fs.lookup, fs.rmdir):
        assert await fuse_errno(op(snaps, long, CTX)) == errno.ENAMETOOLONG
    assert await fuse_errno(fs.setxattr(snap, b"user.name", long, CTX)) == errno.EINVAL
    assert (await listing(fs, snaps), await listing(fs, imports)) == before
    assert fs.unexpected == 0


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
async def test_bad_names_are_einval_everywhere_and_change_nothing(
        fs: SnapfsOperations, caplog: Any, bad: bytes) -> None:
    snap = await make_snapshot(fs, "keep")
    vol, snaps, imports = (await place(fs, "volumes", "vol1"), await place(fs, "snapshots"),
                           await place(fs, "imports"))
    before = (await listing(fs, snaps), await listing(fs, imports),
              await fs.getxattr(snap, b"user.name", CTX))
    with caplog.at_level(logging.DEBUG, logger="snapfs"):
        assert await fuse_errno(fs.mkdir(vol, bad, 0o755, CTX)) == errno.EINVAL
        assert await fuse_errno(fs.rename(snaps, b"keep", snaps, bad, 0, CTX)) == errno.EINVAL
        assert await fuse_errno(fs.setxattr(snap, b"user.name", bad, CTX)) == errno.EINVAL
        assert await fuse_errno(fs.create(imports, bad, 0o644, os.O_WRONLY, CTX)) \
            == errno.EINVAL
        # Looking for a name that cannot exist: absent, never EIO ("." and ".."
        # are the directories themselves).
        if bad not in (b".", b".."):
            assert await fuse_errno(fs.lookup(snaps, bad, CTX)) == errno.ENOENT
            assert await fuse_errno(fs.rmdir(snaps, bad, CTX)) == errno.ENOENT
    assert (await listing(fs, snaps), await listing(fs, imports),
            await fs.getxattr(snap, b"user.name", CTX)) == before
    assert fs.unexpected == 0
    for record in caplog.records:
        assert record.exc_info is None and record.levelno < logging.ERROR
        assert "\n" not in record.getMessage() and "\x00" not in record.getMessage()


async def test_links_and_special_files_are_eperm(fs: SnapfsOperations, caplog: Any) -> None:
    snap = await make_snapshot(fs, "s")
    vol = await place(fs, "volumes", "vol1")
    with caplog.at_level(logging.INFO, logger="snapfs.fs"):
        assert await fuse_errno(fs.symlink(vol, b"l", b"/etc/shadow", CTX)) == errno.EPERM
        assert await fuse_errno(fs.mknod(vol, b"n", 0o10644, 0, CTX)) == errno.EPERM
        assert await fuse_errno(fs.link(snap, vol, b"h", CTX)) == errno.EPERM
    lines = [r.getMessage() for r in caplog.records if r.name == "snapfs.fs"]
    assert len(lines) == 3 and all("EPERM" in line and "volumes/" in line for line in lines)


async def test_log_lines_name_the_place_never_an_object_repr(fs: SnapfsOperations,
                                                             caplog: Any) -> None:
    snap = await make_snapshot(fs, "s")
    attr = pyfuse3.EntryAttributes()
    attr.st_mode = 0o40777
    # pyfuse3.SetattrFields is read-only outside the kernel side: the same shape.
    fields: Any = SimpleNamespace(update_size=False, update_mode=True, update_uid=False,
                                  update_gid=False)
    with caplog.at_level(logging.INFO, logger="snapfs.fs"):
        assert await fuse_errno(fs.setattr(snap, attr, fields, None, CTX)) == errno.EPERM
    (line,) = [r.getMessage() for r in caplog.records if r.name == "snapfs.fs"]
    assert line.startswith("setattr(snapshot ") and "EPERM" in line
    assert "object at 0x" not in line


def _force_name(fs: SnapfsOperations, snapshot_id: str, **fields: Any) -> None:
    """A name or tags stored before the rules (or by another client): written
    into the store's metadata as an older snapfs would have."""
    fs.ctx.svc.md.update_snapshot(snapshot_id, **fields)  # type: ignore[attr-defined]
    fs.ctx.catalog.invalidate()
    fs.ctx.catalog.forget(snapshot_id)


async def test_stored_names_the_tree_cannot_show_are_listed_escaped_and_reachable(
        fs: SnapfsOperations) -> None:
    snaps = await place(fs, "snapshots")
    ids = {}
    for name in ("plain", "one", "two", "three"):
        ino = await make_snapshot(fs, name)
        ids[name] = (await fs.getxattr(ino, b"user.id", CTX)).decode()
    _force_name(fs, ids["one"], name="line\nbreak")
    _force_name(fs, ids["two"], name=ids["plain"])  # another snapshot's ID
    _force_name(fs, ids["three"], name="sl/ash")
    entries = await listing(fs, snaps)
    assert f"line\\x0abreak~{ids['one'][:8]}" in entries
    assert f"{ids['plain']}~{ids['two'][:8]}" in entries
    assert f"sl\\x2fash~{ids['three'][:8]}" in entries
    assert "plain" in entries and len(entries) == 4
    for entry in entries:
        assert len(entry.encode()) <= 255 and "/" not in entry and "\n" not in entry
        ino = await child(fs, snaps, entry)
        assert (await fs.getxattr(ino, b"user.id", CTX)).decode() in ids.values()
    # The ID always means that snapshot, fresh cache or not.
    for _ in range(2):
        ino = await child(fs, snaps, ids["plain"])
        assert (await fs.getxattr(ino, b"user.id", CTX)).decode() == ids["plain"]
        fs.ctx.catalog.invalidate()
    ino = await child(fs, snaps, ids["one"])
    assert await fs.getxattr(ino, b"user.name", CTX) == b"line\nbreak"
    # A stale lookup (no fresh listing) of an escaped label still resolves it.
    fs.ctx.catalog.invalidate()
    label = f"sl\\x2fash~{ids['three'][:8]}"
    ino = await child(fs, snaps, label)
    assert (await fs.getxattr(ino, b"user.id", CTX)).decode() == ids["three"]
    # Its tags can still be set while its stored name stays as it is.
    await fs.setxattr(ino, b"user.tags", b"t", CTX)
    assert await fs.getxattr(ino, b"user.name", CTX) == b"sl/ash"
    # rmdir by ID removes exactly that one (the squatter keeps its label).
    await fs.rmdir(snaps, ids["plain"].encode(), CTX)
    assert await fs.ctx.svc.get_snapshot(ZONE, ids["two"])
    assert "plain" not in await listing(fs, snaps)


async def test_tags_lists_every_stored_tag_and_never_fails(fs: SnapfsOperations) -> None:
    ino = await make_snapshot(fs, "tagged")
    sid = (await fs.getxattr(ino, b"user.id", CTX)).decode()
    stored = ["ok", "x" * 5000, "y" * 65000, ".", "..", "new\nline", "a/b", "t~x"]
    _force_name(fs, sid, tags=stored)
    tags = await place(fs, "tags")
    entries = await listing(fs, tags)
    assert len(entries) == len(stored) and "ok" in entries
    for entry in entries:
        assert 0 < len(entry.encode()) <= 255 and "/" not in entry and "\n" not in entry
        assert entry not in (".", "..")
        view = await child(fs, tags, entry)
        assert await listing(fs, view) == ["tagged"]
        assert (await fs.getxattr(view, b"user.name", CTX)).decode() in stored


@pytest.mark.parametrize("change, field", [
    ({"size": 512}, "size"), ({"zone": "fr-par-2"}, "zone"),
    ({"tags": ["a"] * 3 + ["x" * 200]}, "tags"), ({"name": "a/b"}, "name"),
])
async def test_snapshot_json_refuses_read_only_fields_and_bad_values(
        fs: SnapfsOperations, change: dict[str, Any], field: str, caplog: Any) -> None:
    snap = await make_snapshot(fs, "j")
    f = await child(fs, snap, "snapshot.json")
    info = await fs.open(f, os.O_RDONLY, CTX)
    before = await fs.read(info.fh, 0, 1 << 16)
    await fs.release(info.fh)
    info = await fs.open(f, os.O_WRONLY | os.O_TRUNC, CTX)
    await fs.write(info.fh, 0, json.dumps(dict(json.loads(before), **change)).encode())
    with caplog.at_level(logging.INFO, logger="snapfs.fs"):
        assert await fuse_errno(fs.flush(info.fh)) == errno.EINVAL
    await fs.release(info.fh)
    assert any(field in r.getMessage() for r in caplog.records)
    info = await fs.open(f, os.O_RDONLY, CTX)
    assert await fs.read(info.fh, 0, 1 << 16) == before
    await fs.release(info.fh)


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"name": ' + b"[" * 40 + b"]" * 40 + b"}",
    b" " * (65 << 10) + b"{}",
    b"\xff{}",
    b'{"size": ' + b"9" * 5000 + b"}",
], ids=["deep", "depth-40", "65KiB", "not-utf8", "huge-number"])
async def test_snapshot_json_bounded(fs: SnapfsOperations, body: bytes) -> None:
    snap = await make_snapshot(fs, "j")
    f = await child(fs, snap, "snapshot.json")
    info = await fs.open(f, os.O_WRONLY | os.O_TRUNC, CTX)
    if len(body) > 64 << 10:  # past a control file's 64 KiB: refused at the write
        assert await fuse_errno(fs.write(info.fh, 0, body)) == errno.EFBIG
    else:
        await fs.write(info.fh, 0, body)
        assert await fuse_errno(fs.flush(info.fh)) == errno.EINVAL
    await fs.release(info.fh)
    assert fs.unexpected == 0
    assert await fs.getxattr(snap, b"user.name", CTX) == b"j"


@pytest.mark.parametrize("order", ["released-first", "opened-first"])
async def test_a_refused_import_file_written_again_at_once_is_refused_the_same(
        fs: SnapfsOperations, order: str) -> None:
    """`dd seek=4G of=imports/x` twice in a row: close(2) returns before the kernel
    sends the first file's release, so the second writer may open the name the
    kernel still holds before or after that release arrives. Either way it meets
    EFBIG again, never ENOENT, and the file goes with the last close."""
    imports = await place(fs, "imports")
    info, attrs = await fs.create(imports, b"x", 0o644, os.O_WRONLY | os.O_CREAT, CTX)
    assert await fuse_errno(fs.write(info.fh, 4 << 30, b"\0")) == errno.EFBIG
    if order == "released-first":
        await fs.release(info.fh)
        assert await listing(fs, imports) == []
        again = await fs.open(attrs.st_ino, os.O_WRONLY, CTX)
    else:
        again = await fs.open(attrs.st_ino, os.O_WRONLY, CTX)
        await fs.release(info.fh)
        assert await listing(fs, imports) == ["x"]  # the second writer holds it
    assert await fuse_errno(fs.write(again.fh, 64 << 10, b"\0")) == errno.EFBIG
    await fs.flush(again.fh)
    await fs.release(again.fh)
    assert await listing(fs, imports) == []
    assert await fuse_errno(fs.lookup(imports, b"x", CTX)) == errno.ENOENT
    # A reader of the stale name is not a writer: nothing is made for it.
    assert await fuse_errno(fs.open(attrs.st_ino, os.O_RDONLY, CTX)) == errno.ENOENT
    assert await listing(fs, imports) == []
    assert fs.unexpected == 0


async def test_an_unexpected_exception_is_counted_and_logged_once(
        fs: SnapfsOperations, caplog: Any, monkeypatch: Any) -> None:
    snaps = await place(fs, "snapshots")

    async def broken(self: ViewNode) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ViewNode, "entries", broken)
    with caplog.at_level(logging.INFO, logger="snapfs.fs"):
        assert await fuse_errno(fs.opendir(snaps, CTX)) == errno.EIO
    assert fs.unexpected == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert errors[0].getMessage().startswith("opendir(snapshots/): failed unexpectedly")
