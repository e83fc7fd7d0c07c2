"""`snapfs serve` speaks HTTP as RFC 9110 says: no Content-Length on a 204, an
Allow header on a 405, and HEAD wherever GET is (its headers, no body)."""

from __future__ import annotations

import http.client
from typing import Any
from urllib.parse import urlsplit

import pytest

from fixtures_http import SECRET, Served

INST = "/instance/v1/zones/fr-par-1"
BLK = "/block/v1/zones/fr-par-1"


def _call(served: Served, method: str, path: str, body: str | None = None,
          token: str | None = SECRET) -> tuple[int, dict[str, str], bytes]:
    """One request on a connection of its own: the status, headers as sent
    (lower-cased names) and the raw body -- no client library filling anything in."""
    url = urlsplit(served.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
    try:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["X-Auth-Token"] = token
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def _snapshot(served: Served) -> str:
    import json
    status, _, body = _call(served, "POST", f"{INST}/snapshots", json.dumps(
        {"name": "proto", "volume_id": served.volumes["vol-a"]["id"]}))
    assert status == 201, body
    return str(json.loads(body)["snapshot"]["id"])


@pytest.mark.parametrize("api", ["instance", "block"])
def test_a_204_has_no_content_length(served: Served, api: str) -> None:
    snap_id = _snapshot(served)
    path = f"{INST}/snapshots/{snap_id}" if api == "instance" else f"{BLK}/snapshots/{snap_id}"
    status, headers, body = _call(served, "DELETE", path)
    assert status == 204 and body == b""
    assert "content-length" not in headers and "content-type" not in headers, headers
    assert _call(served, "GET", f"{INST}/snapshots/{snap_id}")[0] == 404


@pytest.mark.parametrize("method, path, allow", [
    ("POST", f"{INST}/volumes", {"GET", "HEAD"}),
    ("DELETE", f"{INST}/snapshots", {"GET", "HEAD", "POST"}),
    ("PUT", f"{BLK}/volumes/00000000-0000-4000-8000-000000000000",
     {"GET", "HEAD", "PATCH", "DELETE"}),
    ("POST", "/account/v3/projects", {"GET", "HEAD"}),
])
def test_a_405_says_what_is_allowed(served: Served, method: str, path: str,
                                    allow: set[str]) -> None:
    status, headers, body = _call(served, method, path, "{}")
    assert status == 405, body
    assert {m.strip() for m in headers["allow"].split(",")} == allow


@pytest.mark.parametrize("path", [
    f"{INST}/snapshots", f"{INST}/volumes", f"{BLK}/volumes", f"{BLK}/volume-types",
    "/account/v3/projects", f"{INST}/snapshots?per_page=0"])
def test_head_answers_as_get_without_a_body(served: Served, path: str) -> None:
    get: Any = _call(served, "GET", path)
    head: Any = _call(served, "HEAD", path)
    assert head[0] == get[0] and head[2] == b""
    assert head[1]["content-length"] == str(len(get[2]))
    assert head[1].get("x-total-count") == get[1].get("x-total-count")
    assert _call(served, "HEAD", path, token=None)[0] == 401
