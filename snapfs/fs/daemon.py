"""Running a mount: opening the backend (snapfs/backends.py), serving FUSE on trio, daemonizing.

``snapfs mount`` forks before anything starts (no threads, no trio loop yet):
the child opens the backend, mounts, and reports "ready" (or the one-line
reason it failed) on a pipe; the parent returns only then, so the mount is
live when the command exits. SIGTERM/SIGINT end the FUSE loop, unmount, and
close the service, which stops background captures leaving the store consistent.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Callable, TextIO

import pyfuse3
import trio

from ..backends import BackendSettings, open_backend
from ..errors import InvalidArgument, SnapfsError
from ..taskgroups import first_error
from ..logtext import EscapingFormatter, LossCountingHandler
from ..procfs import mount_device
from ..service import SnapshotService
from . import guard
from .context import MAX_TASKS, FsContext
from .mountopts import FUSE_OPTIONS
from .inodes import MAP_NAME, InodeTable
from .ops import SnapfsOperations

log = logging.getLogger("snapfs.fs")

LOG_NAME = "mount.log"
#: After SIGTERM, requests still running (a reader waiting for a capture) get
#: this long before they are cancelled.
GRACE_SECONDS = 5.0
READY_TIMEOUT = 120.0
#: Kernel read-ahead on the mount (page-cache mode), and the FUSE connection's
#: queue of background requests (read-ahead is one): the kernel's defaults (12,
#: congested at 9) cut a deep read-ahead short and left a sequential reader with
#: one request at the daemon at a time. The queue stays at 64/48. Read-ahead was
#: 8 MiB from the eighth session (measured under load, with the VM returning
#: page-cache memory to its host: README, Performance); re-measured in paired
#: rounds with that reclaim held off (tools.py --kernel, twelfth session), 1 MiB
#: matched or beat 8 MiB for every reader but one: a loop device over image.raw
#: (scattered reads, each pulling 8 MiB) 0.87 against 0.68 of the ceiling,
#: qemu-img 1.00 against 0.87, restic 1.00 / 0.95, `dd bs=1M` 0.94 / 1.01.
#: Less does not suit every reader either (fourteenth session, the same way):
#: 256 / 128 KiB lifted the loop device to 0.75 / 0.65 from 0.62 but dropped
#: qemu-img to 0.63 / 0.46 from 1.03, `dd bs=1M` and cat too (and 0.75 still
#: misses 0.8). An open takes the mount's (bdi) setting, so 1 MiB stays.
#: Page cache is the kernel's: the daemon's memory does not grow (its reader
#: caches 12 chunks; requests beyond wait for their chunk).
READAHEAD_KB = 1024
MAX_BACKGROUND = 64
CONGESTION_THRESHOLD = 48
FUSECTL = "/sys/fs/fuse/connections"


@dataclass
class MountConfig:
    mountpoint: Path
    store: Path
    backend: str = "local"
    s3_endpoint: str | None = None
    options: list[str] = field(default_factory=list)
    foreground: bool = False
    debug: bool = False
    direct_io: bool = False
    ttl: float = 2.0
    #: Scaleway backend settings (see snapfs.scaleway).
    zones: list[str] | None = None
    profile: str | None = None
    staging_bucket: str | None = None
    #: Mode and (uid, gid) of every image.raw instead of its volume file's (access.py).
    image_mode: int | None = None
    image_owner: tuple[int, int] | None = None
    #: HOST:PORT to serve the Instance API on from this daemon (snapfs/http), or None.
    listen: str | None = None
    #: Serve ``listen`` beyond loopback without SCW_SECRET_KEY (any token accepted).
    no_auth: bool = False

    def backend_settings(self) -> BackendSettings:
        return BackendSettings(store=self.store, backend=self.backend,
                               s3_endpoint=self.s3_endpoint, zones=self.zones,
                               profile=self.profile, staging_bucket=self.staging_bucket)


def fuse_options(cfg: MountConfig) -> set[str]:
    options = set(pyfuse3.default_options)
    options.add("fsname=snapfs")
    options.add("subtype=snapfs")
    options.discard("default_permissions")
    for opt in cfg.options:
        for part in opt.split(","):
            part = part.strip()
            if not part:
                continue
            if part not in FUSE_OPTIONS:  # snapfs's own were taken out (mountopts.py)
                raise InvalidArgument("-o", f"unsupported mount option {part!r} "
                                      f"({', '.join(sorted(FUSE_OPTIONS))})")
            options.add(part)
    if "allow_other" in options:
        # Shared with other users: let the kernel check the modes we report.
        options.add("default_permissions")
    if cfg.debug:
        options.add("debug")
    return options


async def serve(cfg: MountConfig, ready: Callable[[], None] | None = None) -> None:
    """Mount and serve until unmounted or signalled."""
    mnt = str(cfg.mountpoint)
    if not os.path.isdir(mnt):
        raise InvalidArgument("mountpoint", f"{mnt} is not a directory")
    api = None
    if cfg.listen is not None:  # bound first: a taken port is the mount's one refusal
        from ..http.server import listener
        # As `snapfs serve`: no secret, no listening beyond loopback unless asked.
        api = await trio.to_thread.run_sync(listener, cfg.listen,
                                            os.environ.get("SCW_SECRET_KEY") or None,
                                            cfg.no_auth)
    try:
        async with open_backend(cfg.backend_settings()) as svc:
            await _mount(cfg, svc, api, ready)
    finally:
        if api is not None:  # also when the backend or the mount was refused
            api.close()


async def _mount(cfg: MountConfig, svc: SnapshotService, api: socket.socket | None,
                 ready: Callable[[], None] | None) -> None:
    mnt = str(cfg.mountpoint)
    ctx = FsContext.create(svc, ttl=cfg.ttl)
    from ..local.store import private_database
    private_database(cfg.store / MAP_NAME)  # never through a planted symlink
    ctx.inodes = InodeTable.in_store(cfg.store)  # the same numbers across remounts
    guards: list[subprocess.Popen[bytes]] = []  # (fs/guard.py)
    try:
        ctx.direct_io = cfg.direct_io
        ctx.image_mode, ctx.image_owner = cfg.image_mode, cfg.image_owner
        ops = SnapfsOperations(ctx)
        try:
            pyfuse3.init(ops, mnt, fuse_options(cfg))
        except RuntimeError as exc:
            raise SnapfsError(f"cannot mount {mnt}: {exc}") from None
        ctx.notify_kernel = True
        log.info("mounted %s (backend %s, store %s, pid %d)", mnt, cfg.backend, cfg.store,
                 os.getpid())
        try:
            async with trio.open_nursery() as nursery:
                ctx.catalog.nursery = nursery  # background refreshes of stale listings
                nursery.start_soon(_on_signals, nursery)
                if api is not None:
                    await _serve_api(nursery, svc, api)
                nursery.start_soon(_when_live, cfg, ready, guards)
                await pyfuse3.main(max_tasks=MAX_TASKS)
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", mnt)
            for g in guards:
                guard.stop(g)
    finally:
        ctx.inodes.close()


async def _serve_api(nursery: trio.Nursery, svc: SnapshotService, sock: socket.socket
                     ) -> None:
    """The Instance API of ``svc`` (as `snapfs serve`) until the mount ends: one
    process, so no store is shared between a mount and a server."""
    from ..http.server import serve as serve_http
    urls = await nursery.start(partial(serve_http, svc, sock))
    log.info("serving the Instance API on %s", urls[0])


async def _when_live(cfg: MountConfig, ready: Callable[[], None] | None,
                     guards: list[subprocess.Popen[bytes]]) -> None:
    """Once the kernel has finished the FUSE handshake (a stat of the mount point,
    answered by our own loop, proves it), tune it, guard it (from this, the main
    thread) and report ready."""
    try:
        await trio.to_thread.run_sync(os.stat, cfg.mountpoint)
    except OSError as exc:  # the backend refused the root (a cloud's 401, unreachable)
        raise SnapfsError(f"the mount's first request failed: {exc.strerror} (the "
                          f"reason is in {cfg.store / LOG_NAME})") from None
    if not cfg.direct_io:
        tune_kernel(str(cfg.mountpoint))
    conn = connection_dir(str(cfg.mountpoint))
    g = guard.start(conn) if conn is not None else None
    if g is not None:
        guards.append(g)
    if ready is not None:
        ready()


def connection_dir(mountpoint: str) -> Path | None:
    """The mount's FUSE connection in fusectl (mounted here if it is not and this
    is root), None if there is none to be had."""
    dev = mount_device(mountpoint)
    if dev is None:
        return None
    conn = Path(FUSECTL) / dev.split(":")[1]
    if not conn.is_dir() and os.geteuid() == 0:
        try:
            _mount_fusectl()
        except OSError:
            pass  # (or mounted meanwhile by another mount's daemon)
    return conn if conn.is_dir() else None


def tune_kernel(mountpoint: str, readahead_kb: int = READAHEAD_KB,
                max_background: int = MAX_BACKGROUND,
                congestion_threshold: int = CONGESTION_THRESHOLD) -> None:
    """Let the kernel read ahead ``readahead_kb`` KiB (default 128) on this mount
    and keep that many 1 MiB requests in flight to the daemon (see READAHEAD_KB).
    Needs root (and fusectl, mounted here if it is not, as systemd does at boot);
    without, the kernel's defaults stay, which only costs speed."""
    dev = mount_device(mountpoint)
    if dev is None:
        return
    # The queue first: a deeper read-ahead is cut short by the default one.
    conn = connection_dir(mountpoint)
    if conn is None:
        log.info("FUSE background queue stays at its default: no connection in %s",
                 FUSECTL)
    else:
        try:
            (conn / "max_background").write_text(str(max_background))
            (conn / "congestion_threshold").write_text(str(congestion_threshold))
        except OSError as exc:
            log.info("FUSE background queue stays at its default: %s", exc)
    try:
        Path(f"/sys/class/bdi/{dev}/read_ahead_kb").write_text(str(readahead_kb))
    except OSError as exc:
        log.info("kernel read-ahead stays at its default: %s", exc)


def _mount_fusectl() -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"fusectl", FUSECTL.encode(), b"fusectl", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot mount fusectl on {FUSECTL}: {os.strerror(err)}")
    log.info("mounted fusectl on %s (to tune this mount's FUSE connection)", FUSECTL)


async def _on_signals(nursery: trio.Nursery) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        async for signum in sigs:
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            # Requests still waiting (for a capture, say) must not hold the exit.
            await trio.sleep(GRACE_SECONDS)
            nursery.cancel_scope.cancel()
            return


def setup_logging(cfg: MountConfig, stream: TextIO | None = None) -> None:
    level = logging.DEBUG if cfg.debug else logging.INFO
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if stream is None:  # never through a symlink, 0600 (local/store.py)
        from ..local.store import open_log
        handler: logging.Handler = LossCountingHandler(open_log(cfg.store / LOG_NAME))
    else:
        handler = LossCountingHandler(stream)
    handler.setFormatter(EscapingFormatter(
        "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    if not cfg.debug:
        for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def run_foreground(cfg: MountConfig) -> int:
    from .sdnotify import notifier
    setup_logging(cfg, sys.stderr)
    trio.run(serve, cfg, notifier())  # READY=1 to systemd (Type=notify) once live
    return 0


def run_daemon(cfg: MountConfig, on_refused: Callable[[], None] | None = None) -> int:
    """Fork; the parent waits for the child's "ready" and returns 0, or prints
    the child's one-line reason and returns 1 (``on_refused`` is called first,
    once the child is gone, when the child gave a reason: the log holds nothing
    more)."""
    # The store is checked (ours, recognised; made if new) before the log goes in it.
    from ..local.store import open_log, open_store, trusted_dir
    if cfg.backend == "local":
        open_store(cfg.store, writing=True)
    else:
        trusted_dir(cfg.store, create=True)
    log_file = open_log(cfg.store / LOG_NAME)  # refused here: one line, no child
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        log_file.close()
        os.close(wfd)
        return _wait_ready(rfd, pid, cfg, on_refused)
    # The child: detach, log to the store, serve.
    os.close(rfd)
    code = 1
    try:
        os.setsid()
        _redirect_stdio(log_file)
        setup_logging(cfg)

        def ready() -> None:
            os.write(wfd, b"ready\n")
            os.close(wfd)
        trio.run(serve, cfg, ready)
        code = 0
    except SnapfsError as exc:
        _report(wfd, str(exc))
    except BaseExceptionGroup as group:  # a task of the mount's nursery failed
        first = first_error(group)
        if not isinstance(first, SnapfsError):
            log.exception("mount failed")
        _report(wfd, str(first) if isinstance(first, SnapfsError)
                else f"{type(first).__name__}: {first}")
    except BaseException as exc:  # the parent must hear about any failure
        log.exception("mount failed")
        _report(wfd, f"{type(exc).__name__}: {exc}")
    finally:
        logging.shutdown()
        os._exit(code)


def _report(wfd: int, message: str) -> None:
    log.error("%s", message)
    try:
        os.write(wfd, f"error {message}\n".encode())
        os.close(wfd)
    except OSError:
        pass  # already reported ready: the reason is in the log


def _redirect_stdio(log_file: IO[str]) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    with log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
    os.close(null)


def _wait_ready(rfd: int, pid: int, cfg: MountConfig,
                on_refused: Callable[[], None] | None) -> int:
    import select
    data = b""
    ready, _, _ = select.select([rfd], [], [], READY_TIMEOUT)
    if ready:
        while True:
            part = os.read(rfd, 4096)
            if not part or b"\n" in part:
                data += part
                break
            data += part
    os.close(rfd)
    if data.startswith(b"ready"):
        return 0
    if not ready:
        os.kill(pid, signal.SIGTERM)
        message = f"the mount did not come up within {READY_TIMEOUT:.0f}s"
    else:
        message = data.decode(errors="replace").strip().removeprefix("error ") or \
            f"the mount daemon exited (see {cfg.store / LOG_NAME})"
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    if ready and data.startswith(b"error ") and on_refused is not None:
        on_refused()
    print(f"snapfs: {message}", file=sys.stderr)
    return 1
