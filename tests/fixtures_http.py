"""`snapfs serve` running for real: a subprocess on a free loopback port, over a
temporary local store holding real volumes (raw files with data in them), and
the official Scaleway SDK, unmodified, pointed at it.

Test modules import the fixtures they use from here (``from fixtures_http
import served``) so the file works with or without a conftest entry.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import trio

from fixtures_s3 import die_with_parent
from snapfs.local import open_local_service

#: The token the server demands (its SCW_SECRET_KEY) and a well-formed access key.
SECRET = str(uuid.uuid4())
ACCESS_KEY = "SCW" + "T" * 17
START_TIMEOUT = 60.0


@dataclass
class Served:
    url: str
    store: Path
    organization: str
    default_project: str
    other_project: str
    #: name -> {"id", "size", "zone", "project", "path"} of each volume in the store.
    volumes: dict[str, dict[str, Any]] = field(default_factory=dict)
    log: Path | None = None

    def client(self, **overrides: Any) -> Any:
        from scaleway import Client

        settings: dict[str, Any] = dict(
            access_key=ACCESS_KEY, secret_key=SECRET, api_url=self.url,
            default_zone="fr-par-1", default_organization_id=self.organization,
            default_project_id=self.default_project)
        settings.update(overrides)
        return Client(**settings)

    def instance(self, **overrides: Any) -> Any:
        from scaleway.instance.v1 import InstanceV1API

        return InstanceV1API(self.client(**overrides))


def write_volume(path: Path, size: int, data_at: list[tuple[int, int]], seed: int) -> None:
    """A sparse raw file of ``size`` bytes with random runs (offset, length) in it."""
    rnd = __import__("random").Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in data_at:
            f.seek(offset)
            f.write(rnd.randbytes(length))


async def _populate(store: Path, data_dir: Path) -> dict[str, Any]:
    async with open_local_service(store) as svc:
        projects = {p.name: p for p in await svc.list_projects()}
        other = await svc.create_project("other")
        specs = [  # name, size, data runs, zone, project
            ("vol-a", 8 << 20, [(0, 3 << 20), (6 << 20, 1 << 20)], "fr-par-1", None),
            ("vol-b", 4 << 20, [(1 << 20, 2 << 20)], "fr-par-1", other.id),
            ("vol-c", 2 << 20, [(0, 1 << 20)], "nl-ams-1", None),
        ]
        volumes = {}
        for i, (name, size, runs, zone, project) in enumerate(specs):
            path = data_dir / f"{name}.raw"
            await trio.to_thread.run_sync(write_volume, path, size, runs, i)
            v = await svc.add_volume(name, path, zone=zone, project=project)
            volumes[name] = {"id": v.id, "size": v.size, "zone": v.zone,
                             "project": v.project, "path": str(path)}
        return {"organization": projects["default"].organization,
                "default_project": projects["default"].id, "other_project": other.id,
                "volumes": volumes}


def start_server(store: Path, log: Path, env: dict[str, str] | None = None,
                 extra_args: list[str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start `snapfs serve --listen 127.0.0.1:0`; returns the process and its URL."""
    # No Object Storage unless the caller configures one: nothing inherited may point
    # the server at a real endpoint (SCW keys would select Scaleway's S3).
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("SCW_", "AWS_"))}
    full_env.update(AWS_CONFIG_FILE="/nonexistent/aws-config",
                    AWS_SHARED_CREDENTIALS_FILE="/nonexistent/aws-credentials")
    full_env.update(env or {})
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "snapfs", "serve", "--store", str(store),
             "--listen", "127.0.0.1:0", *(extra_args or [])],
            stdout=subprocess.PIPE, stderr=err, env=full_env, preexec_fn=die_with_parent)
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + START_TIMEOUT
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not sel.select(left):
            stop_server(proc)
            raise RuntimeError(f"snapfs serve did not start: {log.read_text()}")
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            proc.wait()
            raise RuntimeError(f"snapfs serve exited {proc.returncode}: {log.read_text()}")
        line += chunk
    sel.close()
    word, url = line.decode().split()
    assert word == "serving" and url.startswith("http://127.0.0.1:"), line
    return proc, url


def stop_server(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM (graceful), then SIGKILL if it does not exit in time. Returns the code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode


@contextlib.contextmanager
def serve_store(base: Path, s3: Any = None,
                creds: tuple[str, str] | None = None) -> Iterator[Served]:
    """A populated store under ``base`` served by `snapfs serve` (SCW_SECRET_KEY=SECRET);
    ``s3``: a fixtures_s3.SeaweedServer to give the server as Object Storage, with
    ``creds`` (default: the admin's; READER's make every export of the server fail)."""
    store, data = base / "store", base / "volumes"
    data.mkdir()
    info = trio.run(_populate, store, data)
    log = base / "serve.log"
    env = {"SCW_SECRET_KEY": SECRET}
    args: list[str] = []
    if s3 is not None:
        from fixtures_s3 import ADMIN
        key, secret = creds or ADMIN
        env.update(AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret,
                   AWS_DEFAULT_REGION="us-east-1")
        args = ["--s3-endpoint", s3.endpoint]
    proc, url = start_server(store, log, env, args)
    try:
        yield Served(url=url, store=store, log=log, **info)
    finally:
        code = stop_server(proc)
    assert code == 0, f"snapfs serve exited {code} on SIGTERM: {log.read_text()}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A running `snapfs serve` over a populated store, without Object Storage."""
    with serve_store(tmp_path_factory.mktemp("served")) as s:
        yield s


@pytest.fixture(scope="module")
def served_s3(tmp_path_factory: pytest.TempPathFactory, s3_server: Any) -> Iterator[Served]:
    """Like ``served``, with the session's SeaweedFS as the server's Object Storage."""
    with serve_store(tmp_path_factory.mktemp("served-s3"), s3_server) as s:
        yield s


def wait_state(api: Any, snapshot_id: str, state: str = "available",
               zone: str | None = None, timeout: float = 60.0) -> Any:
    """Poll Get snapshot (through the SDK) until ``state``; the last snapshot."""
    deadline = time.monotonic() + timeout
    while True:
        snap = api.get_snapshot(snapshot_id=snapshot_id, zone=zone).snapshot
        if str(snap.state) == state:
            return snap
        if time.monotonic() > deadline:
            raise AssertionError(f"snapshot {snapshot_id} still {snap.state} after {timeout}s")
        time.sleep(0.05)


def refused_400(r: Any, argument: str) -> None:
    """``r`` (a requests.Response) is the API's 400 naming ``argument``."""
    assert r.status_code == 400, (r.status_code, r.text)
    body = r.json()
    assert body["type"] == "invalid_arguments"
    assert body["details"][0]["argument_name"] == argument, body
