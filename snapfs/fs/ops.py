"""The pyfuse3 Operations: turns kernel requests into node calls.

This is the only place where domain errors become ``FUSEError``: every handler
goes through ``refusals``, which answers with the errno of the one table in
``snapfs.errors`` and logs one line saying why. Nodes below raise only domain
errors.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import weakref
from typing import Any, Awaitable, Callable, TypeVar

import pyfuse3

from ..service import Buffer
from ..errors import (InvalidArgument, NameTooLong, NotFound, NotPermitted, NotSupported,
                      ReadOnly, SnapfsError, errno_for)
from ..model import NAME_MAX_BYTES
from ..logtext import esc
from .attributes import Stat, xattr_value
from .context import FsContext
from .keys import Key
from .nodes import Entry, Handle, Node, node_for

log = logging.getLogger("snapfs.fs")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

XATTR_PREFIX = "user."
#: statfs: free inodes reported (nodes are numbered on demand, without limit).
FREE_INODES = 1 << 32
#: Lookups of absent names and attributes are questions, not refusals: they are
#: logged at debug level only (ls, shells and editors ask for many of them).
QUIET = frozenset({errno.ENOENT, errno.ENODATA, errno.EOPNOTSUPP})
#: Refusals of a request that are ordinary answers (lseek's ENXIO: no data
#: follows); any other refusal of it is logged as refusals are.
QUIET_OPS = {"lseek": frozenset({errno.ENXIO})}


#: Handler arguments that say what a request is about, as rendered in its log
#: line; the rest (attributes, flags, modes, offsets, contexts) are left out.
_INODE_ARGS = ("inode", "parent_inode", "parent_inode_old", "parent_inode_new",
               "new_parent_inode")
_NAME_ARGS = ("name", "name_old", "name_new", "new_name", "target")


def _described(ops: "SnapfsOperations", params: list[str], args: tuple[Any, ...]) -> str:
    """The request's arguments for a log line: inodes as the place in the tree
    they are, open files as their node, names escaped; never an object repr."""
    parts = []
    for param, value in zip(params, args):
        if param in _INODE_ARGS and isinstance(value, int):
            parts.append(ops.where(value))
        elif param == "fh" and isinstance(value, int):
            handle = ops._handles.get(value)
            parts.append(handle.node.describe() if handle is not None else f"fh {value}")
        elif param in _NAME_ARGS and isinstance(value, bytes):
            parts.append(esc(value))
    return ", ".join(parts)


def refusals(fn: F) -> F:
    """Domain errors -> FUSEError(errno_for(exc)), with one log line; anything
    unexpected is a bug: logged once with its traceback, counted in
    ``unexpected``, and answered as the table's default (EIO)."""
    op = fn.__name__
    params = list(inspect.signature(fn).parameters)[1:]

    @functools.wraps(fn)
    async def wrapper(self: "SnapfsOperations", *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except SnapfsError as exc:
            code, reason = errno_for(exc), str(exc)
        except Exception:
            self.unexpected += 1
            log.exception("%s(%s): failed unexpectedly (bug #%d of this mount)", op,
                          _described(self, params, args), self.unexpected)
            raise pyfuse3.FUSEError(errno_for(SnapfsError())) from None
        quiet = (code in QUIET and op != "setxattr"  # a set is a request, not a question
                 or code in QUIET_OPS.get(op, ()))
        log.log(logging.DEBUG if quiet else logging.INFO, "%s(%s): %s: %s", op,
                _described(self, params, args), errno.errorcode.get(code, code), reason)
        raise pyfuse3.FUSEError(code) from None

    return wrapper  # type: ignore[return-value]


class DirListing(list[Entry]):
    """A directory's entries as an opendir took them, shared by every handle
    opened on the same contents: 1,000 open handles of a 10,000-entry directory
    hold one copy, not 1,000 (memory grows with the data, never with clients).
    A list that can be referred to weakly: it goes with its last handle."""

    __slots__ = ("__weakref__",)


class SnapfsOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, ctx: FsContext) -> None:
        super().__init__()
        self.ctx = ctx
        self._handles: dict[int, Handle] = {}
        self._dirs: dict[int, DirListing] = {}
        #: The latest listing of each directory while a handle holds it: an
        #: opendir that finds the same entries shares it.
        self._listings: weakref.WeakValueDictionary[Key, DirListing] = \
            weakref.WeakValueDictionary()
        self._next_fh = 1
        #: Requests that failed with an unexpected exception (a bug each).
        self.unexpected = 0

    # --- helpers ---------------------------------------------------------------------

    def node(self, inode: int) -> Node:
        return node_for(self.ctx, self.ctx.inodes.key(inode))

    def attrs(self, key: Key, st: Stat, entry: bool = False) -> pyfuse3.EntryAttributes:
        """``entry``: the reply gives the kernel an entry, which it holds until
        it sends FORGET (lookup, mkdir, create)."""
        a = pyfuse3.EntryAttributes()
        inodes = self.ctx.inodes
        a.st_ino = inodes.looked_up(key) if entry else inodes.inode(key)
        a.generation = 0
        a.st_mode = st.mode
        a.st_nlink = st.nlink if st.nlink is not None else (2 if st.is_dir else 1)
        a.st_uid = self.ctx.uid if st.uid is None else st.uid
        a.st_gid = self.ctx.gid if st.gid is None else st.gid
        a.st_size = st.size
        a.st_blksize = st.blksize
        a.st_blocks = st.blocks if st.blocks is not None else (st.size + 511) // 512
        a.st_mtime_ns = a.st_atime_ns = st.mtime_ns
        a.st_ctime_ns = st.ctime_ns
        a.attr_timeout = a.entry_timeout = st.timeout
        return a

    def _fh(self) -> int:
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        return fh

    def handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise InvalidArgument("fh", f"no open file {fh}") from None

    def where(self, inode: int) -> str:
        """The place ``inode`` is in the tree, for log lines."""
        try:
            return self.node(inode).describe()
        except Exception:  # a log line must never fail the request it describes
            return f"inode {inode}"

    @staticmethod
    def name(raw: bytes, absent: bool = False) -> str:
        """A name the kernel passed, as text. Names are UTF-8: anything else is
        refused (EINVAL), or, where a name is looked for (``absent``), not there.
        No entry has more than 255 bytes (the kernel checks only PATH_MAX)."""
        if len(raw) > NAME_MAX_BYTES:
            raise NameTooLong("name", f"{esc(raw[:32])}... is {len(raw)} bytes: a name has "
                                      f"{NAME_MAX_BYTES} at most")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            if absent:
                raise NotFound("entry", esc(raw)) from None
            raise InvalidArgument("name", f"{esc(raw)} is not valid UTF-8") from None

    # --- attributes and lookup -------------------------------------------------------

    @refusals
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                     ) -> pyfuse3.EntryAttributes:
        parent = self.ctx.inodes.key(parent_inode)
        n = self.name(name, absent=True)
        if n in (".", ".."):
            key = parent if n == "." else parent.parent()
            return self.attrs(key, await node_for(self.ctx, key).stat(), entry=True)
        _, key, st = await node_for(self.ctx, parent).lookup(n)
        return self.attrs(key, st, entry=True)

    @refusals
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        key = self.ctx.inodes.key(inode)
        return self.attrs(key, await node_for(self.ctx, key).stat())

    @refusals
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None, ctx: Any
                      ) -> pyfuse3.EntryAttributes:
        key = self.ctx.inodes.key(inode)
        node = node_for(self.ctx, key)
        if fields.update_size:
            handle = self._handles.get(fh) if fh else None
            if handle is None or handle.node.key != key:
                raise ReadOnly(f"{node.describe()} can only be written through an open file")
            await handle.truncate(attr.st_size)
        elif (fields.update_mode or fields.update_uid or fields.update_gid):
            raise NotPermitted(f"the mode and owner of {node.describe()} are fixed")
        # Times (touch) are accepted and ignored: they come from the service.
        return self.attrs(key, await node.stat())

    async def forget(self, inode_list: Any) -> None:
        # The numbers stay in the store's map (inodes.py); only memory is freed.
        for inode, count in inode_list:
            self.ctx.inodes.forget(inode, count)

    @refusals
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_namemax = 255
        # df -i reads f_files - f_ffree as used: the nodes held in memory. A free
        # count of 0 read as "100% of inodes used" and set off disk monitors;
        # nodes are not a resource that runs out here, so plenty are free.
        st.f_ffree = st.f_favail = FREE_INODES
        st.f_files = len(self.ctx.inodes) + FREE_INODES
        return st

    # --- directories -----------------------------------------------------------------

    @refusals
    async def opendir(self, inode: int, ctx: Any) -> int:
        key = self.ctx.inodes.key(inode)
        entries = await node_for(self.ctx, key).entries()
        # `.` and `..` first, as ls -a, find and backup tools expect them.
        here = await node_for(self.ctx, key).stat()
        up = key.parent()
        entries[:0] = [(".", key, here),
                       ("..", up, here if up == key else await node_for(self.ctx, up).stat())]
        # The handle's own copy is built, then dropped if the last one is the same
        # (comparing costs what building did; a changed directory gets a new one).
        listing = self._listings.get(key)
        if listing is None or listing != entries:
            listing = self._listings[key] = DirListing(entries)
        fh = self._fh()
        self._dirs[fh] = listing
        return fh

    @refusals
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries: list[Entry] = self._dirs.get(fh) or []
        for i in range(start_id, len(entries)):
            name, key, st = entries[i]
            a = self.attrs(key, st)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), a, i + 1):
                break
            if name not in (".", ".."):  # readdirplus: the kernel holds the entry
                self.ctx.inodes.hold(key, a.st_ino)

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @refusals
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any
                    ) -> pyfuse3.EntryAttributes:
        _, key, st = await self.node(parent_inode).mkdir(self.name(name))
        return self.attrs(key, st, entry=True)

    @refusals
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.node(parent_inode).rmdir(self.name(name, absent=True))

    @refusals
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise NotPermitted("snapshots cannot be exchanged")
        if flags & ~pyfuse3.RENAME_NOREPLACE:  # RENAME_WHITEOUT (overlayfs), or newer
            # NOREPLACE is what every rename here does (a taken name is refused).
            raise InvalidArgument("rename flags", f"{flags:#x} not supported")
        await self.node(parent_inode_old).rename(
            self.name(name_old, absent=True), self.ctx.inodes.key(parent_inode_new),
            self.name(name_new))

    @refusals
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.node(parent_inode).unlink(self.name(name, absent=True))

    # Links and special files have no meaning in the tree: refused from the one
    # table (EPERM) rather than left to pyfuse3's default ENOSYS.

    @refusals
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any
                      ) -> pyfuse3.EntryAttributes:
        raise NotPermitted(f"symlink {esc(name)} in {self.where(parent_inode)}: "
                           "the tree holds no symbolic links")

    @refusals
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
                    ) -> pyfuse3.EntryAttributes:
        raise NotPermitted(f"mknod {esc(name)} in {self.where(parent_inode)}: "
                           "the tree holds no special files")

    @refusals
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
                   ) -> pyfuse3.EntryAttributes:
        raise NotPermitted(f"link {esc(new_name)} in {self.where(new_parent_inode)}: "
                           "the tree holds no hard links")

    # --- files -----------------------------------------------------------------------

    def _open_handle(self, handle: Handle) -> pyfuse3.FileInfo:
        fh = self._fh()
        self._handles[fh] = handle
        return pyfuse3.FileInfo(fh=fh, direct_io=handle.direct_io, keep_cache=handle.keep_cache)

    @refusals
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        _, key, st = await self.node(parent_inode).create(self.name(name))
        handle = await node_for(self.ctx, key).open(flags | os.O_WRONLY, ctx.pid)
        return self._open_handle(handle), self.attrs(key, st, entry=True)

    @refusals
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        return self._open_handle(await self.node(inode).open(flags, ctx.pid if ctx else 0))

    @refusals  # pyfuse3 replies with any buffer, at once: a view saves a copy
    async def read(self, fh: int, off: int, size: int) -> Buffer:  # type: ignore[override]
        return await self.handle(fh).read(off, size)

    @refusals
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.handle(fh).write(off, buf)

    @refusals  # SEEK_DATA / SEEK_HOLE (pyfuse3 with lseek: scripts/pyfuse3-lseek.patch)
    async def lseek(self, fh: int, off: int, whence: int) -> int:
        return await self.handle(fh).seek(off, whence)

    @refusals
    async def flush(self, fh: int) -> None:
        await self.handle(fh).flush()

    @refusals
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None:
            await handle.release()

    # --- extended attributes ---------------------------------------------------------

    @staticmethod
    def _xattr_name(raw: bytes) -> str:
        name = raw.decode("utf-8", "replace")
        if not name.startswith(XATTR_PREFIX):
            # ENOTSUP (not ENODATA): ls -l and cp -a then stop asking for ACLs and
            # SELinux labels on this filesystem after the first file.
            raise NotSupported(f"only user.* attributes exist here, not {esc(name)}")
        return name[len(XATTR_PREFIX):]

    @refusals
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return xattr_value(await self.node(inode).getxattr(self._xattr_name(name)))

    @refusals
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return [(XATTR_PREFIX + n).encode() for n in await self.node(inode).xattrs()]

    @refusals
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        raw = name.decode("utf-8", "replace")
        if not raw.startswith(XATTR_PREFIX):
            raise NotPermitted(f"only user.* attributes can be set, not {esc(raw)}")
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(raw, "must be UTF-8 text") from None
        await self.node(inode).setxattr(raw[len(XATTR_PREFIX):], text)

    @refusals
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        raw = name.decode("utf-8", "replace")
        if not raw.startswith(XATTR_PREFIX):
            raise NotPermitted(f"only user.* attributes can be removed, not {esc(raw)}")
        await self.node(inode).removexattr(raw[len(XATTR_PREFIX):])
