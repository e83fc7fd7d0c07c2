"""The composition root (snapfs/backends.py): one settings object opens either
backend with its Object Storage and closes both; `snapfs serve` serves any
backend -- here the cloud backend, pointed at another `snapfs serve`."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio

from fixtures_http import ACCESS_KEY, SECRET, Served, start_server, stop_server, wait_state
from fixtures_s3 import ADMIN, SeaweedServer
from snapfs.backends import BackendSettings, open_backend
from snapfs.errors import InvalidArgument
from snapfs.local import LocalService
from snapfs.s3.storage import S3ObjectStorage
from snapfs.scaleway import ScalewayService


def scw_env(s: Served) -> dict[str, str]:
    return {"SCW_ACCESS_KEY": ACCESS_KEY, "SCW_SECRET_KEY": SECRET, "SCW_API_URL": s.url,
            "SCW_DEFAULT_ORGANIZATION_ID": s.organization,
            "SCW_DEFAULT_PROJECT_ID": s.default_project, "SCW_DEFAULT_ZONE": "fr-par-1",
            "SCW_CONFIG_PATH": "/nonexistent/scw.yaml"}


def test_the_local_backend_is_opened_and_closed(tmp_path: Path) -> None:
    async def main() -> LocalService:
        async with open_backend(BackendSettings(store=tmp_path / "s", objects=False)) as svc:
            assert isinstance(svc, LocalService)
            assert [p.name for p in await svc.list_projects()] == ["default"]
            return svc
    svc = trio.run(main)
    with pytest.raises(sqlite3.ProgrammingError):  # closed with the block
        svc.md.conn.execute("SELECT 1")


@pytest.mark.s3
def test_the_object_storage_is_the_backends_and_closed_after_it(
        s3_server: SeaweedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend gets its Object Storage from the settings and loses it with the
    block, for every command alike (once only `serve` closed its own). Checked by
    breaking it: without the aclose in open_backend its clients outlive the block."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "SCW_ACCESS_KEY",
                 "SCW_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ADMIN[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ADMIN[1])
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    bucket = s3_server.new_bucket()

    async def main() -> S3ObjectStorage:
        settings = BackendSettings(store=tmp_path / "s", s3_endpoint=s3_server.endpoint)
        async with open_backend(settings) as svc:
            assert isinstance(svc, LocalService)
            objects = svc.objects
            assert isinstance(objects, S3ObjectStorage)
            assert objects.settings.endpoint == s3_server.endpoint
            assert await objects.abort_uploads(bucket, "none") == 0  # a real request
            assert objects._clients  # its connection is open
            return objects
    assert trio.run(main)._clients == {}  # closed with the block


def test_the_cloud_backend_is_opened_from_the_same_settings(
        served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in scw_env(served).items():
        monkeypatch.setenv(name, value)

    async def main() -> list[str]:
        settings = BackendSettings(store=tmp_path / "unused", backend="scaleway",
                                   objects=False)
        async with open_backend(settings) as svc:
            assert isinstance(svc, ScalewayService)
            return [v.name for v in (await svc.list_volumes("fr-par-1")).items]
    assert "vol-a" in trio.run(main)
    assert not (tmp_path / "unused").exists()  # no local store made for it


def test_an_unknown_backend_is_refused_and_makes_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        async with open_backend(BackendSettings(store=tmp_path / "s", backend="zfs")):
            raise AssertionError("opened")
    with pytest.raises(InvalidArgument, match="unknown backend 'zfs'"):
        trio.run(main)
    assert not (tmp_path / "s").exists()


def test_serve_serves_the_cloud_backend(served: Served, tmp_path: Path) -> None:
    """`snapfs serve --backend scaleway` in front of another serve: what the SDK does
    through the front one happens on the back one."""
    proc, url = start_server(tmp_path / "unused", tmp_path / "front.log",
                             env=scw_env(served), extra_args=["--backend", "scaleway"])
    try:
        front = Served(url=url, store=tmp_path / "unused", organization=served.organization,
                       default_project=served.default_project,
                       other_project=served.other_project)
        api: Any = front.instance()
        back: Any = served.instance()
        names = {v.name for v in api.list_volumes_all()}
        assert "vol-a" in names and names == {v.name for v in back.list_volumes_all()}
        vol = served.volumes["vol-a"]["id"]
        snap = api.create_snapshot(volume_id=vol, name="through-front").snapshot
        assert wait_state(api, snap.id).name == "through-front"
        assert back.get_snapshot(snapshot_id=snap.id).snapshot.name == "through-front"
        api.delete_snapshot(snapshot_id=snap.id)
        assert back.list_snapshots_all(name="through-front") == []
    finally:
        code = stop_server(proc)
    assert code == 0, (tmp_path / "front.log").read_text()
    assert not (tmp_path / "unused").exists()
