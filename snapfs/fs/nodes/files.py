"""The files of a snapshot directory: ``image.raw`` (the bytes), ``snapshot.json``
(the API object; writing it = Set) and ``export`` (writing BUCKET/KEY = Export)."""

from __future__ import annotations

import json
import logging
import os

import trio

from ... import jsontext
from ...errors import InvalidArgument, Interrupted, NotFound, ReadOnly, Transient
from ...logtext import esc
from ...model import PRODUCING_STATES, Snapshot, check_readable
from ...procfs import read_text
from ...service import Buffer, ImageReader
from .. import transfer
from ..access import image_access
from ..allocation import image_blocks, places, seek
from ..attributes import IMAGE_BLKSIZE, Stat, file_stat, ns
from ..context import MAX_WAITING_OPENS, FsContext
from ..forget import forget_names
from ..keys import EXPORT, IMAGE, JSON, Key
from .base import BufferHandle, Handle, Node
from .views import snapshot_at

log = logging.getLogger(__name__)

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR
#: Largest snapshot.json accepted (a snapshot object is well under 8 KiB).
MAX_JSON = 64 << 10


def wants_write(flags: int) -> bool:
    return bool(flags & WRITE_FLAGS) or bool(flags & os.O_TRUNC)


def render_json(s: Snapshot) -> bytes:
    return (json.dumps(s.to_api(), indent=2) + "\n").encode()


class FileNode(Node):
    name = ""

    def describe(self) -> str:
        return f"{self.key.name} of snapshot {self.key.snapshot}"

    async def snapshot(self, max_age: float | None = None) -> Snapshot:
        return await snapshot_at(self.ctx, self.key.parent(), max_age)


class ImageNode(FileNode):
    async def stat(self) -> Stat:
        s = await self.snapshot()
        ctx = self.ctx
        uid, gid, mode = image_access(s, ctx.uid, ctx.gid, ctx.image_mode, ctx.image_owner)
        # mtime is when its bytes were taken, whatever happens to the snapshot
        # since (a rename, tags, an export): backup tools key their caches on it.
        # The attributes are kept as long as its siblings' (1 s), not longer: tags
        # move its ctime and st_nlink (the places it is listed), as theirs.
        return Stat(mode, s.size, ns(s.creation_date), ns(s.modification_date),
                    IMAGE_BLKSIZE, uid=uid, gid=gid, nlink=places(s),
                    blocks=await image_blocks(ctx, s))

    async def open(self, flags: int, pid: int) -> Handle:
        if wants_write(flags):
            raise ReadOnly(f"image.raw of snapshot {self.key.snapshot} is read-only")
        snap = await wait_until_readable(self.ctx, self.key, pid)
        reader = await self.ctx.svc.open_image(snap.zone, snap.id)
        self.ctx.open_images[snap.id] += 1
        # The reader serves FUSE directly: it reads ahead itself (readahead.py).
        return ImageHandle(self, reader, self.ctx.direct_io)


async def wait_until_readable(ctx: FsContext, key: Key, pid: int) -> Snapshot:
    """The snapshot once its bytes can be read: waits while it is being captured
    or imported, and stops waiting when the caller gets a signal (see
    ``signalled``). Each waiting open holds one of pyfuse3's request tasks
    (``MAX_TASKS``): past MAX_WAITING_OPENS an open is refused (EAGAIN), not
    queued, or a hundred ``cat``s of a snapshot being made stalled every request
    of the mount until its capture ended."""
    waiting = False
    try:
        while True:
            snap = await snapshot_at(ctx, key.parent(), max_age=0)
            if snap.state not in PRODUCING_STATES:
                check_readable(snap)  # a failed one: SnapshotUnusable
                return snap
            if pid and signalled(pid):
                raise Interrupted(f"process {pid} was signalled while waiting for snapshot "
                                  f"{snap.id} to be {snap.state.replace('ing', 'ed')}")
            if not waiting:
                if ctx.waiting_opens >= MAX_WAITING_OPENS:
                    raise Transient(f"{ctx.waiting_opens} opens already wait for snapshots "
                                    f"being made; snapshot {snap.id} is {snap.state}: "
                                    "open it once it is ready (snapfs wait)")
                ctx.waiting_opens += 1
                waiting = True
            await trio.sleep(ctx.poll_interval)
    finally:
        if waiting:
            ctx.waiting_opens -= 1


def signalled(pid: int) -> bool:
    """Whether the thread that made a request has a signal pending (or is gone).

    pyfuse3 does not pass on FUSE interrupts, and once a request has reached the
    daemon the kernel keeps the caller waiting for the answer, even for Ctrl-C or
    SIGKILL. The caller's pending, unblocked signals in /proc tell us instead;
    answering EINTR then lets it handle the signal (or die of it)."""
    try:
        text = read_text(f"/proc/{pid}/status")  # its Name: line is any bytes
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    except (FileNotFoundError, ProcessLookupError):
        return True
    try:
        pending = int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)
        blocked = int(fields["SigBlk"], 16)
    except (KeyError, ValueError):
        return False
    return bool(pending & ~blocked)


class ImageHandle(Handle):
    def __init__(self, node: Node, reader: ImageReader, direct_io: bool) -> None:
        super().__init__(node)
        self.reader = reader
        self.direct_io = direct_io
        # The bytes never change: with the page cache, keep what was read.
        self.keep_cache = not direct_io

    async def read(self, offset: int, size: int) -> Buffer:
        return await self.reader.read_transient(offset, size)  # replied before any await

    async def seek(self, offset: int, whence: int) -> int:
        r = self.reader
        return await seek(offset, whence, r.size, r.next_allocated, r.next_hole)

    async def release(self) -> None:
        ctx, sid = self.node.ctx, self.node.key.snapshot
        ctx.open_images[sid] -= 1
        if ctx.open_images[sid] <= 0:
            del ctx.open_images[sid]
        await self.reader.aclose()


class JsonNode(FileNode):
    async def stat(self) -> Stat:
        s = await self.snapshot()
        st = file_stat(True, len(render_json(s)), ns(s.modification_date),
                       ns(s.modification_date))
        st.nlink = places(s)
        return st

    async def open(self, flags: int, pid: int) -> Handle:
        s = await self.snapshot(max_age=0)
        return JsonHandle(self, render_json(s), wants_write(flags))


class JsonHandle(BufferHandle):
    """The whole object written is applied as Set when the file is closed."""

    async def apply(self, data: bytes) -> None:
        node = self.node
        assert isinstance(node, JsonNode)
        snap = Snapshot.from_api(jsontext.loads(data, "snapshot.json", MAX_JSON))
        if snap.id != node.key.snapshot:
            raise InvalidArgument("id", "cannot be changed")
        # Judged here, whichever backend: immutable fields refused, the ones the
        # service moves (state, error_reason, dates) ignored (Snapshot.check_set).
        before = await node.snapshot(max_age=0)
        snap.check_set(before)
        updated = await node.ctx.svc.set_snapshot(node.key.zone, snap)
        node.ctx.catalog.invalidate()
        node.ctx.catalog.remember(updated)
        forget_names(node.ctx, before, updated)
        log.info("snapshot.json of %s written: name %s, tags %s", updated.id,
                 esc(updated.name), esc(",".join(updated.tags)))


class ExportNode(FileNode):
    async def status(self) -> bytes:
        task_id = self.ctx.exports.get(self.key.snapshot)
        if task_id is None:
            await self.snapshot()  # ENOENT for a gone snapshot
            # Started before this mount (or by another client): ask the backend.
            task = await self.ctx.svc.latest_export(self.key.zone, self.key.snapshot)
            if task is None:
                return transfer.status_json(transfer.no_export_status())
            return transfer.status_json(transfer.task_status(task))
        try:
            task = await self.ctx.svc.get_task(self.key.zone, task_id)
        except NotFound:
            return transfer.status_json(transfer.no_export_status())
        return transfer.status_json(transfer.task_status(task))

    async def stat(self) -> Stat:
        s = await self.snapshot()
        st = file_stat(True, len(await self.status()), ns(s.modification_date),
                       ns(s.modification_date))
        st.nlink = places(s)
        return st

    async def open(self, flags: int, pid: int) -> Handle:
        # `echo b/k >> export`: the kernel writes past the status shown (its size
        # as last stat'ed); the target starts where the first write does, as a
        # sysfs or /proc control file takes it.
        return ExportHandle(self, await self.status(), wants_write(flags),
                            append=bool(flags & os.O_APPEND))


class TargetHandle(BufferHandle):
    """Writes of ``BUCKET/KEY``: checked as soon as a whole line is there (so
    ``echo`` sees EINVAL from write), else at close."""

    async def written(self) -> None:
        if transfer.line_complete(bytes(self.buffer)):
            await self.apply(self.consume())

    async def apply(self, data: bytes) -> None:
        await self.start(transfer.parse_target(data))

    async def start(self, target: transfer.Target) -> None:
        raise NotImplementedError


class ExportHandle(TargetHandle):
    async def start(self, target: transfer.Target) -> None:
        node = self.node
        assert isinstance(node, ExportNode)
        task = await node.ctx.svc.export_snapshot(node.key.zone, node.key.snapshot,
                                                  bucket=target.bucket, key=target.key)
        node.ctx.exports[node.key.snapshot] = task.id
        node.ctx.catalog.invalidate()
        node.ctx.catalog.forget(node.key.snapshot)
        log.info("export of snapshot %s to s3://%s/%s: task %s started", node.key.snapshot,
                 esc(target.bucket), esc(target.key), task.id)


FILE_NODES: dict[str, type[FileNode]] = {IMAGE: ImageNode, JSON: JsonNode, EXPORT: ExportNode}


def file_node(ctx: FsContext, key: Key) -> FileNode:
    """image.raw, snapshot.json or export (map.json: extents.snapshot_file)."""
    return FILE_NODES[key.name](ctx, key)

