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

So a mount run as root starts a guard beside it: a shell that writes that
``abort`` file (fusectl) once the daemon is dying and not done. It learns that
two ways: SIGTERM when the daemon's main thread dies (``setpriv --pdeathsig``);
and, since that main thread may itself be the one stuck (then nothing is
signalled), by looking at the daemon every second: a main thread that is a
zombie while other threads live, or a SIGKILL pending and not acted on, seen
twice in a row. The requests in flight fail (ENOTCONN), the lock is let go, the
stuck thread ends and with it the process and its locks; the mount answers
ENOTCONN until unmounted, as any dead FUSE daemon's.

A daemon that ends as it should stops its guard after unmounting. A guard whose
daemon is wholly gone (it closed /dev/fuse, so the kernel aborted the
connection itself), or whose pid is another process's now, ends by itself
without writing: no abort is ever written for a connection number another
mount may have taken since.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

#: $1: the abort file, $2: the daemon's pid, $3: its start time (/proc/PID/stat
#: field 22, so a pid taken by another process is not mistaken for it). `wait`
#: is interrupted by the trapped signal (POSIX). SIGKILL is bit 8 of the pending
#: masks: the third hex digit from the right is odd.
_SCRIPT = r"""
abort=$1 pid=$2 start=$3 seen=0
trap 'echo 1 > "$abort" 2>/dev/null; kill "$p" 2>/dev/null; exit 0' TERM
while :; do
  sleep 1 & p=$!; wait "$p"
  read -r stat < "/proc/$pid/stat" 2>/dev/null || exit 0
  set -f; set -- ${stat##*) }; set +f
  eval "started=\${20}"
  [ "$started" = "$start" ] || exit 0
  state=$1 dying=0 threads=1
  while read -r key value; do
    case $key in
      Threads:) threads=$value ;;
      SigPnd:|ShdPnd:)
        digit=${value%??}; digit=${digit#"${digit%?}"}
        case $digit in 1|3|5|7|9|b|d|f) dying=1 ;; esac ;;
    esac
  done < "/proc/$pid/status"
  case $state in Z|X)
    [ "$threads" -gt 1 ] || exit 0
    dying=1 ;;
  esac
  if [ "$dying" = 1 ]; then seen=$((seen + 1)); else seen=0; fi
  if [ "$seen" -ge 2 ]; then echo 1 > "$abort" 2>/dev/null; exit 0; fi
done
"""

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
        pid = os.getpid()
        return subprocess.Popen([setpriv, "--pdeathsig", "TERM", "sh", "-c", _SCRIPT,
                                 "snapfs-guard", str(abort), str(pid), _start_time(pid)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        log.info("no guard for this mount: %s", exc)
        return None


def _start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat (after the command name, which may hold spaces)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(") ", 1)[1].split()[19]


def stop(guard: subprocess.Popen[bytes]) -> None:
    """Its shell and sleep, without the abort: the mount was unmounted already."""
    try:
        os.killpg(guard.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    guard.wait()
