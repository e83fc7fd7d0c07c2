"""Object Storage configuration (boto3's own environment and files, the explicit
endpoint, the Scaleway fallback) and the transient-failure classifier."""

from __future__ import annotations

from pathlib import Path

import botocore.exceptions as bex
import pytest

from fixtures_s3 import ADMIN, SeaweedServer
from snapfs.errors import InvalidArgument, NotFound, PermissionDenied, SnapfsError, Transient
from snapfs.s3.calls import is_temp_failure, map_error
from snapfs.s3.config import (S3Settings, make_client, payload_guarded, region_of_zone,
                              resolve_settings)
from snapfs.s3.storage import object_storage_from_config
from snapfs.s3.storage import S3ObjectStorage

AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE", "SCW_ACCESS_KEY", "SCW_SECRET_KEY",
            "SCW_DEFAULT_REGION", "SCW_DEFAULT_ZONE")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for var in AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    # No ~/.aws files either: point boto3 at paths that do not exist.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none-credentials"))
    return monkeypatch


def test_nothing_configured_gives_none(clean_env: pytest.MonkeyPatch) -> None:
    assert object_storage_from_config() is None


def test_scaleway_keys_pick_the_region_endpoint(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SCW_ACCESS_KEY", "SCWXXXXXXXXXXXXXXXXX")
    clean_env.setenv("SCW_SECRET_KEY", "11111111-2222-3333-4444-555555555555")
    s = resolve_settings(region="nl-ams")
    assert s is not None and s.endpoint == "https://s3.nl-ams.scw.cloud"
    assert s.region == "nl-ams" and s.access_key == "SCWXXXXXXXXXXXXXXXXX"
    clean_env.setenv("SCW_DEFAULT_ZONE", "pl-waw-2")
    s = resolve_settings()
    assert s is not None and s.endpoint == "https://s3.pl-waw.scw.cloud"
    assert "5555" not in repr(s) and "5555" not in repr(S3ObjectStorage(s))
    # An explicit or configured endpoint wins over the Scaleway fallback.
    s = resolve_settings(endpoint="http://127.0.0.1:9")
    assert s is not None and s.endpoint == "http://127.0.0.1:9" and s.access_key is None
    clean_env.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:10")
    s = resolve_settings()
    assert s is not None and s.endpoint is None  # left to boto3, which reads the variable


async def test_scaleway_fallback_uses_each_zones_region(clean_env: pytest.MonkeyPatch) -> None:
    """No endpoint + Scaleway keys: a snapshot of nl-ams-1 goes to s3.nl-ams, one of
    fr-par-2 to s3.fr-par, whatever the default region. Clients are only built
    here (boto3 makes no request until a call), so no network is needed."""
    clean_env.setenv("SCW_ACCESS_KEY", "SCWXXXXXXXXXXXXXXXXX")
    clean_env.setenv("SCW_SECRET_KEY", "11111111-2222-3333-4444-555555555555")
    clean_env.setenv("SCW_DEFAULT_REGION", "pl-waw")
    objects = object_storage_from_config()
    assert isinstance(objects, S3ObjectStorage)
    try:
        for zone, region in (("nl-ams-1", "nl-ams"), ("fr-par-2", "fr-par"), (None, "pl-waw")):
            s = objects.settings_for(zone)
            assert s.endpoint == f"https://s3.{region}.scw.cloud" and s.region == region
            assert s.access_key == "SCWXXXXXXXXXXXXXXXXX" and s.max_parts == 1000
            client = (await objects.calls_for(zone)).client
            assert client.meta.endpoint_url == f"https://s3.{region}.scw.cloud"
            assert client.meta.region_name == region
        # One client per region, made once: nl-ams-2 shares nl-ams-1's.
        assert (await objects.calls_for("nl-ams-2")).client is \
            (await objects.calls_for("nl-ams-1")).client
        assert (await objects.calls_for("fr-par-1")).client is not \
            (await objects.calls_for("nl-ams-1")).client
    finally:
        await objects.aclose()
    # An explicit endpoint: the zone changes nothing.
    explicit = object_storage_from_config("http://127.0.0.1:9")
    assert isinstance(explicit, S3ObjectStorage)
    assert explicit.settings_for("nl-ams-1") is explicit.settings
    assert explicit.settings.endpoint == "http://127.0.0.1:9"


def test_region_of_zone() -> None:
    assert region_of_zone("fr-par-1") == "fr-par"
    assert region_of_zone("nl-ams") == "nl-ams"


def test_bad_endpoint_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidArgument, match="s3-endpoint"):
        object_storage_from_config(endpoint="ftp://example")


@pytest.mark.s3
async def test_boto3_environment_reaches_the_server(
        clean_env: pytest.MonkeyPatch, s3_server: SeaweedServer, bucket: str) -> None:
    """AWS_ENDPOINT_URL + AWS_ACCESS_KEY_ID/SECRET, nothing passed explicitly."""
    s3_server.client().put_object(Bucket=bucket, Key="x", Body=b"not qcow2")
    clean_env.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    clean_env.setenv("AWS_ACCESS_KEY_ID", ADMIN[0])
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", ADMIN[1])
    clean_env.setenv("AWS_DEFAULT_REGION", "us-east-1")
    objects = object_storage_from_config()
    assert objects is not None
    try:
        with pytest.raises(SnapfsError, match="bad magic"):
            await objects.open_qcow2(bucket, "x")
    finally:
        await objects.aclose()


@pytest.mark.s3
async def test_profile_in_aws_config_files(clean_env: pytest.MonkeyPatch, tmp_path: Path,
                                           s3_server: SeaweedServer, bucket: str) -> None:
    cfg, creds = tmp_path / "config", tmp_path / "credentials"
    cfg.write_text(f"[profile snap]\nregion = us-east-1\nendpoint_url = {s3_server.endpoint}\n")
    creds.write_text(f"[snap]\naws_access_key_id = {ADMIN[0]}\n"
                     f"aws_secret_access_key = {ADMIN[1]}\n")
    clean_env.setenv("AWS_CONFIG_FILE", str(cfg))
    clean_env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    clean_env.setenv("AWS_PROFILE", "snap")
    objects = object_storage_from_config()
    assert objects is not None
    try:
        with pytest.raises(NotFound, match="missing"):
            await objects.open_qcow2(bucket, "missing")
    finally:
        await objects.aclose()


def _client_error(code: str, status: int) -> bex.ClientError:
    return bex.ClientError({"Error": {"Code": code, "Message": "m"},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


def test_is_temp_failure() -> None:
    assert is_temp_failure(bex.EndpointConnectionError(endpoint_url="http://x"))
    assert is_temp_failure(bex.ReadTimeoutError(endpoint_url="http://x"))
    assert is_temp_failure(_client_error("SlowDown", 503))
    assert is_temp_failure(_client_error("InternalError", 500))
    assert is_temp_failure(_client_error("", 502))
    assert not is_temp_failure(_client_error("AccessDenied", 403))
    assert not is_temp_failure(_client_error("NoSuchBucket", 404))
    assert not is_temp_failure(ValueError("x"))


def test_map_error() -> None:
    assert isinstance(map_error(_client_error("NoSuchBucket", 404), "op", "b", "k"), NotFound)
    e = map_error(_client_error("NoSuchKey", 404), "op", "b", "k")
    assert isinstance(e, NotFound) and "b/k" in str(e)
    assert isinstance(map_error(_client_error("AccessDenied", 403), "op", "b", "k"),
                      PermissionDenied)
    t = map_error(_client_error("SlowDown", 503), "upload_part", "b", "k", attempts=5)
    assert isinstance(t, Transient) and "after 5 attempts" in str(t)
    assert "SlowDown" in str(t)


def test_part_size_stays_under_the_part_limit(clean_env: pytest.MonkeyPatch) -> None:
    from snapfs.s3.config import S3Settings
    from snapfs.s3.export import part_count, part_size_for
    MiB = 1 << 20
    assert part_size_for(S3Settings(), 2 << 30) == 8 * MiB
    big = 1 << 40
    assert part_count(big, part_size_for(S3Settings(), big)) <= 10_000
    clean_env.setenv("SCW_ACCESS_KEY", "SCWXXXXXXXXXXXXXXXXX")
    clean_env.setenv("SCW_SECRET_KEY", "secret")
    scw = resolve_settings()
    assert scw is not None and scw.max_parts == 1000
    assert part_count(100 << 30, part_size_for(scw, 100 << 30)) <= 1000


def test_scaleway_endpoint_uses_scaleway_keys(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SCW_ACCESS_KEY", "SCWYYYYYYYYYYYYYYYYY")
    clean_env.setenv("SCW_SECRET_KEY", "secret")
    s = resolve_settings(endpoint="https://s3.nl-ams.scw.cloud")
    assert s is not None and s.region == "nl-ams" and s.max_parts == 1000
    assert s.access_key == "SCWYYYYYYYYYYYYYYYYY"
    clean_env.setenv("AWS_ACCESS_KEY_ID", "AKIA")  # boto3's own credentials win
    s = resolve_settings(endpoint="https://s3.nl-ams.scw.cloud")
    assert s is not None and s.access_key is None


@pytest.mark.parametrize("endpoint, guarded", [
    (None, True), ("https://s3.fr-par.scw.cloud", True), ("http://127.0.0.1:8333", True),
    ("http://127.9.8.7:80", True), ("http://[::1]:8333", True), ("http://localhost:9000", True),
    ("http://10.0.0.5:8333", False), ("http://minio.lan:9000", False),
    ("http://localhost.example.com", False)])
def test_payload_guarded(endpoint: str | None, guarded: bool) -> None:
    assert payload_guarded(endpoint) is guarded


@pytest.mark.s3
@pytest.mark.parametrize("sign", [None, True, False], ids=["auto", "signed", "unsigned"])
def test_payload_signing_as_configured(s3_server: SeaweedServer, bucket: str,
                                       sign: bool | None) -> None:
    """Loopback (the test server) skips the body's SHA-256 unless asked for it,
    and the server takes the upload either way."""
    client = make_client(s3_server.settings(sign_payload=sign))
    sent: list[str] = []

    def record(request: object, **_: object) -> None:
        value = request.headers["X-Amz-Content-SHA256"]  # type: ignore[attr-defined]
        sent.append(value.decode() if isinstance(value, bytes) else value)

    client.meta.events.register("before-send.s3.PutObject", record)
    body = bytes(range(256)) * 4000
    client.put_object(Bucket=bucket, Key=f"signed-{sign}", Body=body)
    assert sent and (sent[0] == "UNSIGNED-PAYLOAD") is (sign is not True)
    if sign:
        assert len(sent[0]) == 64  # the body's SHA-256 in hex
    got = s3_server.client().get_object(Bucket=bucket, Key=f"signed-{sign}")["Body"].read()
    assert got == body


@pytest.mark.parametrize("url, signed", [("http://minio.lan:9000", True),
                                         ("https://minio.lan:9000", False),
                                         ("http://127.0.0.1:9000", False)])
def test_payload_signing_follows_boto3s_own_endpoint(clean_env: pytest.MonkeyPatch, url: str,
                                                     signed: bool) -> None:
    """No endpoint in the settings (resolve_settings leaves AWS_ENDPOINT_URL and
    profiles to boto3): the endpoint boto3 will use decides, so plain http to
    another machine stays signed."""
    clean_env.setenv("AWS_ENDPOINT_URL", url)
    client = make_client(S3Settings(region="us-east-1", access_key="a", secret_key="b"))
    assert client.meta.endpoint_url.rstrip("/") == url
    assert client.meta.config.s3["payload_signing_enabled"] is signed
