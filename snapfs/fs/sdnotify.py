"""systemd's readiness protocol for ``snapfs mount --foreground`` under a
``Type=notify`` unit: once the mount is live, send ``READY=1`` to $NOTIFY_SOCKET
(a datagram socket; a leading '@' is the abstract namespace)."""

from __future__ import annotations

import logging
import os
import socket
from typing import Callable

log = logging.getLogger(__name__)


def notifier() -> Callable[[], None] | None:
    """What to call once live, or None when no service manager asked."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return None

    def ready() -> None:
        target = "\0" + address[1:] if address.startswith("@") else address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(b"READY=1\nSTATUS=mounted\n", target)
        except OSError as exc:  # the mount works anyway; the manager will time out
            log.warning("could not tell the service manager the mount is ready: %s", exc)
    return ready
