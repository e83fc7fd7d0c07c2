"""A socket timeout for the official SDK's HTTP requests.

scaleway_core's API._request calls ``requests.request`` with no ``timeout``, so
an answer that never comes holds its worker thread for ever. ScalewayService
abandons such an attempt at its timeout (the caller gets EAGAIN), but the
thread, and the CapacityLimiter slot it holds, stayed: eight hung connections
and every later call of the mount waited for a slot until its deadline. The
SDK module's ``requests`` is therefore replaced by this thin proxy, which adds
the current attempt's timeout (a context variable, which trio.to_thread copies
into the worker thread) to each request: a hung socket ends with the attempt.
"""

from __future__ import annotations

import contextvars
from typing import Any

import requests
import scaleway_core.api as sdk_api

#: Seconds one attempt may wait on a socket (connect, and each read); set by
#: ScalewayService.call around every SDK call.
attempt_timeout: contextvars.ContextVar[float] = contextvars.ContextVar(
    "attempt_timeout", default=20.0)


class _TimedRequests:
    """``requests`` as the SDK sees it: the same, with a timeout on each request."""

    def __getattr__(self, name: str) -> Any:
        return getattr(requests, name)

    @staticmethod
    def request(method: str, url: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", attempt_timeout.get())
        return requests.request(method, url, **kwargs)


def install() -> None:
    """Give the SDK's requests a timeout (idempotent)."""
    if not isinstance(sdk_api.requests, _TimedRequests):
        sdk_api.requests = _TimedRequests()  # type: ignore[assignment]
