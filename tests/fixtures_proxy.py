"""A real HTTP proxy in front of a real `snapfs serve`, for the faults a real API
path shows and a healthy server never makes: a proxy's HTML 502 page, an empty
503, a 429 with an odd Retry-After, an answer that never comes, a field of an
impossible value. Everything not scripted passes through to the server as is.

It runs in threads (``http.server``), so both an in-process ScalewayService (on
trio) and a mount daemon (another process) can be pointed at ``.url``.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import pytest

from fixtures_http import Served

#: Hop-by-hop headers (RFC 9110 7.6.1): not passed on by a proxy.
HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
       "proxy-authenticate", "proxy-authorization"}


@dataclass
class Fault:
    """One scripted answer, for the next request whose path contains ``match``."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (longer than a timeout: a hang)
    match: str = ""
    trickle: float = 0.0  # seconds between the body's bytes (each wait short, the whole long)
    #: Pass the request on (the server does the work), and hold its answer back
    #: ``delay`` seconds: an answer lost or late after the fact. Status/body unused.
    forward: bool = False
    method: str = ""  # only requests of this method match, when set


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.faults: list[Fault] = []
        #: (path, JSON) -> JSON, applied to every 2xx JSON answer passed through.
        self.rewrite: Callable[[str, Any], Any] | None = None
        self.arrivals: list[tuple[float, str]] = []  # (time.monotonic(), path)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: no keep-alive

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def add(self, *faults: Fault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def requests(self, match: str = "") -> list[float]:
        """Arrival times of the requests whose path contains ``match``."""
        with self._lock:
            return [t for t, p in self.arrivals if match in p]

    def _take(self, path: str, method: str) -> Fault | None:
        with self._lock:
            self.arrivals.append((time.monotonic(), path))
            for i, f in enumerate(self.faults):
                if f.match in path and f.method in ("", method):
                    return self.faults.pop(i)
        return None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("content-length") or 0)
        body = h.rfile.read(length) if length else b""
        fault = self._take(h.path, h.command)
        if fault is not None and not fault.forward:
            if fault.delay:
                self._closing.wait(fault.delay)
            self._answer(h, fault.status, fault.headers, fault.body, fault.trickle)
            return
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP}
            conn.request(h.command, h.path, body=body, headers=headers)
            res = conn.getresponse()
            data = res.read()
            head = h.command == "HEAD"  # (its content-length is the object's)
            out = {k: v for k, v in res.getheaders()
                   if k.lower() not in HOP and (head or k.lower() != "content-length")}
            if self.rewrite is not None and 200 <= res.status < 300 and data:
                data = json.dumps(self.rewrite(h.path, json.loads(data))).encode()
            if fault is not None and fault.delay:  # (forward: done, answered late)
                self._closing.wait(fault.delay)
            self._answer(h, res.status, out, data)
        finally:
            conn.close()

    def _answer(self, h: BaseHTTPRequestHandler, status: int, headers: dict[str, str],
                body: bytes, trickle: float = 0.0) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)  # latin-1 on the wire, as HTTP/1.1 allows (obs-text)
        if h.command == "HEAD" and "content-length" in {k.lower() for k in headers}:
            h.end_headers()
            return
        h.send_header("content-length", str(len(body)))
        h.end_headers()
        if not trickle:
            h.wfile.write(body)
            return
        h.wfile.flush()
        for i in range(len(body)):
            if self._closing.wait(trickle):
                return
            try:
                h.wfile.write(body[i:i + 1])
                h.wfile.flush()
            except OSError:  # the client gave up
                return

    def close(self) -> None:
        self._closing.set()  # answers held back by a delay go now
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)


@pytest.fixture
def proxy(served: Served) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the module's `snapfs serve` (without Object Storage)."""
    p = FaultProxy(served.url)
    try:
        yield p
    finally:
        p.close()


def sizes_of(target: str, value: Any) -> Callable[[str, Any], Any]:
    """A rewrite giving the resource ``target`` (snapshot or volume) ``value`` as its
    size wherever an answer carries it (Get, List, either API)."""
    def rewrite(path: str, data: Any) -> Any:
        def walk(node: Any) -> None:
            if isinstance(node, dict):
                if node.get("id") == target and "size" in node:
                    node["size"] = value
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)
        walk(data)
        return data
    return rewrite
