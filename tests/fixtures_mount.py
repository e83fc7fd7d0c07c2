"""Fixtures for real mounts: `snapfs mount` started as the user would (a daemon),
driven through the kernel, and ALWAYS unmounted (lazily when needed) with its
daemon stopped, whatever the test did."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

ZONE = "fr-par-1"
MiB = 1 << 20


def run(*cmd: str | Path, check: bool = True, input: str | None = None,
        timeout: float = 120, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    """A real tool; on failure the assertion shows its stderr."""
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, input=input,
                         timeout=timeout, env=None if env is None else {**os.environ, **env})
    if check:
        assert res.returncode == 0, f"{cmd} -> {res.returncode}: {res.stderr.strip()}"
    return res


def snapfs(*args: str | Path, check: bool = True, timeout: float = 120,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "snapfs", *args, check=check, timeout=timeout, env=env)


def random_volume(store: Path, path: Path, size: int, name: str) -> Path:
    """``path`` filled with ``size`` random bytes, added to ``store`` as volume ``name``."""
    path.write_bytes(os.urandom(size))
    snapfs("volume", "add", name, path, "--store", store)
    return path


def make_ext4(path: Path, size_mib: int, files: dict[str, bytes]) -> Path:
    """A real ext4 image populated without mounting it (mkfs.ext4 -d)."""
    src = path.with_suffix(".src")
    src.mkdir()
    for name, data in files.items():
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
    run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
        "-d", src, path)
    return path


@dataclass
class Mount:
    path: Path
    store: Path
    pid: int | None = None
    extra: list[str] = field(default_factory=list)
    #: Environment of the daemon (Object Storage credentials, say).
    env: dict[str, str] = field(default_factory=dict)

    @property
    def project(self) -> Path:
        return self.path / ZONE / "default"

    def snapshots(self) -> Path:
        return self.project / "snapshots"

    def volume(self, name: str) -> Path:
        return self.project / "volumes" / name

    def log(self) -> str:
        p = self.store / "mount.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def xattr(self, path: Path, name: str) -> str:
        return os.getxattr(path, f"user.{name}").decode()

    def wait_state(self, path: Path, timeout: float = 60) -> str:
        """Poll user.state until the snapshot leaves the busy states."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.xattr(path, "state")
            if state not in ("snapshotting", "importing", "exporting"):
                return state
            assert time.monotonic() < deadline, f"{path} still {state}"
            time.sleep(0.05)

    def start(self) -> None:
        # Nothing inherited may give the daemon Object Storage or a cloud account:
        # only what the test passes in ``env``.
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SCW_", "AWS_"))}
        base.update(AWS_CONFIG_FILE="/nonexistent/aws-config",
                    AWS_SHARED_CREDENTIALS_FILE="/nonexistent/aws-credentials")
        res = subprocess.run([sys.executable, "-m", "snapfs", "mount", str(self.path),
                              "--store", str(self.store), *self.extra],
                             capture_output=True, text=True, timeout=120,
                             env={**base, **self.env})
        assert res.returncode == 0, f"snapfs mount -> {res.returncode}: {res.stderr.strip()}"
        self.pid = int(os.getxattr(self.path, "user.pid"))

    def stop(self) -> None:
        """Unmount (lazily if a plain unmount fails) and make sure the daemon is gone."""
        if is_mounted(self.path):
            if run("fusermount3", "-u", self.path, check=False).returncode != 0:
                run("fusermount3", "-u", "-z", self.path, check=False)
        if self.pid is not None:
            stop_process(self.pid)
            self.pid = None


#: openat(2) on x86_64 (/proc/PID/syscall names the call a process sleeps in).
SYS_OPENAT = 257


def blocked_in_open(pid: int, timeout: float = 15) -> None:
    """Until ``pid`` sits in openat(2) (/proc/PID/syscall: its number first) waiting
    for the FUSE daemon's answer (/proc/PID/wchan) -- not in some other open, of a
    library or a module while it starts (a CI run under load caught Python there).
    ``timeout`` only guards a hang: a loaded machine may take seconds to get there."""
    deadline = time.monotonic() + timeout
    while True:
        call = Path(f"/proc/{pid}/syscall").read_text().split()[0]
        wchan = Path(f"/proc/{pid}/wchan").read_text()
        if call == str(SYS_OPENAT) and ("fuse" in wchan or "request_wait_answer" in wchan):
            return
        assert time.monotonic() < deadline, \
            f"process {pid} is not waiting in open() (syscall {call}, in {wchan})"
        time.sleep(0.02)


#: open(2) of argv[1] through libc, not Python's retrying os.open (PEP 475), with
#: a SIGINT handler: the errno open() answered is printed, not a death by signal.
#: (A fatal signal would also drop a request the daemon has not read yet: then the
#: daemon never sees the open, nor logs why it ended.)
OPENER = """
import ctypes, os, signal, sys
signal.signal(signal.SIGINT, lambda *_: None)
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.open(sys.argv[1].encode(), os.O_RDONLY)
print(fd, ctypes.get_errno(), flush=True)
"""


def interrupted_open(path: Path) -> tuple[float, list[str]]:
    """Open ``path`` in an OPENER, SIGINT it once it waits in open() for the
    daemon: (seconds from the signal to the answer, its printed fd and errno)."""
    reader = subprocess.Popen([sys.executable, "-c", OPENER, str(path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        blocked_in_open(reader.pid)
        t0 = time.monotonic()
        reader.send_signal(signal.SIGINT)
        out, _ = reader.communicate(timeout=5)
        return time.monotonic() - t0, out.split()
    finally:
        reader.kill()


#: The kernel drops a cached name when told (fs/forget.py), from pyfuse3's notifier
#: thread, so just after the handler returned; without being told it would keep
#: answering for its whole entry timeout (1 s).
INVALIDATED_WITHIN = 0.3


def gone_soon(path: Path) -> bool:
    deadline = time.monotonic() + INVALIDATED_WITHIN
    while path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def mount_line(path: Path) -> str | None:
    """``path``'s line of /proc/self/mounts, read as bytes: another mount's path on
    the machine may be any bytes (paths with spaces are not used here)."""
    target = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mounts", "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1 and fields[1] == target:
                return os.fsdecode(line)
    return None


def is_mounted(path: Path) -> bool:
    return mount_line(path) is not None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_process(pid: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """start(store=None, *extra_args, env=None) -> a live Mount; all are torn down after."""
    mounts: list[Mount] = []
    counter = iter(range(1000))

    def start(store: Path | None = None, *extra: str,
              env: dict[str, str] | None = None) -> Mount:
        mnt = tmp_path / f"mnt{next(counter)}"
        mnt.mkdir()
        m = Mount(mnt, store or tmp_path / "store", extra=list(extra), env=dict(env or {}))
        mounts.append(m)
        m.start()
        return m

    yield start
    for m in mounts:
        m.stop()
    for m in mounts:
        assert not is_mounted(m.path), f"{m.path} is still mounted"


@pytest.fixture
def ext4_volume(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A 16 MiB ext4 image with a few files (one larger than a chunk)."""
    files = {
        "hello.txt": b"hello from an ext4 volume\n",
        "dir/big.bin": os.urandom(3 * MiB + 123),
        "dir/small.bin": os.urandom(4000),
    }
    return make_ext4(tmp_path / "ext4.img", 16, files), files


@pytest.fixture
def store_with_volume(tmp_path: Path, ext4_volume: tuple[Path, dict[str, bytes]]) -> Path:
    """A store with volume ``vol1`` = the ext4 image."""
    store = tmp_path / "store"
    snapfs("volume", "add", "vol1", ext4_volume[0], "--store", store)
    return store


@pytest.fixture
def mounted(mount_factory: Callable[..., Mount], store_with_volume: Path) -> Mount:
    return mount_factory(store_with_volume)


def seek_landings(fd: int, offsets: list[int]) -> list[tuple[int, int]]:
    """(SEEK_DATA, SEEK_HOLE) landing of each offset in the open file ``fd``, or -errno."""
    out = []
    for off in offsets:
        got = []
        for whence in (os.SEEK_DATA, os.SEEK_HOLE):
            try:
                got.append(os.lseek(fd, off, whence))
            except OSError as exc:
                got.append(-exc.errno)
        out.append((got[0], got[1]))
    return out
