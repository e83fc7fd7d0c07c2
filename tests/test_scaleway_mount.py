"""`snapfs mount --backend scaleway` through the kernel, against `snapfs serve`
(real HTTP, the official SDK; the Scaleway API served by a real local store), so
the filesystem is shown to know nothing of its backend: the tree and operations
without Object Storage, then with SeaweedFS as Object Storage: mkdir, tags,
rename, export, image.raw bytes, rmdir -- each checked on the server's side too."""

from __future__ import annotations

import errno
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

from fixtures_http import ACCESS_KEY, SECRET, Served
from fixtures_mount import Mount, is_mounted, run, seek_landings, snapfs
from fixtures_s3 import ADMIN

pytestmark = pytest.mark.mount


def ls(path: Path) -> list[str]:
    return run("ls", "-1", path).stdout.split()


def scw_env(s: Served) -> dict[str, str]:
    return {"SCW_ACCESS_KEY": ACCESS_KEY, "SCW_SECRET_KEY": SECRET, "SCW_API_URL": s.url,
            "SCW_DEFAULT_ORGANIZATION_ID": s.organization,
            "SCW_DEFAULT_PROJECT_ID": s.default_project, "SCW_DEFAULT_ZONE": "fr-par-1",
            "SCW_CONFIG_PATH": "/nonexistent/scw.yaml"}


@pytest.fixture
def cloud_mount(served_s3: Served, s3_server: Any, bucket: str, tmp_path: Path,
                mount_factory: Callable[..., Mount]) -> Mount:
    """A scaleway-backend mount (zones fr-par-1 + nl-ams-1) of the served store; the
    daemon's SCW_*/AWS_* settings are exactly these (fixtures_mount drops inherited ones)."""
    env = {"SCW_ACCESS_KEY": ACCESS_KEY, "SCW_SECRET_KEY": SECRET,
           "SCW_API_URL": served_s3.url, "SCW_DEFAULT_ZONE": "fr-par-1",
           "SCW_DEFAULT_ORGANIZATION_ID": served_s3.organization,
           "SCW_CONFIG_PATH": str(tmp_path / "absent.yaml"),
           "AWS_ACCESS_KEY_ID": ADMIN[0], "AWS_SECRET_ACCESS_KEY": ADMIN[1],
           "AWS_DEFAULT_REGION": "us-east-1"}
    return mount_factory(tmp_path / "mount-state", "--backend", "scaleway",
                         "--zones", "nl-ams-1", "--staging-bucket", bucket,
                         "--s3-endpoint", s3_server.endpoint, env=env)


@pytest.mark.s3
def test_cloud_tree_end_to_end(cloud_mount: Mount, served_s3: Served, s3_server: Any,
                               bucket: str, tmp_path: Path) -> None:
    m = cloud_mount
    api = served_s3.instance(default_project_id=None)
    assert ls(m.path) == ["fr-par-1", "nl-ams-1"]
    assert set(ls(m.path / "fr-par-1")) >= {"default", "other"}
    assert ls(m.project / "volumes") == ["vol-a"]
    assert ls(m.path / "nl-ams-1" / "default" / "volumes") == ["vol-c"]

    # mkdir: a snapshot through the API.
    name = f"c{uuid.uuid4().hex[:8]}"
    run("mkdir", m.volume("vol-a") / name)
    snap_dir = m.snapshots() / name
    assert m.wait_state(snap_dir) == "available"
    sid = m.xattr(snap_dir, "id")
    on_server = api.get_snapshot(snapshot_id=sid).snapshot
    assert on_server.name == name and on_server.base_volume.name == "vol-a"

    # Tags and rename land on the server.
    run("setfattr", "-n", "user.tags", "-v", "daily,prod", snap_dir)
    assert api.get_snapshot(snapshot_id=sid).snapshot.tags == ["daily", "prod"]
    assert name in ls(m.project / "tags" / "prod")
    renamed = m.snapshots() / f"{name}-r"
    run("mv", snap_dir, renamed)
    assert api.get_snapshot(snapshot_id=sid).snapshot.name == f"{name}-r"
    assert not snap_dir.exists() and m.xattr(renamed, "id") == sid

    # image.raw: exported to the staging bucket, read back with ranged GETs.
    volume_file = served_s3.volumes["vol-a"]["path"]
    run("cmp", renamed / "image.raw", volume_file)
    staged = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="snapfs-staging/")
    assert [o["Key"] for o in staged.get("Contents", []) if sid in o["Key"]]

    # The cloud backend cannot know allocation: no map.json or changes/ listed,
    # ENOTSUP when looked up.
    assert ls(renamed) == ["export", "image.raw", "snapshot.json"]
    for entry in ("map.json", "changes"):
        with pytest.raises(OSError) as exc:
            os.stat(renamed / entry)
        assert exc.value.errno == errno.EOPNOTSUPP
    image_mtime = os.stat(renamed / "image.raw").st_mtime_ns

    # export: a QCOW2 object of the same bytes.
    (renamed / "export").write_text(f"{bucket}/exports/{name}.qcow2\n")
    deadline = time.monotonic() + 120
    while True:
        status = json.loads((renamed / "export").read_text())
        if status["state"] in ("success", "failure"):
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert status["state"] == "success", status
    local = tmp_path / "exported.qcow2"
    s3_server.client().download_file(bucket, f"exports/{name}.qcow2", str(local))
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", local, volume_file)
    time.sleep(2.1)  # past every attribute and listing cache of the mount
    assert os.stat(renamed / "image.raw").st_mtime_ns == image_mtime  # export moved no mtime

    # rmdir: deleted on the server.
    m.wait_state(renamed)
    run("rmdir", renamed)
    assert name + "-r" not in ls(m.snapshots())
    res = api.list_snapshots_all(name=name)
    assert res == []


@pytest.mark.s3
def test_cloud_refusals_keep_the_server_unchanged(cloud_mount: Mount,
                                                  served_s3: Served) -> None:
    m = cloud_mount
    api = served_s3.instance(default_project_id=None)
    before = int(api.list_snapshots().total_count)
    # No such volume: ENOENT; a snapshot name with a bad character never reaches it.
    r = run("mkdir", m.project / "volumes" / "no-such-volume" / "x", check=False)
    assert r.returncode != 0 and "No such file" in r.stderr
    with pytest.raises(OSError) as exc:
        os.rmdir(m.snapshots() / "does-not-exist")
    assert exc.value.errno == errno.ENOENT
    assert int(api.list_snapshots().total_count) == before


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


@pytest.mark.s3
def test_image_raw_on_the_cloud_backend(mount_factory: Callable[..., Mount],
                                        served_s3: Served, s3_server: Any,
                                        tmp_path: Path) -> None:
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
    # SEEK_DATA/SEEK_HOLE from the staged QCOW2's tables land where ext4 lands on
    # the volume itself (its runs are whole MiB: the tables' grains), the end and
    # beyond ENXIO, as tools built on them see it.
    img, vol = s / "image.raw", served_s3.volumes["vol-a"]["path"]
    size = os.stat(img).st_size
    offsets = [k * (1 << 20) + d for k in range(size >> 20) for d in (0, 4095)]
    offsets += [size - 1, size, -1, 2**63 - 1]
    assert seeks(img, offsets) == seeks(vol, offsets)
    assert run("qemu-img", "map", "--output=json", "-f", "raw", img).stdout == \
        run("qemu-img", "map", "--output=json", "-f", "raw", vol).stdout
    assert "bug #" not in m.log()


def seeks(path: Path | str, offsets: list[int]) -> list[tuple[int, int]]:
    """(SEEK_DATA, SEEK_HOLE) landing of each offset in ``path``, or -errno."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return seek_landings(fd, offsets)
    finally:
        os.close(fd)


#: Open cloud image.raw descriptors, each streamed at once (interleaved).
CLOUD_FDS = 40
#: The daemon's peak RSS with them: the project's 200 MB (measured: 169 MiB; with a
#: reader each holding its own windows, spares and L2 cache, 396 MiB).
CLOUD_PEAK_KIB = 200_000_000 // 1024


@pytest.mark.s3
def test_many_open_cloud_images_share_the_readers_budget(
        mount_factory: Callable[..., Mount], served_s3: Served, s3_server: Any,
        tmp_path: Path) -> None:
    """Every open of a cloud image.raw makes a reader of its own; their windows
    are charged to the process's one budget, their spare buffers and L2 tables
    are the process's, so forty streams at once stay inside 200 MB -- with
    every byte right."""
    bucket = s3_server.new_bucket()
    env = dict(scw_env(served_s3), AWS_ACCESS_KEY_ID=ADMIN[0],
               AWS_SECRET_ACCESS_KEY=ADMIN[1], AWS_DEFAULT_REGION="us-east-1")
    m = mount_factory(tmp_path / "store", "--backend", "scaleway", "--s3-endpoint",
                      s3_server.endpoint, "--staging-bucket", bucket, "--direct-io", env=env)
    assert m.pid is not None
    run("mkdir", m.volume("vol-a") / "many")
    snap = m.snapshots() / "many"
    assert m.wait_state(snap) == "available"
    expected = Path(served_s3.volumes["vol-a"]["path"]).read_bytes()
    step = 1 << 20
    fds = [os.open(snap / "image.raw", os.O_RDONLY) for _ in range(CLOUD_FDS)]
    try:
        for off in range(0, len(expected), step):
            for fd in fds:
                assert os.pread(fd, step, off) == expected[off:off + step], off
        peak = int(next(line.split()[1] for line in
                        Path(f"/proc/{m.pid}/status").read_text().splitlines()
                        if line.startswith("VmHWM:")))
    finally:
        for fd in fds:
            os.close(fd)
    assert peak <= CLOUD_PEAK_KIB, f"daemon peak RSS {peak // 1024} MiB, {CLOUD_FDS} open"
    assert "Traceback" not in m.log()


def test_a_cloud_mount_refused_at_its_first_request_says_so_in_one_line(
        served: Served, tmp_path: Path) -> None:
    """Wrong credentials (401) or an API that cannot be reached: the mount's first
    request fails, and `snapfs mount` printed "ExceptionGroup: Exceptions from
    Trio nursery (1 sub-exception)". Now one line saying what failed, and where
    the reason is; nothing stays mounted."""
    for name, env in (("denied", {**scw_env(served), "SCW_SECRET_KEY": str(uuid.uuid4())}),
                      ("unreachable", {**scw_env(served), "SCW_API_URL": "http://127.0.0.1:9"})):
        mnt = tmp_path / name
        mnt.mkdir()
        res = snapfs("mount", mnt, "--store", tmp_path / f"store-{name}", "--backend",
                     "scaleway", check=False, env=env)
        assert res.returncode != 0, res
        assert "ExceptionGroup" not in res.stderr and "Traceback" not in res.stderr
        assert "the mount's first request failed" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not is_mounted(mnt)
