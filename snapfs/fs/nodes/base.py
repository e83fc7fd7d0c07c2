"""The node protocol: what the Operations core asks of each place in the tree.

A node is built from its key on each request (it holds no state of its own;
state lives in the shared context's caches), answers what its place allows,
and refuses everything else with a domain error saying why.
"""

from __future__ import annotations

from ...errors import NoSuchAttribute, NotPermitted, NotSupported, ReadOnly, TooLarge
from ...service import Buffer
from ..allocation import seek
from ..attributes import Stat
from ..context import FsContext
from ..keys import Key

#: The most a control file (snapshot.json, export, imports/*) takes: a write or
#: truncate beyond is refused before any byte is allocated for it.
CONTROL_MAX = 64 << 10

#: (entry name, key, attributes) of one directory entry.
Entry = tuple[str, Key, Stat]


class Node:
    def __init__(self, ctx: FsContext, key: Key) -> None:
        self.ctx = ctx
        self.key = key

    def describe(self) -> str:
        return self.key.kind.value

    async def stat(self) -> Stat:
        raise NotImplementedError

    # --- directories -----------------------------------------------------------------

    async def lookup(self, name: str) -> Entry:
        raise NotPermitted(f"{self.describe()} is not a directory")

    async def entries(self) -> list[Entry]:
        raise NotPermitted(f"{self.describe()} is not a directory")

    async def mkdir(self, name: str) -> Entry:
        raise NotPermitted(f"mkdir {name!r}: snapshots are made only in volumes/<volume>/")

    async def rmdir(self, name: str) -> None:
        raise NotPermitted(f"rmdir {name!r}: only snapshot directories can be removed")

    async def rename(self, old: str, new_parent: Key, new: str) -> None:
        raise NotPermitted(f"rename {old!r}: only snapshot directories can be renamed, "
                           "within one directory")

    async def create(self, name: str) -> Entry:
        raise NotPermitted(f"create {name!r}: files are made only in imports/")

    async def unlink(self, name: str) -> None:
        raise NotPermitted(f"unlink {name!r}: nothing here can be removed that way")

    # --- extended attributes ---------------------------------------------------------

    async def xattrs(self) -> dict[str, str]:
        """Every attribute the node carries (names without ``user.``)."""
        return {}

    #: Attributes ``setfattr`` may change.
    writable_xattrs: frozenset[str] = frozenset()

    async def getxattr(self, name: str) -> str:
        attrs = await self.xattrs()
        if name not in attrs:
            raise NoSuchAttribute(f"{self.describe()} has no attribute user.{name}")
        return attrs[name]

    async def setxattr(self, name: str, value: str) -> None:
        await self._refuse_xattr(name)

    async def removexattr(self, name: str) -> None:
        await self._refuse_xattr(name, removing=True)

    async def _refuse_xattr(self, name: str, removing: bool = False) -> None:
        if name in await self.xattrs():
            raise NotPermitted(f"user.{name} of {self.describe()} is read-only")
        # What backup tools expect of a file without that attribute: setting an
        # unknown one is "not supported" (ENOTSUP), removing it "no data" (ENODATA).
        if removing:
            raise NoSuchAttribute(f"{self.describe()} has no attribute user.{name}")
        raise NotSupported(f"{self.describe()} has no attribute user.{name} to set")

    # --- files -----------------------------------------------------------------------

    async def open(self, flags: int, pid: int) -> "Handle":
        raise NotPermitted(f"{self.describe()} cannot be opened as a file")


class Handle:
    """An open file. ``direct_io``: reads always reach the daemon (contents that
    change, or that must come in large requests)."""

    direct_io = True
    keep_cache = False

    def __init__(self, node: Node) -> None:
        self.node = node

    async def read(self, offset: int, size: int) -> Buffer:
        raise ReadOnly("not open for reading")

    async def write(self, offset: int, data: bytes) -> int:
        raise ReadOnly(f"{self.node.describe()} is read-only")

    async def truncate(self, size: int) -> None:
        raise ReadOnly(f"{self.node.describe()} is read-only")

    async def seek(self, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE: a file without holes, by default."""
        return await without_holes(offset, whence, (await self.node.stat()).size)

    async def flush(self) -> None:
        """On every close(2); errors raised here are what close(2) returns."""

    async def release(self) -> None:
        """When the last descriptor is gone (errors here reach nobody)."""


class BufferHandle(Handle):
    """Reads of a document rendered at open (one consistent version per open),
    writes gathered in a buffer and applied by ``apply`` on close (flush)."""

    def __init__(self, node: Node, content: bytes, writable: bool,
                 append: bool = False) -> None:
        super().__init__(node)
        self.content = content
        self.writable = writable
        self.buffer = bytearray()
        self.dirty = False
        #: The file offset the buffer starts at: where what was applied (a line
        #: acted on, a close of a dup'd descriptor) ended. The next write on the
        #: same open goes on from there, so it is a document of its own, not
        #: one padded with the zeros of the part already applied.
        self._base = 0
        self._end = 0
        #: Opened O_APPEND: the first write's offset is where the document starts.
        self.append = append

    async def read(self, offset: int, size: int) -> bytes:
        return self.content[offset:offset + size]

    async def seek(self, offset: int, whence: int) -> int:
        """From what this open reads and wrote, not the node: the document was
        rendered at open, and its snapshot may be changed or deleted since (reads
        still answer; a stat would say ENOENT)."""
        size = len(self.content)
        if self.writable:
            size = max(size, len(self.buffer))
        return await without_holes(offset, whence, size)

    async def write(self, offset: int, data: bytes) -> int:
        if not self.writable:
            raise ReadOnly("not open for writing")
        if self.append and not self.dirty:
            self._base = self._end = offset
        self._check_size(offset + len(data) - (self._base if self.append else 0))
        if offset < self._base:  # written over what was applied: a new document
            self._base, self.buffer[:] = offset, b""
        self._end = max(self._end, offset + len(data))
        offset -= self._base
        if offset > len(self.buffer):
            self.buffer.extend(bytes(offset - len(self.buffer)))
        self.buffer[offset:offset + len(data)] = data
        self.dirty = True
        await self.written()
        return len(data)

    async def truncate(self, size: int) -> None:
        if not self.writable:
            raise ReadOnly(f"{self.node.describe()} is not open for writing")
        self._check_size(size)
        if size < self._base:
            self._base, self.buffer[:] = size, b""
        del self.buffer[size - self._base:]
        self._end = size
        self.dirty = True

    def _check_size(self, end: int) -> None:
        if end > CONTROL_MAX:
            raise TooLarge(f"{self.node.describe()} takes at most {CONTROL_MAX} bytes; "
                           f"refusing to extend it to {end}")

    async def written(self) -> None:
        """Called after each write (a complete line may be acted on at once)."""

    async def flush(self) -> None:
        if self.dirty:
            data = self.consume()
            await self.apply(data)

    def consume(self) -> bytes:
        """The buffer's bytes, taken to be applied; later writes start after them."""
        data, self.dirty = bytes(self.buffer), False
        self.buffer.clear()
        self._base = self._end
        return data

    async def apply(self, data: bytes) -> None:
        raise NotImplementedError


async def without_holes(offset: int, whence: int, size: int) -> int:
    """SEEK_DATA / SEEK_HOLE in a file of ``size`` bytes that has no holes."""
    async def at(offset: int) -> int:
        return offset

    async def end(offset: int) -> int:
        return size
    return await seek(offset, whence, size, at, end)
