"""Fixtures for the local store: a real SQLite file and chunk store in a temp dir."""

from __future__ import annotations

import errno
import os
import textwrap
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import pytest
import trio

from snapfs.local import LocalService, open_local_service
from snapfs.model import Snapshot

MiB = 1 << 20
ZONE = "fr-par-1"


def write_volume(path: Path, size: int, runs: list[tuple[int, bytes]]) -> Path:
    """A sparse raw image of ``size`` bytes with ``runs`` of (offset, data) written."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in runs:
            f.seek(offset)
            f.write(data)
    return path


def random_bytes(n: int, seed: int = 0) -> bytes:
    """Deterministic incompressible bytes (blake3's extendable output: GB/s)."""
    import blake3
    return blake3.blake3(seed.to_bytes(8, "little")).digest(length=n)


#: The copy-on-write filesystems reflink shadows work on, and how to make one.
REFLINK_FILESYSTEMS = {
    "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q"],
}


@pytest.fixture(scope="session", params=sorted(REFLINK_FILESYSTEMS))
def reflink_root(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real XFS or btrfs filesystem (each test using it runs on both) on a loop
    device, for the reflink shadows (snapfs/local/shadows.py); always unmounted."""
    with loop_mounted(tmp_path_factory.mktemp(request.param), 4 << 30,
                      REFLINK_FILESYSTEMS[request.param]) as mnt:
        yield mnt


def fill_up(directory: Path, name: str = "filler") -> Path:
    """A file (appended to if it exists) taking every free byte of ``directory``'s
    filesystem."""
    filler = directory / name
    block = bytes(MiB)
    with open(filler, "ab", buffering=0) as f:
        for size in (MiB, 64 << 10, 4096, 512):
            try:
                while True:
                    f.write(block[:size])
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


@contextmanager
def loop_mounted(base: Path, size: int, mkfs: list[str]) -> Iterator[Path]:
    """A fresh filesystem (``mkfs`` + the image) of ``size`` bytes on a loop device,
    mounted at ``base``/mnt; always unmounted and its image removed after."""
    image, mnt = base / "fs.img", base / "mnt"
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run([*mkfs, str(image)], check=True, stdout=subprocess.DEVNULL)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)])
        image.unlink(missing_ok=True)


@pytest.fixture
def reflink_dir(reflink_root: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory of this test's own on the XFS or btrfs filesystem."""
    d = reflink_root / re.sub(r"[^\w.-]", "_", request.node.name)
    d.mkdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def shadow_files(store: Path) -> list[Path]:
    """The store's shadows (snapfs/local/shadows.py: shadows/<volume id>/
    <key>.<snapshot id>.<boot id>), sorted."""
    root = store / "shadows"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
async def service(store_dir: Path) -> AsyncIterator[LocalService]:
    async with open_local_service(store_dir) as svc:
        yield svc


@pytest.fixture
def volume_file(tmp_path: Path) -> Callable[..., Path]:
    """make(name, size, runs) -> path of a raw image in tmp_path."""
    def make(name: str, size: int, runs: list[tuple[int, bytes]]) -> Path:
        return write_volume(tmp_path / f"{name}.raw", size, runs)
    return make


async def wait_state(svc: LocalService, snapshot_id: str, zone: str = ZONE,
                     timeout: float = 60) -> Snapshot:
    """Poll until the snapshot leaves snapshotting/importing/exporting."""
    with trio.fail_after(timeout):
        while True:
            snap = await svc.get_snapshot(zone, snapshot_id)
            if snap.state not in ("snapshotting", "importing", "exporting"):
                return snap
            await trio.sleep(0.02)


async def snapshot_of(svc: LocalService, path: Path, name: str = "snap",
                      **kw: object) -> Snapshot:
    """A snapshot of the volume file at ``path`` (registered on first use), once
    its capture is done; it must be available."""
    vols = {v.path: v for v in await svc.list_all_volumes()}
    vol = vols.get(str(path)) or await svc.add_volume(path.stem, path)
    snap = await svc.create_snapshot(ZONE, name=name, volume_id=vol.id, **kw)  # type: ignore[arg-type]
    snap = await wait_state(svc, snap.id)
    assert snap.state == "available", snap.error_reason
    return snap


def proc_io(field: str) -> int:
    """A counter of this process's /proc/self/io (rchar, wchar: bytes through
    read-type and write-type system calls so far)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/io")


def bytes_read() -> int:
    return proc_io("rchar")


#: A process that starts a capture of argv[2] in store argv[1], slowed so that a
#: kill lands mid-way on any machine, and says "started" (for kill_mid_way).
PACED_CAPTURE = textwrap.dedent("""
    import sys, trio
    from snapfs.local import capture, open_local_service

    _read = capture.FileSource.read_batch
    async def paced(self, first, count):  # the kill lands mid-way on any machine
        await trio.sleep(0.05)
        if (first + count) * capture.CHUNK_SIZE >= self.size:
            await trio.sleep_forever()  # the end never comes: the kill cannot be late
        return await _read(self, first, count)
    capture.FileSource.read_batch = paced
    capture.GROUP_REFS = 16  # a commit (and progress) per batch

    async def main():
        async with open_local_service(sys.argv[1]) as svc:
            vol = await svc.add_volume("big", sys.argv[2])
            await svc.create_snapshot("fr-par-1", name="doomed", volume_id=vol.id)
            print("started", flush=True)
            await trio.sleep_forever()
    trio.run(main)
""")


def kill_mid_way(script: str, store_dir: Path, *args: object) -> int:
    """Run ``script`` (python -c, given the store and ``args``) -- it prints
    "started" once its snapshot 'doomed' is being made -- and SIGKILL it once that
    snapshot shows >= 10% progress; returns the progress last seen."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(store_dir),
                             *map(str, args)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
        db = sqlite3.connect(store_dir / "metadata.db")
        deadline = time.monotonic() + 60
        progress = 0
        while progress < 10 and time.monotonic() < deadline:
            row = db.execute("SELECT progress FROM snapshots WHERE name = 'doomed'").fetchone()
            progress = row[0] if row else 0
            time.sleep(0.005)
        db.close()
        return progress
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def deletes_done(svc: LocalService, timeout: float = 60) -> None:
    """Wait until the background half of every delete is over."""
    with trio.fail_after(timeout):
        while svc.freeing():
            await trio.sleep(0.02)


async def chunks_stored(svc: LocalService, timeout: float = 60) -> None:
    """Wait until no snapshot is read from its shadow any more (shadows.py): the
    chunks of every shadow-backed snapshot are stored."""
    with trio.fail_after(timeout):
        while svc.storing():
            await trio.sleep(0.02)


async def read_all(svc: LocalService, snapshot_id: str, zone: str = ZONE) -> bytes:
    reader = await svc.open_image(zone, snapshot_id)
    try:
        parts = []
        for off in range(0, reader.size, 4 * MiB):
            parts.append(await reader.read(off, 4 * MiB))
        return b"".join(parts)
    finally:
        await reader.aclose()


def chunk_place(svc: LocalService, idx: int) -> tuple[int, int]:
    """(pack, offset) of the chunk mapped at ``idx`` (in a store of one snapshot)."""
    pack, offset = svc.md.conn.execute(
        "SELECT c.pack, c.offset FROM chunks c JOIN snapshot_chunks m ON m.chunk = c.id "
        "WHERE m.idx = ?", (idx,)).fetchone()
    return int(pack), int(offset)


def flip_bits(store: Path, place: tuple[int, int], at: int, mask: int) -> None:
    """Corrupt one stored byte of a chunk, as a failing disk would."""
    pack, offset = place
    with open(store / "packs" / f"{pack:08d}.pack", "r+b") as f:
        f.seek(offset + at)
        byte = f.read(1)
        f.seek(offset + at)
        f.write(bytes([byte[0] ^ mask]))


def snapfs_cli(*args: str, store: Path | None = None, check: bool = False,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `snapfs` command (this interpreter's package) in a subprocess."""
    cmd = [sys.executable, "-m", "snapfs", *args]
    full_env = dict(os.environ, **(env or {}))
    if store is not None:
        full_env["SNAPFS_STORE"] = str(store)
    return subprocess.run(cmd, capture_output=True, text=True, check=check, env=full_env,
                          timeout=120)


@contextmanager
def lssd_volume(store: Path) -> Iterator[tuple[str, str]]:
    """A 1 MiB local SSD volume (the Instance API's, not Block's) made with the CLI
    in ``store``, a served one too: (name, id); removed afterwards."""
    name = f"lssd-{os.urandom(3).hex()}"
    res = snapfs_cli("volume", "create", name, "--size", "1M", "--type", "l_ssd", store=store)
    assert res.returncode == 0, res.stderr
    try:
        yield name, res.stdout.strip()
    finally:
        snapfs_cli("volume", "rm", name, store=store)


def write_elsewhere(path: Path, offset: int, data: bytes) -> None:
    """Overwrite in place from another process (dd): this one may hold a read lease
    on the file, whose break its main thread must answer (leases.py)."""
    subprocess.run(["dd", f"of={path}", "bs=4096", f"seek={offset}", "oflag=seek_bytes",
                    "conv=notrunc", "status=none"], input=data, check=True)


@contextmanager
def all_tokens_held(limiter: trio.CapacityLimiter) -> Iterator[None]:
    """Every token of ``limiter`` taken (without a checkpoint), given back at the
    end: the work that needs one stops at that point, deterministically."""
    tokens = [object() for _ in range(int(limiter.total_tokens))]
    for t in tokens:
        limiter.acquire_on_behalf_of_nowait(t)
    try:
        yield
    finally:
        for t in tokens:
            limiter.release_on_behalf_of(t)


async def tasks_waiting(limiter: trio.CapacityLimiter, count: int = 1) -> None:
    """Until ``count`` tasks wait for a token of ``limiter``."""
    with trio.fail_after(10):
        while limiter.statistics().tasks_waiting < count:
            await trio.sleep(0.001)


def undo_reference_counts(conn: sqlite3.Connection) -> None:
    """Turn a store back from schema 11: the index by chunk instead of the
    reference counts and their triggers (for tests of older stores)."""
    for trigger in ("ref", "unref", "reref"):
        conn.execute(f"DROP TRIGGER snapshot_chunks_{trigger}")
    conn.execute("ALTER TABLE chunks DROP COLUMN refs")
    conn.execute("CREATE INDEX snapshot_chunks_chunk ON snapshot_chunks (chunk)")
