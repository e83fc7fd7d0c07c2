"""`snapfs serve` refuses hostile input with 400 and one escaped log line, and
is safe by default (issue 13): the naming and tag rules, numbers out of range,
bounded JSON, read-only fields, and no unauthenticated non-loopback listening."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import trio

from fixtures_http import SECRET, Served, start_server, stop_server
from snapfs.http.asgi import App, Request, Response, Router

SNAPSHOTS = "/instance/v1/zones/fr-par-1/snapshots"


def _raw(served: Served, method: str, path: str, **kw: Any) -> requests.Response:
    headers = kw.pop("headers", {"X-Auth-Token": SECRET})
    return requests.request(method, served.url + path, headers=headers, timeout=30, **kw)


def _listing(served: Served) -> list[tuple[str, str, list[str]]]:
    body = _raw(served, "GET", SNAPSHOTS, params={"per_page": 100}).json()
    return sorted((s["id"], s["name"], s["tags"]) for s in body["snapshots"])


def _refused(r: requests.Response, argument: str) -> None:
    assert r.status_code == 400, (r.status_code, r.text)
    body = r.json()
    assert body["type"] == "invalid_arguments"
    assert body["details"][0]["argument_name"] == argument, body


@pytest.fixture(scope="module")
def snapshot_id(served: Served) -> str:
    r = _raw(served, "POST", SNAPSHOTS,
             json={"name": "input-base", "volume_id": served.volumes["vol-a"]["id"]})
    assert r.status_code == 201, r.text
    return str(r.json()["snapshot"]["id"])


BAD_NAMES = ["", ".", "..", "a/b", "a~b", "new\nline", "nul\x00", "c1\x85", "x" * 256,
             "6f1b4a3e-7d3c-4c55-9a53-0d6f3f8b7c01", "bad\udcff"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_400_and_change_nothing(served: Served, snapshot_id: str,
                                              name: str) -> None:
    before = _listing(served)
    body = json.dumps({"name": name, "volume_id": served.volumes["vol-a"]["id"]})
    headers = {"X-Auth-Token": SECRET, "Content-Type": "application/json"}
    _refused(_raw(served, "POST", SNAPSHOTS, data=body, headers=headers), "name")
    _refused(_raw(served, "PATCH", f"{SNAPSHOTS}/{snapshot_id}",
                  data=json.dumps({"name": name}), headers=headers), "name")
    _refused(_raw(served, "PUT", f"{SNAPSHOTS}/{snapshot_id}",
                  data=json.dumps({"name": name}), headers=headers), "name")
    assert _listing(served) == before


@pytest.mark.parametrize("tags", [["x" * 129], ["."], ["a\nb"], ["a,b"], ["a/b"],
                                  [f"t{i}" for i in range(65)]])
def test_bad_tags_are_400_and_change_nothing(served: Served, snapshot_id: str,
                                             tags: list[str]) -> None:
    before = _listing(served)
    _refused(_raw(served, "PATCH", f"{SNAPSHOTS}/{snapshot_id}", json={"tags": tags}), "tags")
    assert _listing(served) == before


def test_duplicate_tags_are_dropped(served: Served, snapshot_id: str) -> None:
    r = _raw(served, "PATCH", f"{SNAPSHOTS}/{snapshot_id}", json={"tags": ["b", "a", "b"]})
    assert r.status_code == 200 and r.json()["snapshot"]["tags"] == ["b", "a"]


@pytest.mark.parametrize("params, argument", [
    ({"page": "1e20"}, "page"), ({"page": str(10 ** 20)}, "page"),
    ({"per_page": "1e30"}, "per_page"), ({"per_page": str(10 ** 30)}, "per_page"),
    ({"page": "9" * 5000}, "page"),
])
def test_numbers_out_of_range_are_400(served: Served, params: dict[str, str],
                                      argument: str) -> None:
    _refused(_raw(served, "GET", SNAPSHOTS, params=params), argument)
    _refused(_raw(served, "GET", "/instance/v1/zones/fr-par-1/volumes", params=params),
             argument)


@pytest.mark.parametrize("size", ["1e30", str(10 ** 30), str(1 << 63)])
def test_import_sizes_out_of_range_are_400(served: Served, size: str) -> None:
    before = _listing(served)
    body = '{"name": "imp", "bucket": "bkt", "key": "k", "size": %s}' % size
    r = _raw(served, "POST", SNAPSHOTS, data=body,
             headers={"X-Auth-Token": SECRET, "Content-Type": "application/json"})
    _refused(r, "size")
    assert _listing(served) == before


def test_deep_and_large_bodies_are_400(served: Served, snapshot_id: str) -> None:
    headers = {"X-Auth-Token": SECRET, "Content-Type": "application/json"}
    for depth in (40, 100_000):
        deep = '{"name": "x", "tags": ' + "[" * depth + "]" * depth + "}"
        _refused(_raw(served, "PATCH", f"{SNAPSHOTS}/{snapshot_id}", data=deep,
                      headers=headers), "body")
    r = _raw(served, "PATCH", f"{SNAPSHOTS}/{snapshot_id}", data=b" " * (2 << 20),
             headers=headers)
    _refused(r, "body")


@pytest.mark.parametrize("field, value", [("size", 512), ("volume_type", "l_ssd"),
                                          ("zone", "fr-par-2"), ("base_volume", None),
                                          ("creation_date", "2020-01-01T00:00:00Z")])
def test_set_changing_a_read_only_field_is_400(served: Served, snapshot_id: str,
                                               field: str, value: str) -> None:
    before = _raw(served, "GET", f"{SNAPSHOTS}/{snapshot_id}").json()["snapshot"]
    _refused(_raw(served, "PUT", f"{SNAPSHOTS}/{snapshot_id}", json={field: value}), field)
    assert _raw(served, "GET", f"{SNAPSHOTS}/{snapshot_id}").json()["snapshot"] == before


@pytest.mark.parametrize("changes", [
    {"state": "snapshotting"}, {"state": "error"}, {"error_reason": "forged"},
    {"state": "snapshotting", "modification_date": "2020-01-01T00:00:00Z"}])
def test_set_of_an_object_fetched_earlier_ignores_what_the_server_moved(
        served: Served, snapshot_id: str, changes: dict[str, str]) -> None:
    """A client's get-then-set still works after the capture ended meanwhile: the
    server-driven fields it sends back are ignored, the name and tags applied."""
    url = f"{SNAPSHOTS}/{snapshot_id}"
    deadline = time.monotonic() + 60
    while (before := _raw(served, "GET", url).json()["snapshot"])["state"] != "available":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = _raw(served, "PUT", url, json={**before, **changes})  # unchanged otherwise
    assert r.status_code == 200, r.text
    assert _raw(served, "GET", url).json()["snapshot"] == before  # nothing moved
    r = _raw(served, "PUT", url, json={**before, **changes, "name": "renamed-by-set"})
    assert r.status_code == 200, r.text
    after = _raw(served, "GET", url).json()["snapshot"]
    assert (after["name"], after["state"], after["error_reason"]) == (
        "renamed-by-set", "available", None)
    assert _raw(served, "PATCH", url, json={"name": before["name"]}).status_code == 200


def _send_raw(served: Served, request: bytes, hang_up: bool) -> bytes:
    """One request on a socket of its own; ``hang_up``: the client half-closes
    after sending (a request cut short), then reads whatever comes back."""
    host, port = served.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        if hang_up:
            time.sleep(0.2)
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_a_request_whose_body_was_cut_short_is_not_carried_out(
        served: Served, snapshot_id: str, method: str) -> None:
    """A body shorter than its Content-Length (the client gone mid-request) is an
    incomplete request: it was carried out all the same, the client told 400."""
    before = _listing(served)
    body = json.dumps({"name": "cut-short", "volume_id": served.volumes["vol-a"]["id"]}
                      if method == "POST" else {"name": "cut-short"}).encode()
    path = SNAPSHOTS if method == "POST" else f"{SNAPSHOTS}/{snapshot_id}"
    head = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {SECRET}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body) + 50}\r\n\r\n")
    _send_raw(served, head.encode() + body, hang_up=True)
    time.sleep(0.5)  # what the server would do with it, it has done by now
    assert _listing(served) == before
    assert served.log is not None
    assert b"went away before its body ended" in served.log.read_bytes()


def test_two_auth_tokens_are_401_whichever_comes_first(served: Served) -> None:
    for first, second in ((SECRET, "wrong"), ("wrong", SECRET), ("", SECRET)):
        answer = _send_raw(served, (f"GET {SNAPSHOTS} HTTP/1.1\r\nHost: x\r\n"
                                    f"X-Auth-Token: {first}\r\nX-Auth-Token: {second}\r\n"
                                    "Connection: close\r\n\r\n").encode(), hang_up=False)
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        assert b"denied_authentication" in answer


def test_a_volume_filter_naming_no_project_id_is_400(served: Served) -> None:
    _refused(_raw(served, "GET", "/instance/v1/zones/fr-par-1/volumes",
                  params={"project": "notauuid"}), "project")


def test_the_log_escapes_what_clients_send(served: Served) -> None:
    assert served.log is not None
    r = _raw(served, "GET", "/instance/v1/zones/fr-par-1/forged%00nul%0A"
             "2026-01-01 INFO snapfs.http: forged line")
    assert r.status_code == 404
    deadline = time.monotonic() + 10
    while b"forged" not in served.log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = served.log.read_bytes()
    assert b"\x00" not in log
    lines = [line for line in log.splitlines() if b"forged" in line]
    assert len(lines) == 1 and b"\\x00nul\\n2026-01-01" in lines[0], lines
    assert not any(line.startswith(b"2026-01-01") for line in log.splitlines())


def _serve(tmp_path: Path, listen: str, *extra: str, env: dict[str, str] | None = None
           ) -> subprocess.Popen[bytes]:
    clean = {k: v for k, v in __import__("os").environ.items() if not k.startswith("SCW_")}
    return subprocess.Popen([sys.executable, "-m", "snapfs", "serve", "--store",
                             str(tmp_path / "store"), "--listen", listen, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**clean, **(env or {})})


def test_serve_without_a_secret_refuses_a_non_loopback_address(tmp_path: Path) -> None:
    proc = _serve(tmp_path, "0.0.0.0:0")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and out == b""
    text = err.decode()
    assert text.strip().count("\n") == 0 and "SCW_SECRET_KEY" in text and "--no-auth" in text
    assert "Traceback" not in text


def test_serve_no_auth_listens_anywhere_with_a_warning(tmp_path: Path) -> None:
    proc = _serve(tmp_path, "0.0.0.0:0", "--no-auth")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("serving http://0.0.0.0:"), line
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "without authentication (--no-auth)" in err.decode()


def test_serve_with_a_secret_or_on_loopback_needs_no_flag(tmp_path: Path) -> None:
    proc, url = start_server(tmp_path / "store", tmp_path / "serve.log")
    try:
        assert url.startswith("http://127.0.0.1:")
    finally:
        assert stop_server(proc) == 0


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.0.2.1", False),
])
def test_which_addresses_count_as_loopback(host: str, loopback: bool) -> None:
    from snapfs.http.server import is_loopback
    assert is_loopback(host) is loopback


def test_an_unexpected_exception_is_a_500_counted_and_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """Only a bug is a 500: the app answers it, keeps serving, counts it, and logs
    it once with its traceback, the client's path escaped."""
    async def broken(request: Request) -> Response:
        raise RuntimeError("a bug")

    async def fine(request: Request) -> Response:
        return Response(200, {"ok": True}, [])

    router = Router()
    router.add("GET", "/broken/{x}", broken)
    router.add("GET", "/fine", fine)
    app = App(router, secret=None)

    async def call(path: str) -> tuple[int, Any]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
        scope = {"type": "http", "method": "GET", "path": path, "query_string": b"",
                 "headers": [(b"x-auth-token", b"t")]}
        await app(scope, receive, send)
        return sent[0]["status"], json.loads(sent[1]["body"])

    with caplog.at_level("INFO", logger="snapfs.http"):
        status, body = trio.run(call, "/broken/a\nb")
        assert (status, body["type"]) == (500, "internal_error")
        assert trio.run(call, "/fine")[0] == 200  # still serving
    assert app.unexpected == 1
    errors = [r for r in caplog.records if r.levelno >= 40]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert errors[0].getMessage().startswith("GET /broken/a\\nb -> 500: unexpected error")
