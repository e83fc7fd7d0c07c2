"""Bounded work through the real mount: a burst of snapshots of one volume runs
through the capture queue (bounded memory, the volume read once), and control
files refuse writes beyond 64 KiB before allocating anything."""

from __future__ import annotations

import errno
import json
import os
import resource
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from fixtures_mount import MiB, Mount, random_volume, run, snapfs
from fixtures_store import fill_up

pytestmark = pytest.mark.mount

VOLUME = 128 * MiB


def proc_field(pid: int, name: str, field: str) -> int:
    """A counter of /proc/PID/<name> (status: kB values, io: bytes)."""
    for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/{name}")


@pytest.fixture
def busy_mount(tmp_path: Path, mount_factory: Callable[..., Mount]) -> tuple[Mount, Path]:
    """A mount of a store with volume ``disk``: 128 MiB of incompressible data."""
    vol = tmp_path / "disk.raw"
    with open(vol, "wb") as f:
        for _ in range(VOLUME // MiB):
            f.write(os.urandom(MiB))
    store = tmp_path / "store"
    snapfs("volume", "add", "disk", vol, "--store", store)
    return mount_factory(store), vol


def test_a_burst_of_mkdirs_is_queued_reads_the_volume_once_and_stays_small(
        busy_mount: tuple[Mount, Path]) -> None:
    m, vol = busy_mount
    pid = m.pid
    assert pid is not None
    read_before = proc_field(pid, "io", "rchar")
    count = 300
    vdir = m.volume("disk")
    # One shell, as a user's loop: every mkdir returns before its capture is done.
    run("bash", "-c", f'for i in $(seq {count}); do mkdir "{vdir}/m$i" || exit 1; done',
        timeout=120)
    # One volume's captures run in the order requested: the last one done, all are.
    m.wait_state(m.snapshots() / f"m{count}", timeout=120)
    states = {n: m.xattr(m.snapshots() / n, "state") for n in os.listdir(m.snapshots())}
    assert len(states) == count
    assert set(states.values()) == {"available"}, \
        {s: sum(1 for v in states.values() if v == s) for s in set(states.values())}
    peak_kib = proc_field(pid, "status", "VmHWM")
    assert peak_kib <= 300 * 1024, f"daemon peak RSS {peak_kib // 1024} MiB"
    # The volume was read once: the others copied that map under its read lease.
    # All the daemon read (its metadata too: copying a map reads ~3 KiB a chunk)
    # stays under two reads of the volume; its own count says exactly one.
    read = proc_field(pid, "io", "rchar") - read_before
    assert read < 2 * VOLUME, f"the daemon read {read / MiB:.0f} MiB for {count} snapshots"
    log = m.log()
    assert log.count("map reused") == count - 1
    assert log.count(f"{VOLUME} bytes read from the volume") == 1
    # And each snapshot holds the volume's bytes.
    for name in ("m1", "m150", f"m{count}"):
        run("cmp", m.snapshots() / name / "image.raw", vol)
    assert "Traceback" not in m.log()


@pytest.mark.parametrize("name", ["snapshot.json", "export", "import"])
def test_a_control_file_write_beyond_64k_is_efbig_at_once(busy_mount: tuple[Mount, Path],
                                                           name: str) -> None:
    m, pid = busy_mount[0], busy_mount[0].pid
    assert pid is not None
    run("mkdir", m.volume("disk") / "s1")
    snap = m.snapshots() / "s1"
    assert m.wait_state(snap) == "available"
    if name == "import":  # dd creates it; refused, it goes at close (no phantom)
        target = m.project / "imports" / "imp1"
    else:
        target = snap / name

    def contents() -> object:
        if name != "import":
            return target.read_bytes()
        # The kernel sends the close's RELEASE (which removes the file) after
        # close(2) returned: the name goes a moment after dd ends.
        deadline = time.monotonic() + 10
        while target.name in os.listdir(target.parent) and time.monotonic() < deadline:
            time.sleep(0.01)
        return os.listdir(target.parent)
    before = (contents(), (snap / "snapshot.json").read_text(),
              sorted(os.listdir(m.snapshots())))
    rss_before = proc_field(pid, "status", "VmHWM")
    start = time.monotonic()
    # One byte at 4 GiB: refused before the daemon allocates the gap.
    res = run("dd", "if=/dev/zero", f"of={target}", "bs=1", "count=1", "seek=4G",
              "conv=notrunc", check=False, timeout=30)
    assert res.returncode != 0 and "File too large" in res.stderr, res.stderr
    # Just past the limit, too, at once after (an import file's name the kernel
    # still holds then is made again); just inside it is an ordinary (invalid) write.
    res = run("dd", "if=/dev/zero", f"of={target}", "bs=1", "count=1", f"seek={64 << 10}",
              "conv=notrunc", check=False)
    assert res.returncode != 0 and "File too large" in res.stderr, res.stderr
    assert time.monotonic() - start < 10
    assert proc_field(pid, "status", "VmHWM") - rss_before < 16 * 1024  # KiB
    assert (contents(), (snap / "snapshot.json").read_text(),
            sorted(os.listdir(m.snapshots()))) == before
    assert json.loads((snap / "snapshot.json").read_text())["name"] == "s1"
    assert "EFBIG" in m.log()
    with open(target, "r+b" if name != "import" else "wb") as f:
        with pytest.raises(OSError) as info:
            os.pwrite(f.fileno(), b"x", 1 << 40)
        assert info.value.errno == errno.EFBIG


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 96 MiB ext4 filesystem on a loop device (no reserved blocks): a store
    there runs out of space; always unmounted."""
    image, mnt = tmp_path / "small.img", tmp_path / "small"
    with open(image, "wb") as f:
        f.truncate(96 * MiB)
    run("mkfs.ext4", "-q", "-F", "-m", "0", image)
    mnt.mkdir()
    run("mount", "-o", "loop", image, mnt)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)])
        image.unlink(missing_ok=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_a_capture_out_of_space_says_so_and_gives_back_every_byte(
        small_fs: Path, tmp_path: Path, mount_factory: Callable[..., Mount]) -> None:
    big, small = tmp_path / "big.raw", tmp_path / "small.raw"
    big.write_bytes(os.urandom(160 * MiB))  # outside the store: more than it can hold
    small.write_bytes(os.urandom(24 * MiB))
    store = small_fs / "store"
    snapfs("volume", "add", "big", big, "--store", store)
    snapfs("volume", "add", "small", small, "--store", store)
    m = mount_factory(store)
    run("mkdir", m.volume("small") / "before")
    assert m.wait_state(m.snapshots() / "before") == "available"
    free = free_bytes(small_fs)
    assert free < 160 * MiB
    run("mkdir", m.volume("big") / "toobig")
    snap = m.snapshots() / "toobig"
    assert m.wait_state(snap, timeout=60) == "error"
    reason = m.xattr(snap, "error_reason")
    assert "the store is full" in reason and "reading the source" not in reason, reason
    # Every byte it wrote is back, without a remount (the metadata's WAL may keep a few).
    assert free_bytes(small_fs) > free - 2 * MiB, (free, free_bytes(small_fs))
    run("rmdir", snap)
    # A capture that fits succeeds, and the earlier snapshot still reads right.
    run("mkdir", m.volume("small") / "after")
    assert m.wait_state(m.snapshots() / "after") == "available"
    run("cmp", m.snapshots() / "after" / "image.raw", small)
    run("cmp", m.snapshots() / "before" / "image.raw", small)
    assert "Traceback" not in m.log()
    m.stop()
    res = snapfs("fsck", "--store", store, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_rmdir_stops_a_running_and_a_queued_capture(busy_mount: tuple[Mount, Path]) -> None:
    m, vol = busy_mount
    vdir = m.volume("disk")
    # s1 reads the volume; s2 waits behind it (one volume's captures run in turn).
    run("bash", "-c", f'mkdir "{vdir}/s1" "{vdir}/s2"')
    assert m.xattr(m.snapshots() / "s2", "state") == "snapshotting"
    assert m.xattr(m.snapshots() / "s2", "progress") == "0"
    t0 = time.monotonic()
    run("rmdir", m.snapshots() / "s2", m.snapshots() / "s1")
    assert time.monotonic() - t0 < 10
    assert os.listdir(m.snapshots()) == []
    run("mkdir", vdir / "s3")
    assert m.wait_state(m.snapshots() / "s3") == "available"
    run("cmp", m.snapshots() / "s3" / "image.raw", vol)
    assert "Traceback" not in m.log()


#: Holds the store's index lock (argv[1]) until its stdin closes: a mount's capture
#: waits at its first commit meanwhile, so its snapshot stays `snapshotting`.
HOLD_INDEX_LOCK = """
import sys, trio
from snapfs.local import open_local_service
async def main():
    async with open_local_service(sys.argv[1]) as svc:
        await svc.index_lock.acquire()
        print("held", flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)
        svc.index_lock.release()
trio.run(main)
"""


def test_wait_on_a_snapshot_deleted_meanwhile_says_so(busy_mount: tuple[Mount, Path]) -> None:
    """`snapfs wait` printed a bare "No such file or directory: PATH"."""
    m, _ = busy_mount
    holder = subprocess.Popen([sys.executable, "-c", HOLD_INDEX_LOCK, str(m.store)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        run("mkdir", m.volume("disk") / "q")
        waiting = subprocess.Popen([sys.executable, "-m", "snapfs", "wait",
                                    str(m.snapshots() / "q")], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert waiting.poll() is None  # still waiting: the capture waits for the lock
        rmdir = subprocess.Popen(["rmdir", str(m.snapshots() / "q")])
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=60)
        assert holder.stdout is not None
        holder.stdout.close()
    assert rmdir.wait(timeout=60) == 0
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 1 and out == ""
    assert err == f"snapfs: {m.snapshots() / 'q'}: gone: deleted while waiting\n"


def test_metadata_writes_on_a_full_disk_are_enospc_and_change_nothing(
        small_fs: Path, tmp_path: Path, mount_factory: Callable[..., Mount]) -> None:
    """SQLite's "database or disk is full" was an unexpected error: EIO and a bug
    line in the log for mkdir, mv, setfattr and rmdir alike. They are ENOSPC and
    change nothing -- except rmdir, which frees space: it was refused too, and
    a disk filled to the last block kept its snapshots until files were deleted
    by hand. A delete takes the store's space reserve (reserve.py), which comes
    back once the delete has freed its space."""
    store = small_fs / "store"
    random_volume(store, tmp_path / "v.raw", 4 * MiB, "v")
    random_volume(store, tmp_path / "w.raw", 4 * MiB, "w")  # s1's bytes are s1's own
    m = mount_factory(store)
    reserve = store / "reserve"
    assert reserve.stat().st_blocks * 512 >= 8 * MiB
    for volume, name in (("v", "s0"), ("w", "s1")):
        run("mkdir", m.volume(volume) / name)
        assert m.wait_state(m.snapshots() / name) == "available"
    s = m.snapshots() / "s1"
    for db in ("metadata.db", "inodes.sqlite"):  # no WAL space left to reuse either
        conn = sqlite3.connect(store / db)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
    filler = fill_up(small_fs)
    # Nodes never shown before still get numbers (in memory: the inode map is on
    # the full disk too). Every such lookup was ENOSPC: nothing could be reached.
    assert sorted(os.listdir(m.volume("w"))) == ["s1"]
    run("cmp", m.volume("w") / "s1" / "image.raw", tmp_path / "w.raw")
    attempts = {
        "mkdir": lambda: os.mkdir(m.volume("v") / "s2"),
        "rename": lambda: os.rename(s, m.snapshots() / "s1-renamed"),
        "setxattr": lambda: os.setxattr(s, "user.tags", b"t"),
    }
    for what, attempt in attempts.items():
        before = (sorted(os.listdir(m.snapshots())), os.listxattr(s) and m.xattr(s, "tags"))
        try:
            attempt()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, (what, exc)
            assert (sorted(os.listdir(m.snapshots())), m.xattr(s, "tags")) == before, what
        else:
            pytest.fail(f"{what} succeeded on a full filesystem")
    # (The refusals' log lines may not fit: the log is on that filesystem too.)
    assert "failed unexpectedly" not in m.log()
    assert reserve.stat().st_blocks * 512 >= 8 * MiB  # kept for a delete
    run("rmdir", s)
    assert os.listdir(m.snapshots()) == ["s0"]
    deadline = time.monotonic() + 20  # the reserve again, from the space s1 freed
    while not (reserve.exists() and reserve.stat().st_blocks * 512 >= 8 * MiB):
        assert time.monotonic() < deadline, "the reserve never came back"
        time.sleep(0.1)
    assert "given to a delete" in m.log()
    run("cmp", m.snapshots() / "s0" / "image.raw", tmp_path / "v.raw")
    filler.unlink()
    os.setxattr(m.snapshots() / "s0", "user.tags", b"t")
    run("rmdir", m.snapshots() / "s0")
    assert os.listdir(m.snapshots()) == []
    m.stop()
    res = snapfs("fsck", "--store", store, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def daemon_open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open files limit in /proc/{pid}/limits")


def test_open_images_are_bounded_by_the_daemons_descriptors(
        mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    """Each open image.raw holds a daemon descriptor (its reader lock). Started
    from a shell with the usual soft limit of 1024, ~1000 open images made the
    next pack open fail: reads of files already open answered EIO (with a
    traceback each) and a mkdir failed as "not readable". The daemon raises its
    soft limit to the hard one, and an open that would leave too few descriptors
    for its own files is refused with EMFILE; every file already open reads right."""
    vol = tmp_path / "v.raw"
    vol.write_bytes(os.urandom(4 * MiB))
    store = tmp_path / "store"
    snapfs("volume", "add", "v", vol, "--store", store)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        m = mount_factory(store)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert m.pid is not None
    assert daemon_open_files_limit(m.pid) == (hard, hard)
    # A hard limit this low is the case the refusal is for.
    subprocess.run(["prlimit", "--pid", str(m.pid), "--nofile=600:600"], check=True)
    s = m.snapshots() / "s"
    run("mkdir", m.volume("v") / "s")
    assert m.wait_state(s) == "available"
    fds: list[int] = []
    try:
        with pytest.raises(OSError) as refused:
            for _ in range(400):
                fds.append(os.open(s / "image.raw", os.O_RDONLY))
        assert refused.value.errno == errno.EMFILE
        assert 100 < len(fds) < 200, len(fds)
        data = vol.read_bytes()
        for i, fd in enumerate(fds):  # each reads a chunk of its own: packs opened meanwhile
            at = (i % 4) * MiB
            assert os.pread(fd, 4096, at) == data[at:at + 4096]
        run("mkdir", m.volume("v") / "t")
        assert m.wait_state(m.snapshots() / "t") == "available"
    finally:
        for fd in fds:
            os.close(fd)
    run("cmp", s / "image.raw", vol)
    log = m.log()
    assert "snapshot images are open in this process" in log and "EMFILE" in log
    assert "Traceback" not in log
