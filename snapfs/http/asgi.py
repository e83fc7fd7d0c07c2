"""A minimal ASGI layer: request/response objects, a regex routing table, auth,
and domain errors turned into API error bodies.

Why not a framework: the API surface is ten routes with JSON in and out; the
ASGI contract for that is ~100 lines, and owning them keeps every status and
body under the one error table instead of a framework's own exception mapping.
HTTP parsing itself is hypercorn's (see ``snapfs.http.server``).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs

from .. import jsontext
from ..errors import InvalidArgument, SnapfsError
from ..logtext import esc
from ..model import check_uuid
from .api_errors import error_body, unauthenticated_body

log = logging.getLogger("snapfs.http")

#: Request bodies are small JSON objects; anything bigger is refused unread.
MAX_BODY = 1 << 20

_INTEGER = re.compile(r"-?[0-9]+")
_BOOLEANS = {**dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
             **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False)}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    args: dict[str, str] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        """The body as a JSON object (an empty body is an empty object)."""
        if not self.body.strip():
            return {}
        data = jsontext.loads(self.body, "body", MAX_BODY)
        if not isinstance(data, dict):
            raise InvalidArgument("body", "must be a JSON object")
        return data

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise InvalidArgument(name, "given more than once")
        return values[0]

    def int_param(self, name: str) -> int | None:
        value = self.param(name)
        if value is None or value == "":
            return None
        # ASCII digits only: int() also takes other scripts' digits ("٣"), "1_0",
        # "+5" and surrounding spaces, none of which the API accepts.
        if not _INTEGER.fullmatch(value):
            raise InvalidArgument(name, f"{value!r} is not an integer")
        if len(value) > 20:  # past int64, and int() refuses over 4300 digits
            raise InvalidArgument(name, "out of range")
        return int(value)

    def uuid_param(self, name: str) -> str | None:
        """A filter naming a resource by ID: refused unless a UUID (as the API does)."""
        value = self.param(name) or None
        return None if value is None else check_uuid(name, value)

    def list_param(self, name: str) -> list[str] | None:
        """Repeated (``tags=a&tags=b``) and comma-separated (``tags=a,b``) forms,
        both of which the SDKs send depending on the endpoint. None (no filter)
        when no value is left: the SDK sends ``tags=`` for an empty list."""
        values = self.query.get(name)
        found = [v for value in values or () for v in value.split(",") if v]
        return found or None

    def bool_param(self, name: str) -> bool | None:
        """A boolean in the spellings the API's own parser (Go's ParseBool) takes:
        the Python SDK sends ``False``, the TypeScript one ``false``. None when absent."""
        value = self.param(name)
        if value is None or value == "":
            return None
        if value not in _BOOLEANS:
            raise InvalidArgument(name, f"{value!r} is not true or false")
        return _BOOLEANS[value]


@dataclass
class Response:
    status: int
    body: Any = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


Handler = Callable[[Request], Awaitable[Response]]


class Router:
    """(method, path regex) -> handler. Path arguments are named groups."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern)
        self._routes.append((method, re.compile(f"^{regex}/?$"), handler))

    def match(self, method: str, path: str) -> tuple[Handler, dict[str, str]] | NoRoute:
        """The handler and its path arguments, else 404 (no such path) or 405 with
        the methods the path has (its Allow header). HEAD is answered by the GET
        handler (App sends no body): RFC 9110 wants HEAD wherever GET is."""
        allow: list[str] = []
        for route_method, regex, handler in self._routes:
            m = regex.match(path)
            if m is None:
                continue
            allow.append(route_method)
            if route_method == method or (method == "HEAD" and route_method == "GET"):
                return handler, m.groupdict()
        if "GET" in allow:
            allow.append("HEAD")
        return NoRoute(405, tuple(allow)) if allow else NoRoute(404, ())


@dataclass(frozen=True)
class NoRoute:
    """No handler: 404, or 405 and the methods the path answers (``allow``)."""

    status: int
    allow: tuple[str, ...]


def json_response(status: int, body: Any, extra: list[tuple[bytes, bytes]] | None = None
                  ) -> Response:
    return Response(status, body, extra or [])


class App:
    """The ASGI callable. ``secret``: when set, X-Auth-Token must equal it."""

    def __init__(self, router: Router, secret: str | None,
                 on_change: Callable[[], None] | None = None) -> None:
        self.router = router
        self.secret = secret
        #: Called before and after every request that may change something (all
        #: but GET and HEAD): the lists kept between pages are dropped.
        self.on_change = on_change
        #: Requests answered 500 because of an unexpected exception (a bug each).
        self.unexpected = 0

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Awaitable[Any]],
                       send: Callable[..., Awaitable[None]]) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        response = await self._handle(scope, receive)
        if response is not None:
            await self._send(send, response, head=scope["method"] == "HEAD")

    async def _lifespan(self, receive: Callable[..., Awaitable[Any]],
                        send: Callable[..., Awaitable[None]]) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _handle(self, scope: dict[str, Any],
                      receive: Callable[..., Awaitable[Any]]) -> Response | None:
        method, path = scope["method"], scope["path"]
        # What a client sends reaches the log escaped (a NUL or newline in a URL
        # must not forge or break lines).
        shown = f"{esc(method, 20)} {esc(path)}"
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        tokens = sum(k.lower() == b"x-auth-token" for k, _ in scope.get("headers", []))
        if tokens > 1:
            # Which one counts would be this server's guess; a proxy in front that
            # checked another would disagree with it.
            log.info("%s -> 401: %d X-Auth-Token headers", shown, tokens)
            return Response(401, unauthenticated_body(""))
        token = headers.get("x-auth-token")
        if not token:
            log.info("%s -> 401: no X-Auth-Token", shown)
            return Response(401, unauthenticated_body(""))
        if self.secret is not None and not hmac.compare_digest(token.encode(),
                                                               self.secret.encode()):
            # As the API answers a key that does not exist: 401, not 403.
            log.info("%s -> 401: X-Auth-Token does not match SCW_SECRET_KEY", shown)
            return Response(401, unauthenticated_body(token))
        found = self.router.match(method, path)
        if isinstance(found, NoRoute):
            log.info("%s -> %d: no such route", shown, found.status)
            kind = "not_found" if found.status == 404 else "method_not_allowed"
            allow = [(b"allow", ", ".join(found.allow).encode())] if found.allow else []
            return Response(found.status, {"type": kind,
                                           "message": f"{method} {path}: no such route"},
                            allow)
        handler, args = found
        try:
            # Path IDs are held to the rule bodies are (model.check_uuid): anything
            # but a canonical lower-case UUID is a 400 naming the argument on every
            # route, as Scaleway's newer APIs answer; a well-formed ID of nothing
            # is the handler's 404. (Scaleway compares IDs case-sensitively: an
            # upper-case one is not the same ID, so it is refused, not folded.)
            for name, value in args.items():
                if name.endswith("_id"):
                    check_uuid(name, value)
            body = await _read_body(receive)
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"),
                             keep_blank_values=True)
            request = Request(method, path, query, headers, body, args)
            if self.on_change is None or method in ("GET", "HEAD"):
                return await handler(request)
            self.on_change()
            try:
                return await handler(request)
            finally:
                self.on_change()
        except ClientGone:
            log.info("%s: the client went away before its body ended: not done", shown)
            return None
        except SnapfsError as exc:
            status, err = error_body(exc)
            log.info("%s -> %d: %s", shown, status, esc(str(exc)))
            return Response(status, err)
        except Exception:  # a bug: answer 500 like the API, keep serving, keep the trace
            self.unexpected += 1
            log.exception("%s -> 500: unexpected error (bug #%d of this server)", shown,
                          self.unexpected)
            return Response(500, {"type": "internal_error", "message": "internal error"})

    @staticmethod
    async def _send(send: Callable[..., Awaitable[None]], response: Response,
                    head: bool = False) -> None:
        """``head``: the headers GET would send (its length too), no body."""
        headers = list(response.headers)
        payload = b""
        if response.body is not None:
            payload = json.dumps(response.body).encode()
            headers.append((b"content-type", b"application/json"))
        # RFC 9110 8.6: a 204 (or 1xx) MUST NOT carry Content-Length.
        if response.status >= 200 and response.status != 204:
            headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": response.status,
                    "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else payload})


class ClientGone(Exception):
    """The client went away before its request's body ended (fewer bytes than its
    Content-Length, a cut chunked body): the request is incomplete (RFC 9112 8)
    and is not carried out; nobody is left to answer."""


async def _read_body(receive: Callable[..., Awaitable[Any]]) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise InvalidArgument("body", f"larger than {MAX_BODY} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
