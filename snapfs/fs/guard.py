"""A mount whose daemon dies is aborted, not left hanging for good.

pyfuse3 sends the kernel's name invalidations (a rename or delete this mount
learns of) from a thread of its own, and the kernel takes the directory's lock
for each. If the daemon is killed (SIGKILL, the OOM killer) while a request
holding that lock is in flight -- an rmdir waiting out its grace second, say --
that thread sleeps uninterruptibly for the lock: the process never finishes
dying, /dev/fuse is never closed, so the kernel never aborts the connection.
Every process touching the mount then hung unkillably, and the dead daemon
kept the store's locks (a snapshot could no longer be deleted from anywhere),
until someone wrote to the connection's ``abort`` file by hand.

So a mount run as root starts a guard beside it: a shell that receives SIGTERM
when the daemon's main thread dies (``setpriv --pdeathsig``) and then writes
that ``abort`` file (fusectl). The requests in flight fail (ENOTCONN), the lock
is let go, the stuck thread ends and with it the process and its locks; the
mount answers ENOTCONN until unmounted, as any dead FUSE daemon's. A daemon that
ends as it should stops its guard after unmounting, so no abort is ever written
for a connection number that another mount may have taken since.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

#: $1: the abort file. `wait` is interrupted by the trapped signal (POSIX).
_SCRIPT = ('trap \'echo 1 > "$1" 2>/dev/null; kill "$p" 2>/dev/null; exit 0\' TERM; '
           'sleep 2147483647 & p=$!; wait "$p"')


def start(conn: Path) -> subprocess.Popen[bytes] | None:
    """The guard of the FUSE connection ``conn`` (/sys/fs/fuse/connections/N),
    started from the daemon's main thread (the one whose death it watches);
    None where it cannot work (not root, no fusectl, no setpriv)."""
    abort = conn / "abort"
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None or not abort.exists():
        log.info("no guard for this mount (needs root, fusectl and setpriv): a daemon "
                 "killed mid-request may leave it hanging")
        return None
    try:
        return subprocess.Popen([setpriv, "--pdeathsig", "TERM", "sh", "-c", _SCRIPT,
                                 "snapfs-guard", str(abort)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        log.info("no guard for this mount: %s", exc)
        return None


def stop(guard: subprocess.Popen[bytes]) -> None:
    """Its shell and sleep, without the abort: the mount was unmounted already."""
    try:
        os.killpg(guard.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    guard.wait()
