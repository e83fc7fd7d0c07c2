"""``snapfs serve``: a backend (the local store by default) as the Scaleway Instance
API over HTTP."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from contextlib import AsyncExitStack
from typing import Any

import trio

from ..backends import BackendSettings, add_backend_options, open_backend, settings_from_args
from ..errors import SnapfsError


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "serve", help="serve the local store as the Scaleway Instance API v1 over HTTP",
        description="Serve the local store (or --backend) as the Scaleway Instance API v1 "
                    "(snapshots, "
                    "volumes, tasks) and the Account v3 project list. Clients send "
                    "X-Auth-Token; when SCW_SECRET_KEY is set it must equal it, and without "
                    "it only a loopback address is served (unless --no-auth). The first "
                    "line on stdout is 'serving URL' once the socket is bound.")
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="address to bind (default 127.0.0.1:8080; port 0 picks a free one)")
    p.add_argument("--no-auth", action="store_true",
                   help="without SCW_SECRET_KEY, listen on a non-loopback address anyway "
                        "(any token is then accepted; a warning is logged)")
    add_backend_options(p)  # --store, --backend, --s3-endpoint, --zones ...
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # A server's log is its stderr: one line per refusal (4xx/5xx) and per background
    # job, at INFO; cli.main's default of WARNING would hide the refusals.
    logging.getLogger("snapfs").setLevel(logging.INFO)
    try:
        trio.run(_serve, settings_from_args(args), args.listen, args.no_auth)
    except BaseExceptionGroup as group:
        # A refusal from inside a task group: give cli.main the one error it reports.
        leaf = _single_leaf(group)
        if isinstance(leaf, (SnapfsError, OSError)):
            raise leaf from None
        raise
    return 0


def _single_leaf(group: BaseExceptionGroup) -> BaseException | None:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


async def _serve(settings: BackendSettings, listen: str, no_auth: bool = False) -> None:
    from .server import listener, serve

    sock = await trio.to_thread.run_sync(listener, listen,
                                         os.environ.get("SCW_SECRET_KEY") or None, no_auth)
    from ..admin import is_store, say_if_new
    existed = is_store(settings.store)
    async with AsyncExitStack() as stack:
        stack.callback(sock.close)
        service = await stack.enter_async_context(open_backend(settings))
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            stop = trio.Event()
            async with trio.open_nursery() as nursery:

                async def on_signal() -> None:
                    async for _ in signals:
                        stop.set()  # graceful: hypercorn finishes in-flight requests
                        return

                async def run_server(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                    try:
                        await serve(service, sock, shutdown=stop.wait, task_status=task_status)
                    finally:
                        nursery.cancel_scope.cancel()  # also ends the signal watcher

                nursery.start_soon(on_signal)
                binds = await nursery.start(run_server)
                if settings.backend == "local":
                    say_if_new(settings.store, existed)
                print(f"serving {binds[0]}", flush=True)
                print(f"snapfs: serving {settings.describe()} on {binds[0]}", file=sys.stderr,
                      flush=True)
