"""``imports/``: writing ``BUCKET/KEY`` to ``imports/<name>`` creates snapshot
``<name>`` from that QCOW2 object; reading the file gives the import's status.

The API has no import task: an import is the snapshot it creates, whose state
(importing -> available, or error/invalid_data with a reason) is the status.
The directory lists the imports started through this mount, and any snapshot
of the project still ``importing`` (started elsewhere, or before a restart).
"""

from __future__ import annotations

import logging

from ...errors import AlreadyExists, NotFound
from ...logtext import esc
from ...model import Snapshot, check_name, name_problem
from .. import transfer
from ..attributes import Stat, file_stat
from ..context import ImportRecord
from ..forget import forget_entry
from ..keys import Kind, View, import_file
from .base import Entry, Handle, Node
from .files import TargetHandle, wants_write
from .hierarchy import ProjectNode, section_stat

log = logging.getLogger(__name__)


async def check_free(node: Node, name: str) -> None:
    """An import makes snapshot ``name``: refuse a name snapshots/ already lists,
    as mkdir does (two of one name would both be listed as labels)."""
    taken = await node.ctx.catalog.taken(node.key.zone, node.key.project,
                                         View(Kind.SNAPSHOTS), name)
    if taken is not None:
        raise AlreadyExists(f"imports/{name}: snapshots/{name} already exists (snapshot "
                            f"{taken.id}); an import makes a snapshot of that name")


class ImportsNode(Node):
    def describe(self) -> str:
        return "imports/"

    async def stat(self) -> Stat:
        return section_stat(self.key, await ProjectNode(self.ctx, self.key.parent()).stat())

    async def _importing(self) -> dict[str, Snapshot]:
        listing = await self.ctx.catalog.snapshots(self.key.zone, self.key.project,
                                                   View(Kind.SNAPSHOTS))
        # An import is listed by its snapshot's name: one the tree cannot show
        # (made elsewhere, before the naming rule) is left to snapshots/'s label.
        return {s.name: s for s in listing.items
                if s.state == "importing" and name_problem(s.name) is None}

    def _records(self) -> dict[str, ImportRecord]:
        return {r.name: r for (z, p, _), r in self.ctx.imports.items()
                if z == self.key.zone and p == self.key.project}

    async def _live_records(self) -> dict[str, ImportRecord]:
        """The records, less those whose snapshot was deleted since (forgotten
        here, so that no import of a gone snapshot lingers as ``pending``)."""
        records = self._records()
        for name, rec in list(records.items()):
            if rec.snapshot_id is None:
                continue
            try:
                await self.ctx.catalog.snapshot(self.key.zone, rec.snapshot_id)
            except NotFound:
                del records[name]
                self.ctx.imports.pop((self.key.zone, self.key.project, name), None)
                forget_entry(self.ctx, self.key, name)
                log.info("imports/%s: snapshot %s is gone; the import is forgotten",
                         esc(name), rec.snapshot_id)
        return records

    async def entries(self) -> list[Entry]:
        names = list(await self._live_records())
        names += [n for n in await self._importing() if n not in names]
        out = []
        for name in names:
            key = import_file(self.key.zone, self.key.project, name)
            out.append((name, key, await ImportNode(self.ctx, key).stat()))
        return out

    async def lookup(self, name: str) -> Entry:
        if name not in await self._live_records() and name not in await self._importing():
            raise NotFound("import", name)
        key = import_file(self.key.zone, self.key.project, name)
        return name, key, await ImportNode(self.ctx, key).stat()

    async def create(self, name: str) -> Entry:
        check_name(name)
        if name in self._records():
            raise AlreadyExists(f"imports/{name} already exists")
        await check_free(self, name)
        self.ctx.imports[(self.key.zone, self.key.project, name)] = ImportRecord(
            self.key.zone, self.key.project, name)
        key = import_file(self.key.zone, self.key.project, name)
        return name, key, await ImportNode(self.ctx, key).stat()

    async def unlink(self, name: str) -> None:
        """Forgets the record of an import (the snapshot stays)."""
        if self.ctx.imports.pop((self.key.zone, self.key.project, name), None) is None:
            raise NotFound("import", name)
        self.ctx.catalog.invalidate()  # the listing answers from the current states


class ImportNode(Node):
    def describe(self) -> str:
        return f"imports/{self.key.name}"

    @property
    def record(self) -> ImportRecord | None:
        return self.ctx.imports.get((self.key.zone, self.key.project, self.key.name))

    async def _snapshot(self) -> Snapshot | None:
        rec = self.record
        if rec is not None and rec.snapshot_id is not None:
            try:
                return await self.ctx.catalog.snapshot(self.key.zone, rec.snapshot_id)
            except NotFound:
                return None
        if rec is None:
            for s in (await self.ctx.catalog.snapshots(self.key.zone, self.key.project,
                                                       View(Kind.SNAPSHOTS))).items:
                if s.name == self.key.name and s.state == "importing":
                    return s
            raise NotFound("import", self.key.name)
        return None

    async def status(self) -> bytes:
        rec = self.record
        snap = await self._snapshot()
        return transfer.status_json(transfer.import_status(
            rec.target if rec else None, snap, rec.error if rec else None))

    async def stat(self) -> Stat:
        return file_stat(True, len(await self.status()), self.ctx.mounted_ns,
                         self.ctx.mounted_ns)

    async def open(self, flags: int, pid: int) -> Handle:
        writable = wants_write(flags)
        if writable and self.record is None:
            await self._made_again()
        handle = ImportHandle(self, await self.status(), writable)
        if writable and handle.record is not None:
            handle.record.writers += 1
        return handle

    async def _made_again(self) -> None:
        """A writer opens a name whose refused file went at its close. close(2)
        returns before the kernel sends its release, so the kernel may still hold
        the name when the next writer (`dd` again) opens it, and FUSE strips
        O_CREAT from an open: the writer is making the file anew, as it asked."""
        try:
            await self._snapshot()  # an import of that name started elsewhere: as is
            return
        except NotFound:
            pass
        name = check_name(self.key.name)
        await check_free(self, name)
        self.ctx.imports[(self.key.zone, self.key.project, name)] = ImportRecord(
            self.key.zone, self.key.project, name)


class ImportHandle(TargetHandle):
    def __init__(self, node: ImportNode, content: bytes, writable: bool) -> None:
        super().__init__(node, content, writable)
        #: The record this handle counts in (as a writer), whatever replaces it later.
        self.record = node.record if writable else None

    async def start(self, target: transfer.Target) -> None:
        node = self.node
        assert isinstance(node, ImportNode)
        rec = node.record
        if rec is None or rec.snapshot_id is not None:
            raise AlreadyExists(f"imports/{node.key.name} was already started; remove the "
                                "file to import again")
        with node.ctx.claim(node.key.zone, node.key.project, node.key.name, node.describe()):
            await check_free(node, node.key.name)  # a mkdir may have taken it since
            snap = await node.ctx.svc.create_snapshot(
                node.key.zone, name=node.key.name, bucket=target.bucket, key=target.key,
                project=node.key.project, unique_name=True)
            rec.target, rec.snapshot_id = target, snap.id
            node.ctx.catalog.invalidate()
            node.ctx.catalog.remember(snap)
        log.info("import %s from s3://%s/%s: snapshot %s started", esc(node.key.name),
                 esc(target.bucket), esc(target.key), snap.id)

    async def release(self) -> None:
        """A file whose write started no import (refused, or never written) goes
        with its last close: imports/ lists only imports that exist."""
        node = self.node
        assert isinstance(node, ImportNode)
        rec = self.record
        if rec is None:
            return
        rec.writers -= 1
        # Another writer may still hold it open (a second `dd` that opened the
        # name before this release came): it goes with the last one.
        if rec.writers <= 0 and rec.snapshot_id is None and node.record is rec:
            node.ctx.imports.pop((node.key.zone, node.key.project, node.key.name), None)
            forget_entry(node.ctx, node.key.parent(), node.key.name)
            log.info("imports/%s: closed without an import started; removed",
                     esc(node.key.name))
