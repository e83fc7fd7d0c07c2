"""Which process is doing a piece of in-progress work, and whether it still lives.

Several processes may open one store (a mount and `snapfs serve`); only the
process that started a capture or an export can finish it. Each such row names
its process by a token that survives pid reuse and reboots, so that any opener
can tell a job whose process died from one still running elsewhere.
"""

from __future__ import annotations

import os
from functools import lru_cache

from ..procfs import read_text


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown-boot"


def _start_time(pid: int, running: bool = False) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of stat).
    ``running``: None also for a zombie (killed, not yet reaped by its parent),
    which holds no lock and does no more work."""
    try:
        stat = read_text(f"/proc/{pid}/stat")  # its name, in (), is any bytes
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if running and fields[0] in ("Z", "X"):
        return None
    return fields[19]


@lru_cache(maxsize=None)
def _token_for(pid: int) -> str:
    return f"{_boot_id()}:{pid}:{_start_time(pid)}"


def this_process() -> str:
    """The token of the calling process (cached per pid: stays right after fork)."""
    return _token_for(os.getpid())


def alive(token: str | None) -> bool:
    """False when the process named by ``token`` is gone (or the token is unknown)."""
    if not token:
        return False
    try:
        boot, pid, start = token.split(":")
        return boot == _boot_id() and _start_time(int(pid), running=True) == start
    except ValueError:
        return False
