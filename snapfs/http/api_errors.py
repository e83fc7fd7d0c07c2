"""Domain errors rendered as the Scaleway API's error bodies.

The status comes from ``snapfs.errors.http_status_for`` (the one table); this
module only chooses the JSON shape each kind has in the real API, so that the
official SDKs (and ``snapfs.scaleway.errors``, which reads them back) see what
they would see from api.scaleway.com.
"""

from __future__ import annotations

import uuid
from typing import Any

from ..errors import (InvalidArgument, NotConfigured, NotFound, PermissionDenied,
                      PreconditionFailed, SnapfsError, SnapshotUnusable, http_status_for)

#: Our resource names -> the API's resource names in ``not_found`` bodies.
API_RESOURCE = {"snapshot": "instance_snapshot", "volume": "instance_volume",
                "task": "instance_task", "project": "account_project",
                "bucket": "s3_bucket", "object": "s3_object"}

#: ``precondition`` value marking a SnapshotUnusable (so a client maps it back to
#: EIO rather than the EBUSY of an ordinary precondition failure).
UNUSABLE_PRECONDITION = "snapshot_unusable"
#: ... and a NotConfigured (ENXIO: this server was not given what the request needs).
NOT_CONFIGURED_PRECONDITION = "not_configured"


def error_body(exc: SnapfsError) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) for one refusal."""
    status = http_status_for(exc)
    body: dict[str, Any] = {"type": exc.api_type, "message": str(exc)}
    if isinstance(exc, InvalidArgument):
        body["message"] = "invalid argument(s)"
        body["details"] = [{"argument_name": exc.field, "reason": "constraint",
                            "help_message": exc.reason}]
    elif isinstance(exc, NotFound):
        body["resource"] = API_RESOURCE.get(exc.resource, exc.resource)
        body["resource_id"] = exc.ident
    elif isinstance(exc, SnapshotUnusable):
        body["precondition"] = UNUSABLE_PRECONDITION
        body["help_message"] = str(exc)
    elif isinstance(exc, PreconditionFailed):
        body["precondition"] = "resource_state"
        body["help_message"] = str(exc)
    elif isinstance(exc, NotConfigured):
        body["precondition"] = NOT_CONFIGURED_PRECONDITION
        body["help_message"] = str(exc)
    elif isinstance(exc, PermissionDenied):
        body["details"] = [{"resource": "instance", "action": "access"}]
    return status, body


def unauthenticated_body(token: str) -> dict[str, Any]:
    """401: the API's answer to a request whose X-Auth-Token is no key it knows.
    The reasons are the ones the official SDKs explain (DeniedAuthenticationError):
    ``invalid_argument`` ("invalid api_key format or empty value": none, or not a
    key's UUID form) and ``not_found`` ("api_key does not exist"). A key that
    exists but may not do something is 403 ``permissions_denied``; serve has no
    such keys (one secret, every right)."""
    try:
        uuid.UUID(token)
        reason = "not_found"
    except ValueError:
        reason = "invalid_argument"
    return {"type": "denied_authentication", "message": "authentication is denied",
            "method": "api_key", "reason": reason}
