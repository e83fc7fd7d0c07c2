"""``snapfs mount``, ``snapfs umount`` and ``snapfs wait``."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from ..backends import add_backend_options
from ..storeoptions import store_path
from ..errors import InvalidArgument, PermissionDenied, SnapfsError
from ..model import BUSY_STATES, FAILED_STATES
from ..procfs import SNAPFS_FSTYPE, is_mounted, mount_at

FUSE_DEVICE = "/dev/fuse"
FUSE_CONF = "/etc/fuse.conf"



def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("mount", help="show the snapshot service as a filesystem",
                       description="Mount the snapshot service at MOUNTPOINT. Returns once "
                       "the mount is live; the daemon logs to mount.log in the store "
                       "directory (to stderr with --foreground).")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT",
                   help="an existing directory to mount on (mkdir -p it first)")
    add_backend_options(p)  # --store, --backend, --s3-endpoint, --zones ...
    p.add_argument("--foreground", "-f", action="store_true",
                   help="stay in the foreground, log to stderr")
    p.add_argument("--debug", action="store_true", help="log every request")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT",
                   help="mount options, comma-separated: allow_other (then "
                   "default_permissions applies), ro, and every flag here spelt as "
                   "an option (backend=scaleway, page_cache, direct_io, "
                   "s3_endpoint=URL, image_mode=0440 ...); fstab's noauto, _netdev, "
                   "nofail, x-systemd.* are ignored")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--page-cache", dest="direct_io", action="store_const", const=False,
                       default=False, help="serve image.raw through the kernel page cache "
                       "(the default: small and large readers, re-reads and shared mmaps; "
                       "see the README's measurements)")
    cache.add_argument("--direct-io", dest="direct_io", action="store_const", const=True,
                       help="serve image.raw with direct I/O: every read reaches the "
                       "daemon (1 MiB streaming readers only; no shared mmap)")
    p.add_argument("--readahead", type=int, default=0, metavar="N",
                   help="retired: every backend's image reader reads ahead itself "
                   "(snapfs/readahead.py); only 0 is accepted")
    p.add_argument("--image-mode", default=None, metavar="MODE",
                   help="mode of every image.raw, read bits only, e.g. 0440 (default: the "
                   "read bits of its volume file when the snapshot was taken; 0400)")
    p.add_argument("--image-owner", default=None, metavar="UID:GID",
                   help="owner of every image.raw (default: its volume file's when the "
                   "snapshot was taken; the mount's owner)")
    p.add_argument("--listen", default=None, metavar="HOST:PORT",
                   help="also serve the Instance API from the mount daemon, as "
                   "`snapfs serve` would (X-Auth-Token: SCW_SECRET_KEY when set; without "
                   "it only a loopback address is served, unless --no-auth)")
    p.add_argument("--no-auth", action="store_true",
                   help="with --listen and no SCW_SECRET_KEY: listen on a non-loopback "
                   "address anyway, accepting any token (a warning is logged)")
    p.set_defaults(func=_mount)

    p = sub.add_parser("umount", help="unmount a snapfs mount",
                       description="Unmount MOUNTPOINT (lazily when its daemon died) and "
                       "wait for the daemon to finish.")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT", help="the mount point")
    p.set_defaults(func=_umount)

    p = sub.add_parser("wait", help="wait for a snapshot to be ready",
                       description="Wait until the snapshot at PATH (its directory or a file "
                       "in it) leaves snapshotting/importing/exporting, until its export "
                       "(PATH is its export file) or the import imports/<name> ends. Exits 1 "
                       "if it ends in error, invalid_data or failure.")
    p.add_argument("path", type=Path, metavar="PATH",
                   help="a snapshot directory, a file in it, or imports/<name>")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="give up (exit 1) after this long (default: wait for ever)")
    p.set_defaults(func=_wait)


def _mount(args: argparse.Namespace) -> int:
    from .access import parse_image_mode, parse_image_owner
    from .daemon import LOG_NAME, MountConfig, run_daemon, run_foreground
    from .mountopts import apply_mount_options

    apply_mount_options(args)
    if args.readahead:
        raise InvalidArgument("--readahead", "retired: image readers read ahead themselves "
                              "(one engine, snapfs/readahead.py); drop the option")
    cfg = MountConfig(
        mountpoint=args.mountpoint.resolve(), store=store_path(args).resolve(),
        backend=args.backend, s3_endpoint=args.s3_endpoint, options=args.options,
        foreground=args.foreground, debug=args.debug, direct_io=args.direct_io,
        zones=args.zones.split(",") if args.zones else None, profile=args.profile,
        staging_bucket=args.staging_bucket,
        image_mode=None if args.image_mode is None else parse_image_mode(args.image_mode),
        image_owner=None if args.image_owner is None else parse_image_owner(args.image_owner),
        listen=args.listen, no_auth=args.no_auth)
    if not cfg.mountpoint.exists():
        raise InvalidArgument("mountpoint", f"{cfg.mountpoint} does not exist "
                              f"(create it: mkdir -p {cfg.mountpoint})")
    if not cfg.mountpoint.is_dir():
        raise InvalidArgument("mountpoint", f"{cfg.mountpoint} is not a directory")
    if is_mounted(cfg.mountpoint):
        raise InvalidArgument("mountpoint", f"{cfg.mountpoint} is already a mount point")
    _check_apart(cfg.mountpoint, cfg.store)
    if not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        # libfuse would only say "fuse_session_mount failed" after the fork.
        raise PermissionDenied(f"cannot mount: {FUSE_DEVICE} is not readable and writable "
                               "by you (distributions ship it 0666; as root: chmod 0666 "
                               f"{FUSE_DEVICE}, or modprobe fuse if it is missing)")
    if "allow_other" in cfg.options and os.geteuid() != 0 and not _user_allow_other():
        raise PermissionDenied("cannot mount with -o allow_other: only root may, unless "
                               f"{FUSE_CONF} says user_allow_other (root edits it)")
    if args.foreground:
        return run_foreground(cfg)
    from ..admin import discard_new_store, existing_part, is_store, say_if_new
    existed, found = is_store(cfg.store), existing_part(cfg.store)
    # Refused after the fork (e.g. --listen's port taken): a store made for this
    # mount goes again, its log with it (the reason was printed).
    code = run_daemon(cfg, None if existed else
                      lambda: discard_new_store(cfg.store, found, also=(LOG_NAME,)))
    if code == 0:  # (refused: its one line only)
        say_if_new(cfg.store, existed)
    return code


def _check_apart(mountpoint: Path, store: Path) -> None:
    """A mount over its own store (or over a directory holding it, or inside it)
    sends the daemon's own file calls to itself: the first one hung for good, in
    a state no signal ends. A mount point that is a store is the two arguments
    swapped: it would hide that store under a new empty one."""
    from ..admin import is_store
    if mountpoint == store or store.is_relative_to(mountpoint):
        raise InvalidArgument("mountpoint", f"{mountpoint} holds the store {store}: mount "
                              "elsewhere (the daemon would wait on itself)")
    if mountpoint.is_relative_to(store):
        raise InvalidArgument("mountpoint", f"{mountpoint} is inside the store {store}: "
                              "mount elsewhere")
    if is_store(mountpoint):
        raise InvalidArgument("mountpoint", f"{mountpoint} is a snapfs store; to mount it: "
                              f"snapfs mount MOUNTPOINT --store {mountpoint}")


def _user_allow_other() -> bool:
    """fusermount3 lets a regular user mount with allow_other only if fuse.conf says so."""
    try:
        with open(FUSE_CONF) as f:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def daemon_pid(mountpoint: Path) -> int | None:
    """The serving daemon's pid (the root directory's user.pid), if it answers."""
    try:
        return int(os.getxattr(mountpoint, "user.pid"))
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umount(args: argparse.Namespace) -> int:
    mnt = args.mountpoint.absolute()
    entry = mount_at(mnt)
    if entry is None:
        raise InvalidArgument("mountpoint", f"{mnt} is not mounted")
    if entry.fstype != SNAPFS_FSTYPE:
        # fusermount3, run by root, unmounts anything (and -z detached a busy /proc).
        raise InvalidArgument("mountpoint", f"{mnt} is a {entry.fstype} mount, not a snapfs "
                              "one: left alone")
    pid = daemon_pid(mnt)
    res = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        if pid is not None and _alive(pid):
            # The daemon is alive: the mount is in use (EBUSY); say so.
            raise SnapfsError(res.stderr.strip() or f"cannot unmount {mnt}")
        lazy = subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True,
                              text=True)
        if lazy.returncode != 0:
            raise SnapfsError(lazy.stderr.strip() or f"cannot unmount {mnt}")
        print(f"snapfs: {mnt}: the daemon was gone; unmounted lazily", file=sys.stderr)
    if pid is not None:
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    return 0


#: state, progress (0-100), reason (for a failure) of what `snapfs wait` watches.
Status = tuple[str, int, str]


def _snapshot_probe(target: Path) -> Callable[[], Status]:
    def probe() -> Status:
        state = os.getxattr(target, "user.state").decode()
        try:
            progress = int(os.getxattr(target, "user.progress"))
        except (OSError, ValueError):
            progress = 0
        reason = (os.getxattr(target, "user.error_reason").decode()
                  if state in FAILED_STATES else "")
        return state, progress, reason
    return probe


def _status_probe(path: Path) -> Callable[[], Status]:
    """imports/<name> or a snapshot's export file: the transfer's status JSON
    (pending/started/success/failure; an export file's "none": never one)."""
    def probe() -> Status:
        st = json.loads(path.read_text())
        if st["state"] is None:
            return "none", 0, "no export was started"
        return str(st["state"]), int(st.get("progress") or 0), str(st.get("error") or "")
    return probe


def _probe_for(path: Path) -> tuple[Callable[[], Status], frozenset[str], frozenset[str]]:
    """What to poll for PATH: a snapshot directory (or a file in it) by its
    user.state, or an imports/<name> file by its status."""
    if not path.exists():
        raise InvalidArgument("path", f"{path}: no such snapshot (nothing at that path)")
    target = path if path.is_dir() else path.parent
    error = ""
    try:
        os.getxattr(target, "user.state")
        # (A volume's directory has a user.state too, which `wait` then printed.)
        if (target / "snapshot.json").is_file():
            if path.name == "export" and path.is_file():
                # The export's own outcome: the snapshot is `available` again
                # after a failed export too (wait said so, and exit 0).
                return _status_probe(path), frozenset({"pending", "started"}), \
                    frozenset({"failure", "none"})
            return _snapshot_probe(target), BUSY_STATES, FAILED_STATES
    except OSError as exc:  # no such attribute: simply not a snapshot (no errno text)
        error = "" if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP) else exc.strerror or ""
    if path.parent.name == "imports" and path.is_file():
        try:
            _status_probe(path)()
            return _status_probe(path), frozenset({"pending", "started"}), \
                frozenset({"failure"})
        except (OSError, ValueError, KeyError) as exc:
            error = str(exc)
    raise InvalidArgument("path", f"{path} is not a snapshot (or an import) in a snapfs "
                          f"mount{f' ({error})' if error else ''}")


def _wait(args: argparse.Namespace) -> int:
    if args.timeout is not None and not 0 <= args.timeout < math.inf:  # nan: for ever
        raise InvalidArgument("--timeout", f"{args.timeout} is not a number of seconds >= 0")
    found, busy, failed = _probe_for(args.path)
    bar = ProgressBar(sys.stderr) if sys.stderr.isatty() else None

    def probe() -> Status:
        try:
            return found()
        except FileNotFoundError:  # deleted since (rmdir, or the import's snapshot)
            if bar is not None:
                bar.done()
            raise SnapfsError(f"{args.path}: gone: deleted while waiting") from None
    state, progress, reason = probe()
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    while state in busy:
        if bar is not None:
            bar.show(state, progress)
        if deadline is not None and time.monotonic() > deadline:
            if bar is not None:
                bar.done()
            raise SnapfsError(f"{args.path}: still {state} after {args.timeout:g}s")
        time.sleep(0.2)
        state, progress, reason = probe()
    if bar is not None:
        bar.show(state, 100)
        bar.done()
    if state in failed:
        raise SnapfsError(f"{args.path}: {state}{': ' + reason if reason else ''}")
    print(state)
    return 0


class ProgressBar:
    WIDTH = 30

    def __init__(self, stream: "object") -> None:
        self.stream = stream

    def show(self, state: str, percent: int) -> None:
        percent = max(0, min(100, percent))
        filled = self.WIDTH * percent // 100
        line = f"\r{state:<13} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {percent:3d}%"
        self.stream.write(line)  # type: ignore[attr-defined]
        self.stream.flush()  # type: ignore[attr-defined]

    def done(self) -> None:
        self.stream.write("\n")  # type: ignore[attr-defined]
        self.stream.flush()  # type: ignore[attr-defined]
