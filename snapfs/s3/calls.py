"""Every boto3 call goes through :class:`S3Calls`: off the trio thread under one
CapacityLimiter, retried with backoff while the failure is transient (s3ql's
``is_temp_failure`` idea), and mapped to a domain error when it is not.

botocore's own retries are switched off in the client (``client.py``) so that
this is the one place deciding how long to insist.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Callable

import botocore.exceptions as bex
import trio

from ..errors import InvalidAnswer, NotFound, PermissionDenied, SnapfsError, Transient

log = logging.getLogger(__name__)

#: S3 error codes that say "try again later".
TRANSIENT_CODES = frozenset({
    "SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling",
    "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "RequestThrottled",
    "OperationAborted", "BadDigest", "IncompleteBody", "XAmzContentSHA256Mismatch",
})
DENIED_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
    "AccountProblem", "InvalidToken", "ExpiredToken", "Forbidden",
})


def _client_error(exc: BaseException) -> tuple[str, int]:
    if isinstance(exc, bex.ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return str(err.get("Code", "")), int(status or 0)
    return "", 0


def is_temp_failure(exc: BaseException) -> bool:
    """True for failures that may go away by themselves: the connection (refused,
    reset, timed out, cut mid-body), throttling, and 5xx answers."""
    if isinstance(exc, (bex.ConnectionError, bex.HTTPClientError, bex.IncompleteReadError)):
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):  # raw socket errors mid-body
        return True
    try:
        import urllib3.exceptions as u3
        if isinstance(exc, (u3.ProtocolError, u3.ReadTimeoutError)):
            return True
    except ImportError:  # pragma: no cover - botocore depends on urllib3
        pass
    code, status = _client_error(exc)
    if code in TRANSIENT_CODES:
        return True
    return status >= 500 or status in (408, 429)


def describe(exc: BaseException) -> str:
    """A short cause for messages: the S3 error code and message, or the
    connection error's text. Never includes credentials (botocore's messages
    carry none)."""
    if isinstance(exc, bex.ClientError):
        err = exc.response.get("Error", {})
        code, status = _client_error(exc)
        msg = err.get("Message") or ""
        return f"{code or status}{': ' + msg if msg else ''}"
    return str(exc) or type(exc).__name__


def map_error(exc: BaseException, op: str, bucket: str, key: str | None,
              attempts: int = 1) -> SnapfsError:
    """The domain error for a failed S3 call (after retries, for transient ones)."""
    code, status = _client_error(exc)
    where = f"{bucket}/{key}" if key else bucket
    if code == "NoSuchBucket":
        return NotFound("bucket", bucket)
    if code in ("NoSuchKey", "NotFound") or (status == 404 and key):
        return NotFound("object", where)
    if status == 404:
        return NotFound("bucket", bucket)
    if code == "PreconditionFailed" or status == 412:  # a GET pinned to an ETag
        return InvalidAnswer(f"object {where} changed while being read (another version "
                           "replaced it); import it again")
    if code in DENIED_CODES or status == 403:
        return PermissionDenied(f"S3 {op} on {where} denied: {describe(exc)}")
    if is_temp_failure(exc):
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        return Transient(f"S3 {op} on {where} failed{tries}: {describe(exc)}")
    return SnapfsError(f"S3 {op} on {where} failed: {describe(exc)}")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: ``first_delay`` doubling up to
    ``max_delay``, at most ``attempts`` tries and ``budget`` seconds in all."""

    attempts: int = 8
    first_delay: float = 0.25
    max_delay: float = 8.0
    budget: float = 60.0


class S3Calls:
    def __init__(self, client: Any, limiter: trio.CapacityLimiter,
                 policy: RetryPolicy) -> None:
        self.client = client
        self.limiter = limiter
        self.policy = policy

    async def call(self, op: str, bucket: str, key: str | None, fn: Callable[[], Any],
                   policy: RetryPolicy | None = None) -> Any:
        """Run ``fn()`` (a boto3 call, including any body read) in a thread,
        retrying transient failures; raise the mapped domain error otherwise."""
        policy = policy or self.policy
        start = trio.current_time()
        attempt = 0
        while True:
            attempt += 1
            try:
                return await trio.to_thread.run_sync(fn, limiter=self.limiter)
            except Exception as exc:  # botocore, urllib3 and socket errors
                if isinstance(exc, SnapfsError):
                    raise
                elapsed = trio.current_time() - start
                delay = min(policy.max_delay, policy.first_delay * 2 ** (attempt - 1))
                delay = random.uniform(delay / 2, delay)
                if (not is_temp_failure(exc) or attempt >= policy.attempts
                        or elapsed + delay > policy.budget):
                    err = map_error(exc, op, bucket, key, attempt)
                    log.warning("%s", err)
                    raise err from None
                log.info("S3 %s on %s/%s: %s; retry %d in %.1fs", op, bucket, key or "",
                         describe(exc), attempt, delay)
                await trio.sleep(delay)
