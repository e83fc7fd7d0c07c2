"""Where the Object Storage is and how to reach it: boto3's own configuration
(AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, AWS_PROFILE, ~/.aws/config and ~/.aws/credentials), an
explicit endpoint (``snapfs mount --s3-endpoint``), and, when no endpoint is
configured but Scaleway credentials are (SCW_ACCESS_KEY / SCW_SECRET_KEY), the
Scaleway Object Storage of the region: ``https://s3.<region>.scw.cloud``.

Secrets stay in the settings object (never in its repr) and in boto3; nothing
here logs them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url

from ..errors import InvalidArgument
from ..logtext import esc
from .calls import RetryPolicy

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_SCW_REGION = "fr-par"
#: Scaleway Object Storage accepts at most 1000 parts per multipart upload.
SCW_MAX_PARTS = 1000


@dataclass(frozen=True)
class S3Settings:
    """Everything the S3 layer needs. ``None`` fields are left to boto3."""

    endpoint: str | None = None
    region: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    profile: str | None = None
    #: Upload part size (grown for huge images to stay under 10 000 parts).
    #: SeaweedFS, measured (1 GiB, interleaved rounds): 8 MiB parts 9.27 s
    #: median of 4, faster than 6 MiB in each pair (9.66 s); 16 MiB 7.4 s vs
    #: 8.2 s for 6 MiB, but the export's peak RSS rose from ~130 to 194-196 MB,
    #: too near the 200 MB budget; 8 in flight were no faster than 4. Ninth
    #: session, parts sent without copies, 5 paired rounds with aws s3 cp:
    #: 8 MiB 8.84 s, 16 MiB x 3 in flight 8.78 s (150 vs 127 MB), aws 9.13 s --
    #: SeaweedFS's CPU sets the pace: no measurable gain, so 8 MiB stays.
    part_size: int = 8 * MiB
    #: Where an export spills parts too big for memory (temporary files,
    #: unlinked at once); None: $TMPDIR, else /var/tmp (disk, not a tmpfs).
    spill_dir: str | None = None
    #: The server's limit on parts per upload (S3: 10 000; Scaleway: 1000).
    max_parts: int = 10_000
    #: Parallel part uploads / ranged GETs of one export or import.
    concurrency: int = 4
    #: Largest single ranged GET of an import. Per-request cost dominates below
    #: ~16 MiB (SeaweedFS, measured: 1 GiB in 1.6-2.1 s with 8 MiB GETs, 1.3-1.5 s
    #: with 16 MiB ones, more GETs in parallel no faster).
    max_get: int = 16 * MiB
    #: Import read-ahead window for sequential reads.
    readahead: int = 16 * MiB
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retry: RetryPolicy = RetryPolicy()
    #: Retries for abort_multipart_upload: longer, so no part is left behind
    #: when the server comes back within this time.
    abort_retry: RetryPolicy = RetryPolicy(attempts=12, budget=60.0)
    #: SHA-256 of every request body in its signature. None (default): only where
    #: the bytes cross a network without TLS; over https TLS already guards them
    #: and on loopback nobody sits between, so the hash is CPU spent twice (once
    #: here, once by the server checking it) for nothing.
    sign_payload: bool | None = None
    #: No endpoint configured, Scaleway keys: each zone's region has its own
    #: endpoint (``for_region``); ``endpoint``/``region`` are the default region's.
    scw_fallback: bool = False

    def for_region(self, region: str) -> "S3Settings":
        """These settings for the Scaleway Object Storage of ``region``."""
        return self.replace(endpoint=scaleway_endpoint(region), region=region)

    def replace(self, **changes: Any) -> "S3Settings":
        return dataclasses.replace(self, **changes)


def payload_guarded(endpoint: str | None) -> bool:
    """Whether request bodies to ``endpoint`` are safe from tampering without a
    payload hash: TLS (https; None means AWS's own, https -- callers pass the
    endpoint boto3 will really use, see make_client) or a loopback address,
    which no other machine sees."""
    if endpoint is None:
        return True
    parts = urlsplit(endpoint)
    if parts.scheme == "https":
        return True
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def scaleway_endpoint(region: str) -> str:
    return f"https://s3.{region}.scw.cloud"


def region_of_zone(zone: str) -> str:
    """fr-par-1 -> fr-par (Scaleway zones are region + '-N')."""
    head, _, tail = zone.rpartition("-")
    return head if tail.isascii() and tail.isdigit() and head else zone


def _configured_endpoint(profile: str | None) -> str | None:
    """An endpoint boto3 would use by itself (environment or profile)."""
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        import botocore.session
        sess = botocore.session.Session(profile=profile)
        scoped = sess.get_scoped_config()
    except Exception:  # a broken or missing profile: boto3 will say so on use
        return None
    if scoped.get("endpoint_url"):
        return str(scoped["endpoint_url"])
    s3 = scoped.get("s3")
    if isinstance(s3, dict) and s3.get("endpoint_url"):
        return str(s3["endpoint_url"])
    return None


def _aws_configured() -> bool:
    if os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE"):
        return True
    for var, default in (("AWS_CONFIG_FILE", "~/.aws/config"),
                         ("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")):
        if Path(os.path.expanduser(os.environ.get(var) or default)).is_file():
            return True
    return False


def resolve_settings(endpoint: str | None = None, region: str | None = None
                     ) -> S3Settings | None:
    """The settings from the environment, or None when nothing at all is
    configured (no endpoint, no AWS credentials or config, no Scaleway keys)."""
    if endpoint is not None:
        check_endpoint(endpoint)
    profile = os.environ.get("AWS_PROFILE") or None
    configured = endpoint or _configured_endpoint(profile)
    if configured and not endpoint:  # boto3's own settings: held to the same rule
        check_endpoint(configured, "AWS_ENDPOINT_URL (or the profile's endpoint_url)")
    scw_key, scw_secret = os.environ.get("SCW_ACCESS_KEY"), os.environ.get("SCW_SECRET_KEY")
    if not configured and scw_key and scw_secret:
        reg = (region or os.environ.get("SCW_DEFAULT_REGION")
               or region_of_zone(os.environ.get("SCW_DEFAULT_ZONE", "")) or DEFAULT_SCW_REGION)
        url = scaleway_endpoint(reg)
        log.info("Object Storage: Scaleway, the zone's region (default %s)", url)
        return S3Settings(endpoint=url, region=reg, access_key=scw_key, secret_key=scw_secret,
                          max_parts=SCW_MAX_PARTS, scw_fallback=True)
    if not configured and not _aws_configured():
        return None
    # Leave endpoint/credentials/region to boto3 unless given here.
    shown = endpoint or configured or "AWS default endpoint"
    log.info("Object Storage: %s", shown)
    host = urlsplit(shown).hostname or ""
    if not host.endswith(".scw.cloud"):
        return S3Settings(endpoint=endpoint, region=region, profile=profile)
    # A Scaleway endpoint: its 1000-part limit, its region (s3.<region>.scw.cloud),
    # and the Scaleway keys when boto3 has no credentials of its own in the env.
    scw_region = region or (host.split(".")[1] if host.count(".") == 3 else None)
    use_scw = bool(scw_key and scw_secret and not os.environ.get("AWS_ACCESS_KEY_ID")
                   and not profile)
    return S3Settings(endpoint=endpoint, region=scw_region, profile=profile,
                      access_key=scw_key if use_scw else None,
                      secret_key=scw_secret if use_scw else None, max_parts=SCW_MAX_PARTS)


def check_endpoint(url: str, what: str = "s3-endpoint") -> str:
    """An http(s) URL botocore will take, checked when given: refused later, at
    each export's first call, it was an "internal error" with a traceback."""
    try:
        parts = urlsplit(url)
        host_ok = bool(is_valid_endpoint_url(url) or is_valid_ipv6_endpoint_url(url))
        parts.port  # noqa: B018  (ValueError: not a port number, or past 65535)
    except ValueError:  # also an IPv6 address without its closing bracket
        parts, host_ok = None, False
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidArgument(what, f"{esc(url)} is not an http(s) URL")
    if not host_ok:
        raise InvalidArgument(what, f"{esc(url)}: not a host name, IPv4 or [IPv6] "
                                    "address (and port) S3 clients take")
    return url


def make_client(settings: S3Settings) -> Any:
    """A boto3 S3 client (thread-safe; shared by all calls). Blocking: call it
    from a worker thread."""
    import boto3
    from botocore.config import Config

    session = boto3.Session(profile_name=settings.profile) if settings.profile \
        else boto3.Session()
    s3_options: dict[str, Any] = {}
    if settings.endpoint:
        host = urlsplit(settings.endpoint).hostname or ""
        try:
            ipaddress.ip_address(host)
            is_ip = True
        except ValueError:
            is_ip = host == "localhost"
        if is_ip:  # no virtual-hosted buckets on an IP address
            s3_options["addressing_style"] = "path"
    sign = settings.sign_payload
    if sign is None:  # judged by the endpoint boto3 will use: ours, else its env's or profile's
        sign = not payload_guarded(settings.endpoint or _configured_endpoint(settings.profile))
    # botocore signs the payload of every request over http, and over https too
    # unless a checksum header is sent (we send none: see below).
    s3_options["payload_signing_enabled"] = bool(sign)
    config = Config(
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        # Our own retry loop (calls.py) decides; botocore tries once.
        retries={"total_max_attempts": 1, "mode": "standard"},
        max_pool_connections=max(10, settings.concurrency * 2 + 2),
        # Scaleway and other S3-compatible stores refuse boto3's newer default
        # CRC trailers on uploads; only send checksums the operation requires.
        request_checksum_calculation=os.environ.get(
            "AWS_REQUEST_CHECKSUM_CALCULATION", "when_required"),
        response_checksum_validation=os.environ.get(
            "AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required"),
        s3=s3_options or None,
    )
    kwargs: dict[str, Any] = {"config": config}
    if settings.endpoint:
        kwargs["endpoint_url"] = settings.endpoint
    if settings.region:
        kwargs["region_name"] = settings.region
    if settings.access_key and settings.secret_key:
        kwargs["aws_access_key_id"] = settings.access_key
        kwargs["aws_secret_access_key"] = settings.secret_key
    return session.client("s3", **kwargs)
