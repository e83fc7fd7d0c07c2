"""Property test of hostile input against the filesystem operations (issue 13):
names, tags and snapshot.json bodies drawn by hypothesis, applied through the
Operations object on a real store. For every input: the errno is in the allowed
set, a refusal changed nothing, an accepted change obeys the rules (and is
undone), and nothing was logged as a bug.

The store and the Operations live in a trio run on a thread of their own for
the whole test, so that each example costs a few requests, not a new store.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import pyfuse3
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures_store import ZONE, random_bytes, wait_state, write_volume
from snapfs.errors import InvalidArgument
from snapfs.fs.context import FsContext
from snapfs.fs.ops import SnapfsOperations
from snapfs.local import open_local_service
from snapfs.model import check_name, check_tags
from test_fs_ops import CTX

SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


class Harness:
    """The Operations on a store, driven from the test's thread."""

    def __init__(self, store: Path, volume: Path) -> None:
        self.store, self.volume = store, volume
        self.ready = threading.Event()
        self.stop: trio.Event | None = None
        self.token: trio.lowlevel.TrioToken | None = None
        self.error: BaseException | None = None
        self.ops: SnapfsOperations | None = None
        self.ino: dict[str, int] = {}

    def run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc
        finally:
            self.ready.set()

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.stop = trio.Event()
        async with open_local_service(self.store) as svc, trio.open_nursery() as nursery:
            await svc.add_volume("vol1", self.volume)
            ctx = FsContext.create(svc)
            ops = self.ops = SnapfsOperations(ctx)
            root = pyfuse3.ROOT_INODE
            for path in (("volumes", "vol1"), ("snapshots",), ("imports",), ("tags",)):
                ino = root
                for name in (ZONE, "default", *path):
                    ino = (await ops.lookup(ino, name.encode(), CTX)).st_ino
                self.ino[path[-1]] = ino
            attrs = await ops.mkdir(self.ino["vol1"], b"keep", 0o755, CTX)
            sid = (await ops.getxattr(attrs.st_ino, b"user.id", CTX)).decode()
            await wait_state(svc, sid)
            self.ino["keep"] = attrs.st_ino
            self.ino["json"] = (await ops.lookup(attrs.st_ino, b"snapshot.json", CTX)).st_ino
            self.ready.set()
            await self.stop.wait()
            nursery.cancel_scope.cancel()

    def call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return trio.from_thread.run(fn, *args, trio_token=self.token)

    def errno_of(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> int:
        """0 when the request succeeds, else its errno."""
        try:
            self.call(fn, *args)
        except pyfuse3.FUSEError as exc:
            return exc.errno
        return 0

    async def _state(self) -> dict[str, Any]:
        ops = self.ops
        assert ops is not None
        out: dict[str, Any] = {}
        for d in ("snapshots", "imports", "tags", "vol1"):
            fh = await ops.opendir(self.ino[d], CTX)
            out[d] = sorted(name for name, _, _ in ops._dirs[fh])
            await ops.releasedir(fh)
        info = await ops.open(self.ino["json"], os.O_RDONLY, CTX)
        out["json"] = json.loads(bytes(await ops.read(info.fh, 0, 1 << 16)))
        await ops.release(info.fh)
        out["json"].pop("modification_date")
        return out

    def state(self) -> dict[str, Any]:
        return self.call(self._state)  # type: ignore[no-any-return]

    async def write_json(self, body: bytes) -> None:
        ops = self.ops
        assert ops is not None
        info = await ops.open(self.ino["json"], os.O_WRONLY | os.O_TRUNC, CTX)
        try:
            await ops.write(info.fh, 0, body)
            await ops.flush(info.fh)
        finally:
            await ops.release(info.fh)


class Bugs(logging.Handler):
    """Every record at ERROR or above, and every record carrying a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    base = tmp_path_factory.mktemp("fuzz")
    volume = write_volume(base / "vol1.raw", 1 << 20, [(0, random_bytes(8192, seed=5))])
    h = Harness(base / "store", volume)
    thread = threading.Thread(target=h.run, daemon=True)
    thread.start()
    h.ready.wait(120)
    if h.error is not None:
        raise h.error
    bugs = Bugs()
    logging.getLogger("snapfs").addHandler(bugs)
    try:
        yield h
    finally:
        logging.getLogger("snapfs").removeHandler(bugs)
        if h.token is not None and h.stop is not None:
            trio.from_thread.run_sync(h.stop.set, trio_token=h.token)
        thread.join(60)
    assert not thread.is_alive()
    assert h.error is None, h.error
    assert h.ops is not None and h.ops.unexpected == 0
    assert bugs.records == [], [r.getMessage() for r in bugs.records]


def _valid_name(raw: bytes) -> str | None:
    try:
        return check_name(raw.decode("utf-8"))
    except (UnicodeDecodeError, InvalidArgument):
        return None


#: Names: arbitrary bytes, arbitrary text, and text near the rule's edges.
names = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.text(alphabet=st.sampled_from("ab~/.\\\n\x00\x85 é-"), max_size=12).map(str.encode),
    st.uuids().map(lambda u: str(u).encode()),
    st.integers(250, 260).map(lambda n: b"n" * n),
)


@SETTINGS
@given(raw=names)
def test_names(harness: Harness, raw: bytes) -> None:
    ops = harness.ops
    assert ops is not None
    before = harness.state()
    valid = _valid_name(raw)
    taken = valid == "keep"
    # A path component over 255 bytes: ENAMETOOLONG, lookups included.
    refused = errno.ENAMETOOLONG if len(raw) > 255 else errno.EINVAL
    absent = errno.ENAMETOOLONG if len(raw) > 255 else errno.ENOENT

    code = harness.errno_of(ops.rename, harness.ino["snapshots"], b"keep",
                            harness.ino["snapshots"], raw, 0, CTX)
    if valid is None:
        assert code == refused
    else:
        assert code == 0
        harness.call(ops.rename, harness.ino["snapshots"], raw, harness.ino["snapshots"],
                     b"keep", 0, CTX)
    assert harness.state() == before

    code = harness.errno_of(ops.setxattr, harness.ino["keep"], b"user.name", raw, CTX)
    assert code == (0 if valid is not None else errno.EINVAL)
    harness.call(ops.setxattr, harness.ino["keep"], b"user.name", b"keep", CTX)
    assert harness.state() == before

    code = harness.errno_of(ops.create, harness.ino["imports"], raw, 0o644, os.O_WRONLY, CTX)
    if valid is None or taken:
        assert code == (errno.EEXIST if taken else refused)
    else:
        assert code == 0
        harness.call(ops.unlink, harness.ino["imports"], raw, CTX)
    assert code != 0 or harness.state() == before

    code = harness.errno_of(ops.mkdir, harness.ino["vol1"], raw, 0o755, CTX)
    if valid is None or taken:
        assert code == (errno.EEXIST if taken else refused)
    else:
        assert code == 0
        harness.call(ops.rmdir, harness.ino["vol1"], raw, CTX)
    assert harness.state() == before
    for op in (ops.lookup, ops.rmdir):
        if raw not in (b".", b"..", b"keep"):
            assert harness.errno_of(op, harness.ino["snapshots"], raw, CTX) == absent


#: user.tags values: comma-separated lists of arbitrary tags, and raw bytes.
tag_values = st.one_of(
    st.lists(st.text(max_size=20), max_size=70).map(lambda t: ",".join(t).encode(
        "utf-8", "surrogatepass")),
    st.lists(st.sampled_from(["a", "b", ".", "..", "x" * 129, "a\nb", "~", "ok"]),
             max_size=5).map(lambda t: ",".join(t).encode()),
    st.binary(max_size=200),
)


@SETTINGS
@given(value=tag_values)
def test_tags(harness: Harness, value: bytes) -> None:
    ops = harness.ops
    assert ops is not None
    before = harness.state()
    try:
        text = value.decode("utf-8")
        expected: list[str] | None = check_tags([] if text == "" else text.split(","))
    except (UnicodeDecodeError, InvalidArgument):
        expected = None
    code = harness.errno_of(ops.setxattr, harness.ino["keep"], b"user.tags", value, CTX)
    if expected is None:
        assert code == errno.EINVAL
    else:
        assert code == 0
        got = harness.call(ops.getxattr, harness.ino["keep"], b"user.tags", CTX)
        assert got.decode() == ",".join(expected)
        harness.call(ops.setxattr, harness.ino["keep"], b"user.tags", b"", CTX)
    assert harness.state() == before


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=10)
FIELDS = ["id", "name", "organization", "project", "tags", "volume_type", "size", "state",
          "base_volume", "creation_date", "modification_date", "error_reason", "zone", "extra"]


@st.composite
def json_bodies(draw: st.DrawFn) -> tuple[bytes, dict[str, Any] | None]:
    """(body, changes): the current object with some fields replaced, or bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=200)), None
    changes = draw(st.dictionaries(st.sampled_from(FIELDS), json_values | st.text(max_size=30)
                                   | st.lists(st.text(max_size=10), max_size=4), max_size=3))
    return b"", changes


@SETTINGS
@given(body=json_bodies())
def test_snapshot_json(harness: Harness, body: tuple[bytes, dict[str, Any] | None]) -> None:
    ops = harness.ops
    assert ops is not None
    before = harness.state()
    raw, changes = body
    if changes is not None:
        info = harness.call(ops.open, harness.ino["json"], os.O_RDONLY, CTX)
        current = json.loads(bytes(harness.call(ops.read, info.fh, 0, 1 << 16)))
        harness.call(ops.release, info.fh)
        raw = json.dumps({**current, **changes}).encode()
    code = harness.errno_of(harness.write_json, raw)
    assert code in (0, errno.EINVAL)
    after = harness.state()
    if code != 0:
        assert after == before
        return
    # Accepted: only the name and tags changed, and they obey the rules.
    changed = {k for k in after["json"] if after["json"][k] != before["json"][k]}
    assert changed <= {"name", "tags"}
    check_name(after["json"]["name"])
    assert check_tags(after["json"]["tags"]) == after["json"]["tags"]
    harness.call(ops.setxattr, harness.ino["keep"], b"user.name", b"keep", CTX)
    harness.call(ops.setxattr, harness.ino["keep"], b"user.tags", b"", CTX)
    assert harness.state() == before


#: lseek offsets: anywhere in off_t, and near the edges of a 1 MiB file.
offsets = st.one_of(st.integers(-2**63, 2**63 - 1), st.integers(-3, (1 << 20) + 3),
                    st.sampled_from([2**62, 2**63 - 1, -2**63, (1 << 20) - 1]))


@SETTINGS
@given(offset=offsets, whence=st.integers(-2, 6), which=st.sampled_from(["image", "json"]))
def test_lseek(harness: Harness, offset: int, whence: int, which: str) -> None:
    """Any offset and whence the kernel could pass (it sends only SEEK_DATA and
    SEEK_HOLE, but nothing else may escape): ENXIO outside the file, EINVAL for
    another whence, else a landing the file's allocation allows; nothing changed."""
    ops = harness.ops
    assert ops is not None
    before = harness.state()
    ino = harness.ino["json"]
    if which == "image":
        ino = harness.call(ops.lookup, harness.ino["keep"], b"image.raw", CTX).st_ino
    size = harness.call(ops.getattr, ino, CTX).st_size
    info = harness.call(ops.open, ino, os.O_RDONLY, CTX)
    try:
        try:
            got, code = harness.call(ops.lseek, info.fh, offset, whence), 0
        except pyfuse3.FUSEError as exc:
            got, code = None, exc.errno
    finally:
        harness.call(ops.release, info.fh)
    if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
        assert code == errno.EINVAL
    elif not 0 <= offset < size:
        assert code == errno.ENXIO
    elif whence == os.SEEK_DATA:
        # The image's one chunk holds data, as the whole document does: data at once.
        assert (code, got) == (0, offset)
    else:
        assert (code, got) == (0, size)  # no hole before the end
    assert harness.state() == before
