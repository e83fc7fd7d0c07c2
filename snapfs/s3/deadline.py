"""A ranged GET that cannot outlast its deadline.

botocore's read timeout is per socket read: a server that sends a byte every
few seconds never trips it, and a GET of one 64 KiB L2 table at that pace takes
36 hours. An import sat at 0% for as long as the server kept it up, and an rmdir
of that snapshot waited for the worker thread -- holding the kernel's lock on
``snapshots/``, so every ls and mkdir there hung too.

A GetGuard registers one GET's socket with the process's one watchdog thread:
an attempt past MIN_SECONDS plus its bytes at MIN_RATE has its socket shut
down, the worker's read ends short (a transient failure, retried within the
call's budget) and the thread is free. The socket is let go (``detach``) before
its connection returns to the pool, so no other request's socket is touched. A
thread, not a trio task per GET: registering costs a lock and a dict entry, and
the cloud reader makes hundreds of GETs per GiB.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any


#: Every GET may take this long whatever its size...
MIN_SECONDS = 30.0
#: ... plus its bytes at this rate: a link this slow still imports (a 16 MiB GET
#: may take 9 minutes), a trickle does not.
MIN_RATE = 32 << 10
#: How often the watch looks (seconds).
POLL = 1.0


class GetGuard:
    def __init__(self, length: int) -> None:
        self.limit = MIN_SECONDS + length / MIN_RATE
        self._sock: socket.socket | None = None
        self._until = 0.0
        self.cut = ""  # why the socket was shut down, if it was

    def attach(self, resp: dict[str, Any]) -> None:
        """The answer's socket, watched from now until ``detach`` (the worker)."""
        sock = _socket_of(resp)
        if sock is None:
            return
        with _LOCK:
            self._sock, self._until = sock, time.monotonic() + self.limit
            _WATCHED.add(self)
            _start_watchdog()

    def detach(self) -> None:
        """Before the connection goes back to the pool (or is dropped)."""
        with _LOCK:
            self._sock = None
            _WATCHED.discard(self)

    def _expire(self, now: float) -> bool:
        """Under _LOCK: shut down if past its time; True when done with."""
        if self._sock is None:
            return True
        if now < self._until:
            return False
        self.cut = f"slower than {MIN_RATE >> 10} KiB/s: over {self.limit:.0f} s"
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock = None
        return True


_LOCK = threading.Lock()
_WATCHED: set[GetGuard] = set()
_thread: threading.Thread | None = None


def _start_watchdog() -> None:
    global _thread
    if _thread is None or not _thread.is_alive():
        _thread = threading.Thread(target=_watchdog, name="snapfs-get-deadlines",
                                   daemon=True)
        _thread.start()


def _watchdog() -> None:
    while True:
        time.sleep(POLL)
        now = time.monotonic()
        with _LOCK:
            for guard in [g for g in _WATCHED if g._expire(now)]:
                _WATCHED.discard(guard)


def _socket_of(resp: dict[str, Any]) -> socket.socket | None:
    """The socket under a boto3 GET's body (urllib3 -> http.client), if found."""
    raw = getattr(resp.get("Body"), "_raw_stream", None)
    conn = getattr(raw, "_connection", None)
    sock = getattr(conn, "sock", None)
    if isinstance(sock, socket.socket):
        return sock
    fp = getattr(getattr(raw, "_fp", None), "fp", None)
    sock = getattr(getattr(fp, "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None
