"""The same mount on the cloud backend: `snapfs mount --backend scaleway` against
`snapfs serve` (the Scaleway API served by a real local store), so the filesystem
is shown to know nothing of its backend."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, Callable

import pytest

from fixtures_http import ACCESS_KEY, SECRET, Served
from fixtures_mount import Mount, run

pytestmark = pytest.mark.mount


def scw_env(s: Served) -> dict[str, str]:
    return {"SCW_ACCESS_KEY": ACCESS_KEY, "SCW_SECRET_KEY": SECRET, "SCW_API_URL": s.url,
            "SCW_DEFAULT_ORGANIZATION_ID": s.organization,
            "SCW_DEFAULT_PROJECT_ID": s.default_project, "SCW_DEFAULT_ZONE": "fr-par-1",
            "SCW_CONFIG_PATH": "/nonexistent/scw.yaml"}


def ls(path: Path) -> list[str]:
    return sorted(run("ls", "-1", path).stdout.split())


def test_tree_and_operations_on_the_cloud_backend(
        mount_factory: Callable[..., Mount], served: Served, tmp_path: Path) -> None:
    m = mount_factory(tmp_path / "store", "--backend", "scaleway", env=scw_env(served))
    assert "fr-par-1" in ls(m.path)
    assert {"default", "other"} <= set(ls(m.path / "fr-par-1"))
    assert "vol-a" in ls(m.volume(""))
    run("mkdir", m.volume("vol-a") / "cloud")
    s = m.snapshots() / "cloud"
    assert m.wait_state(s) == "available"
    assert m.xattr(s, "base_volume_name") == "vol-a"
    run("setfattr", "-n", "user.tags", "-v", "x,y", s)
    assert ls(m.project / "tags" / "y") == ["cloud"]
    run("mv", s, m.snapshots() / "cloud2")
    assert "cloud2" in ls(m.snapshots())
    with pytest.raises(OSError) as info:  # no staging bucket: refused, with the reason
        open(m.snapshots() / "cloud2" / "image.raw", "rb").close()
    assert info.value.errno == errno.EPERM
    assert "EPERM" in m.log() and "needs --staging-bucket" in m.log()
    run("rmdir", m.snapshots() / "cloud2")
    assert "cloud2" not in ls(m.snapshots())


def test_image_raw_on_the_cloud_backend(mount_factory: Callable[..., Mount],
                                        served_s3: Served, s3_server: Any,
                                        tmp_path: Path) -> None:
    from fixtures_s3 import ADMIN
    bucket = s3_server.new_bucket()
    env = dict(scw_env(served_s3), AWS_ACCESS_KEY_ID=ADMIN[0],
               AWS_SECRET_ACCESS_KEY=ADMIN[1], AWS_DEFAULT_REGION="us-east-1")
    m = mount_factory(tmp_path / "store", "--backend", "scaleway", "--s3-endpoint",
                      s3_server.endpoint, "--staging-bucket", bucket, env=env)
    run("mkdir", m.volume("vol-a") / "img")
    s = m.snapshots() / "img"
    assert m.wait_state(s) == "available"
    run("cmp", s / "image.raw", served_s3.volumes["vol-a"]["path"])
    assert os.stat(s / "image.raw").st_size == served_s3.volumes["vol-a"]["size"]
