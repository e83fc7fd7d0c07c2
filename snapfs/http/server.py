"""Serving the ASGI app with hypercorn's trio worker (no HTTP parsing of our own)."""

from __future__ import annotations

import logging
import os
from typing import Awaitable, Callable

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from ..errors import InvalidArgument
from ..service import SnapshotService
from .routes import make_app

log = logging.getLogger("snapfs.http")


def parse_listen(listen: str) -> str:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) checked before hypercorn sees it."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument("listen", f"{listen!r} is not HOST:PORT")
    return listen


async def serve(service: SnapshotService, listen: str, *,
                shutdown: Callable[[], Awaitable[None]] | None = None,
                secret: str | None = None,
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``service`` on ``listen`` until ``shutdown`` returns (or cancellation).
    ``task_status.started`` receives the bound URLs (port 0 picks a free port).
    ``secret`` defaults to the server's SCW_SECRET_KEY."""
    config = Config()
    config.bind = [parse_listen(listen)]
    config.accesslog = None
    config.errorlog = log
    config.graceful_timeout = 2.0
    if secret is None:
        secret = os.environ.get("SCW_SECRET_KEY") or None
    app = make_app(service, secret)
    await hypercorn_serve(app, config, shutdown_trigger=shutdown,  # type: ignore[arg-type]
                          task_status=task_status, mode="asgi")
