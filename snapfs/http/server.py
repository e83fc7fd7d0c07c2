"""Serving the ASGI app with hypercorn's trio worker (no HTTP parsing of our own)."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from typing import Awaitable, Callable

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from ..errors import InvalidArgument
from ..logtext import esc
from ..service import SnapshotService
from .routes import make_app

log = logging.getLogger("snapfs.http")


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise InvalidArgument("listen", f"{listen!r} is not HOST:PORT")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address (only local
    processes can connect)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, ValueError):  # ValueError: see _refusal
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback
                               for info in infos)


def check_exposure(listen: str, secret: str | None, no_auth: bool) -> None:
    """Without SCW_SECRET_KEY any token is accepted: refuse to listen beyond the
    loopback interface unless ``no_auth`` says so on purpose (then warn)."""
    if secret:
        return
    host, _ = parse_listen(listen)
    if is_loopback(host):
        return
    if not no_auth:
        raise InvalidArgument("listen", f"{listen} is reachable from other machines and "
                              "SCW_SECRET_KEY is not set, so any token would be accepted: "
                              "set SCW_SECRET_KEY, listen on 127.0.0.1, or pass --no-auth")
    log.warning("serving %s without authentication (--no-auth): anyone who can connect "
                "can read and delete every snapshot", listen)


def _refusal(listen: str, exc: OSError | ValueError) -> InvalidArgument:
    """getaddrinfo encodes a host name with IDNA first: a name it cannot encode (an
    empty or 64+ character label, undecodable bytes) is a UnicodeError (a
    ValueError), not the OSError of a name that does not resolve."""
    why = "not a valid host name" if isinstance(exc, ValueError) else exc.strerror or exc
    # Escaped: the host is the user's, and the refusal is printed as one line.
    return InvalidArgument("listen", f"{esc(listen)}: {why}")


def bind(listen: str) -> socket.socket:
    """The listening socket, bound here so that a taken port or an unknown host is
    one clear refusal rather than an error deep inside the server's task group."""
    host, port = parse_listen(listen)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except (OSError, ValueError) as exc:
        raise _refusal(listen, exc) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise _refusal(listen, exc) from None
    return sock


def listener(listen: str, secret: str | None, no_auth: bool) -> socket.socket:
    """The API's listening socket for ``snapfs serve`` and ``mount --listen`` alike:
    bound first (an unknown host or a taken port is its own refusal, not a word
    about exposure), then check_exposure. Blocking (name resolution): run it in a
    worker thread."""
    sock = bind(listen)
    try:
        check_exposure(listen, secret, no_auth)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(service: SnapshotService, listen: str | socket.socket, *,
                shutdown: Callable[[], Awaitable[None]] | None = None,
                secret: str | None = None,
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``service`` on ``listen`` (HOST:PORT, or a socket from ``bind``) until
    ``shutdown`` returns (or cancellation). ``task_status.started`` receives the
    bound URLs (port 0 picks a free port). ``secret`` defaults to SCW_SECRET_KEY."""
    sock = bind(listen) if isinstance(listen, str) else listen
    config = Config()
    # hypercorn adopts the descriptor (fd://), so it is detached from ``sock`` here.
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    config.errorlog = log
    config.graceful_timeout = 2.0
    if secret is None:
        secret = os.environ.get("SCW_SECRET_KEY") or None
    app = make_app(service, secret)
    await hypercorn_serve(app, config, shutdown_trigger=shutdown,  # type: ignore[arg-type]
                          task_status=task_status, mode="asgi")
