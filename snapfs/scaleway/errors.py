"""Scaleway API errors (the SDK's ScalewayException) read back as domain errors.

The API's error body carries a ``type`` (invalid_arguments, not_found,
permissions_denied, precondition_failed, transient_state...) and the status;
both choose one domain kind here, and the errno then comes from the one table
in ``snapfs.errors`` like for every other backend. This is the inverse of
``snapfs.http.api_errors`` (tests check the round trip through ``snapfs serve``).
"""

from __future__ import annotations

from typing import Any

import requests
from urllib3.exceptions import NewConnectionError
from scaleway_core.api import API, ScalewayException, ValidationError

from ..errors import (AlreadyExists, InvalidArgument, NotConfigured, NotFound, NotPermitted,
                      PermissionDenied, PreconditionFailed, SnapfsError, SnapshotUnusable,
                      Transient)
from ..block_model import BLOCK_RESOURCE
from ..http.api_errors import API_RESOURCE, NOT_CONFIGURED_PRECONDITION, UNUSABLE_PRECONDITION

_OUR_RESOURCE = {api: ours for table in (API_RESOURCE, BLOCK_RESOURCE)
                 for ours, api in table.items()}


def is_retryable(exc: BaseException) -> bool:
    """429, 5xx and connection-level failures are worth another try; not 501 (the
    server does not do that at all: RFC 9110 15.6.2) nor 505."""
    if isinstance(exc, ScalewayException):
        status = exc.status_code or 0
        return status == 429 or (status >= 500 and status not in (501, 505))
    return isinstance(exc, (requests.ConnectionError, requests.Timeout))


def unanswered_safely(exc: BaseException) -> bool:
    """Whether a failed attempt surely did nothing on the server: refused before
    its work (429, 503), or never sent (no connection made). A timeout or another
    5xx may come after the work was done: a POST is not sent again then."""
    if isinstance(exc, ScalewayException):
        return (exc.status_code or 0) in (429, 503)
    return isinstance(exc, requests.ConnectionError) and not isinstance(
        exc, requests.ReadTimeout) and _before_sending(exc)


def _before_sending(exc: requests.ConnectionError) -> bool:
    """A connection refused or not made in time: the request never left (urllib3's
    NewConnectionError, ConnectTimeoutError being one, under requests' error)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0] if exc.args else None, "reason", None)
    return isinstance(reason, NewConnectionError)


def is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, ScalewayException) and exc.status_code == 404


def retry_after(exc: BaseException) -> float | None:
    """The server's Retry-After in seconds, when it sent one as delta-seconds: ASCII
    digits only (str.isdigit() also takes '²', which int() and float() refuse); an
    HTTP-date or anything else is no number of seconds, and the backoff is used.
    Not capped here: the caller caps it (float() of 400 digits is inf, still capped)."""
    if isinstance(exc, ScalewayException):
        value = (exc.response.headers.get("retry-after") or "").strip()
        if value and value.isascii() and value.isdigit():
            return float(value)
    return None


def _json_object(res: requests.Response) -> dict[str, Any] | None:
    """The answer's body as a JSON object, or None when it is anything else (a
    proxy's HTML page, an empty body, a bare string)."""
    try:
        data = res.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _body(exc: ScalewayException) -> dict[str, Any]:
    return _json_object(exc.response) or {}


class GuardedAPI(API):
    """The SDK's APIs with one check in front of theirs: an error answer whose body
    is not the API's JSON object (a load balancer's HTML 502, an empty 503) raised
    ``requests.JSONDecodeError`` from inside the SDK, which kept no status -- it
    is a ScalewayException here, so the status decides (``to_domain``)."""

    def _throw_on_error(self, res: requests.Response) -> None:
        if res.status_code is not None and res.status_code >= 400:
            data = _json_object(res)
            if data is None or (data.get("message") == "Validation Error"
                                and not isinstance(data.get("fields"), dict)):
                raise ScalewayException(res)
        super()._throw_on_error(res)


def to_domain(exc: BaseException, what: str) -> SnapfsError:
    """The domain error for a failed SDK call; ``what`` names the call for messages."""
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return Transient(f"{what}: cannot reach the Scaleway API: {exc}")
    if isinstance(exc, requests.JSONDecodeError):
        # A success status with a body that is not JSON: not the API answering.
        return SnapfsError(f"{what}: the answer is not the API's JSON")
    if isinstance(exc, ValueError) and not isinstance(exc, ScalewayException):
        # The SDK validates path parameters and client settings with ValueError.
        return InvalidArgument("request", f"{what}: {exc}")
    if not isinstance(exc, ScalewayException):
        return SnapfsError(f"{what}: {exc}")
    status = exc.status_code or 0
    if _json_object(exc.response) is None:
        # Not the API's own answer (its errors are JSON): only the status says
        # anything, and the body (an HTML page) is not shown.
        reason = f"{what}: HTTP {status}: {exc.response.reason or 'no reason'}"
        if is_retryable(exc):  # 429, 5xx but 501 and 505: as the retries judged it
            return Transient(reason)
        if status in (401, 403):
            return PermissionDenied(reason)
        return SnapfsError(reason)
    body = _body(exc)
    kind = body.get("type")
    message = str(body.get("message") or exc.response.reason or f"HTTP {status}")
    if isinstance(exc, ValidationError) and exc.errors:
        field, reason = next(iter(exc.errors.items()))
        return InvalidArgument(str(field), str(reason))
    if kind == "invalid_arguments":
        details = body.get("details") or [{}]
        first = details[0] if isinstance(details[0], dict) else {}
        return InvalidArgument(str(first.get("argument_name") or "request"),
                               str(first.get("help_message") or first.get("reason")
                                   or message))
    if kind == "not_found" or (kind is None and status == 404):
        resource = str(body.get("resource") or "resource")
        return NotFound(_OUR_RESOURCE.get(resource, resource),
                        str(body.get("resource_id") or what))
    if kind in ("permissions_denied", "denied_authentication", "authorization_required") \
            or status in (401, 403):
        return PermissionDenied(f"{what}: {message}")
    if kind == "precondition_failed":
        reason = str(body.get("help_message") or message)
        if body.get("precondition") == UNUSABLE_PRECONDITION:
            return SnapshotUnusable(reason)
        if body.get("precondition") == NOT_CONFIGURED_PRECONDITION:
            return NotConfigured(f"{what}: {reason}")
        return PreconditionFailed(f"{what}: {reason}")
    if kind == "transient_state":
        return PreconditionFailed(f"{what}: {body.get('resource', 'resource')} "
                                  f"{body.get('resource_id', '')} is "
                                  f"{body.get('current_state', 'busy')}")
    if kind == "conflict":
        return AlreadyExists(f"{what}: {message}")
    if kind == "invalid_request_error":
        return NotPermitted(f"{what}: {message}")
    if status in (429, 502, 503, 504) or kind == "transient_error":
        return Transient(f"{what}: HTTP {status}: {message}")
    if status >= 500:
        # Still failing after the retries: the server's own error (EIO), not EAGAIN.
        return SnapfsError(f"{what}: HTTP {status}: {message}")
    if status in (409, 412):
        return PreconditionFailed(f"{what}: {message}")
    if status == 400:
        return InvalidArgument("request", f"{what}: {message}")
    return SnapfsError(f"{what}: HTTP {status}: {message}")
