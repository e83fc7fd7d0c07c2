"""A socket timeout for the official SDK's HTTP requests.

scaleway_core's API._request calls ``requests.request`` with no ``timeout``, so
an answer that never comes holds its worker thread for ever. ScalewayService
abandons such an attempt at its timeout (the caller gets EAGAIN), but the
thread, and the CapacityLimiter slot it holds, stayed: eight hung connections
and every later call of the mount waited for a slot until its deadline. The
SDK module's ``requests`` is therefore replaced by this thin proxy, which adds
the current attempt's timeout (a context variable, which trio.to_thread copies
into the worker thread) to each request, and reads the body against it: a hung
or trickling answer ends with the attempt (within one socket wait of it).
"""

from __future__ import annotations

import contextvars
import time
from typing import Any

import requests
import scaleway_core.api as sdk_api

#: Seconds one attempt may wait on a socket (connect, and each read); set by
#: ScalewayService.call around every SDK call.
attempt_timeout: contextvars.ContextVar[float] = contextvars.ContextVar(
    "attempt_timeout", default=20.0)


#: The largest answer read: a List page of 100 resources is ~100 KB; a server
#: (or proxy) sending more is not the API.
MAX_BODY = 16 << 20


class _TimedRequests:
    """``requests`` as the SDK sees it: the same, with a timeout on each request."""

    def __getattr__(self, name: str) -> Any:
        return getattr(requests, name)

    @staticmethod
    def request(method: str, url: str, **kwargs: Any) -> requests.Response:
        timeout = attempt_timeout.get()
        deadline = time.monotonic() + timeout
        kwargs.setdefault("timeout", timeout)
        # The body is read here, against the attempt's deadline: a socket timeout
        # alone bounds each wait, so an answer trickling a byte at a time (a
        # misbehaving proxy) kept the thread for as long as it trickled.
        kwargs["stream"] = True
        response = requests.request(method, url, **kwargs)
        try:
            parts, size = [], 0
            while piece := response.raw.read1(1 << 16, decode_content=True):
                parts.append(piece)
                size += len(piece)
                if time.monotonic() > deadline:
                    raise requests.Timeout(f"the answer took over {timeout:g}s to arrive")
                if size > MAX_BODY:  # memory follows the data asked for, not the server
                    raise requests.RequestException(
                        f"the answer is over {MAX_BODY >> 20} MiB (no API answer is)")
            response._content = b"".join(parts)
            response._content_consumed = True
        finally:
            response.close()
        return response


def install() -> None:
    """Give the SDK's requests a timeout (idempotent)."""
    if not isinstance(sdk_api.requests, _TimedRequests):
        sdk_api.requests = _TimedRequests()  # type: ignore[assignment]
