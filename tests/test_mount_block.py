"""Instance and Block snapshots in one tree: `snapfs mount --backend scaleway`
against `snapfs serve` (a local SSD volume through the Instance API, block volumes
through the Block Storage API), every operation driven with real tools and its
effect checked afterwards through the official SDK of the API that owns it."""

from __future__ import annotations

import errno
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from scaleway.block.v1 import BlockV1API
from scaleway.instance.v1 import InstanceV1API
from scaleway_core.api import ScalewayException

from fixtures_http import Served
from fixtures_mount import Mount, run
from fixtures_s3 import ADMIN, qemu_img_judges
from fixtures_store import lssd_volume
from test_scaleway_mount import scw_env

pytestmark = [pytest.mark.mount, pytest.mark.s3]


def ls(path: Path) -> list[str]:
    return run("ls", "-1", path).stdout.split()


def wait_done(path: Path, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (st := json.loads(path.read_text()))["state"] in ("pending", "started"):
        assert time.monotonic() < deadline, st
        time.sleep(0.1)
    return st


def missing_in(call: Callable[[], Any]) -> bool:
    try:
        call()
    except ScalewayException as exc:
        return exc.status_code == 404
    return False


@pytest.fixture
def lssd(served_s3: Served) -> Iterator[tuple[str, str]]:
    """A local SSD volume (the Instance API's): (name, id)."""
    with lssd_volume(served_s3.store) as made:
        yield made


def test_both_apis_in_one_tree(mount_factory: Callable[..., Mount], served_s3: Served,
                               s3_server: Any, lssd: tuple[str, str],
                               tmp_path: Path) -> None:
    bucket = s3_server.new_bucket()
    env = dict(scw_env(served_s3), AWS_ACCESS_KEY_ID=ADMIN[0],
               AWS_SECRET_ACCESS_KEY=ADMIN[1], AWS_DEFAULT_REGION="us-east-1")
    m = mount_factory(tmp_path / "store", "--backend", "scaleway", "--s3-endpoint",
                      s3_server.endpoint, "--staging-bucket", bucket, env=env)
    block, instance = BlockV1API(served_s3.client()), InstanceV1API(served_s3.client())
    lname, lid = lssd
    tag = f"t{uuid.uuid4().hex[:8]}"
    assert {"vol-a", lname} <= set(ls(m.project / "volumes"))

    # mkdir in each volume's directory creates through the API owning the volume.
    run("mkdir", m.volume("vol-a") / "blk", m.volume(lname) / "inst")
    blk, inst = m.snapshots() / "blk", m.snapshots() / "inst"
    assert m.wait_state(blk) == "available" and m.wait_state(inst) == "available"
    blk_id, inst_id = m.xattr(blk, "id"), m.xattr(inst, "id")
    assert block.get_snapshot(snapshot_id=blk_id).name == "blk"
    assert missing_in(lambda: block.get_snapshot(snapshot_id=inst_id))
    assert instance.get_snapshot(snapshot_id=inst_id).snapshot.name == "inst"

    # One listing, each snapshot once; volumes/<v>/ holds its own.
    listed = ls(m.snapshots())
    assert listed.count("blk") == 1 and listed.count("inst") == 1
    assert "blk" in ls(m.volume("vol-a")) and "inst" in ls(m.volume(lname))
    assert "inst" not in ls(m.volume("vol-a"))
    # ID lookups, whichever API owns the snapshot.
    assert m.xattr(m.snapshots() / blk_id, "name") == "blk"
    assert m.xattr(m.snapshots() / inst_id, "name") == "inst"
    # Which API, and the fields only Block has.
    assert (m.xattr(blk, "api"), m.xattr(inst, "api")) == ("block", "instance")
    assert (m.xattr(blk, "class"), m.xattr(blk, "public"), m.xattr(blk, "references")) == (
        "bssd", "false", "0")
    assert m.xattr(blk, "volume_type") == "b_ssd"
    with pytest.raises(OSError) as info:  # as a file without it: ENODATA
        m.xattr(inst, "class")
    assert info.value.errno == errno.ENODATA

    # setfattr and mv go to the owner; tags/ spans both.
    run("setfattr", "-n", "user.tags", "-v", f"{tag},b", blk)
    run("setfattr", "-n", "user.tags", "-v", f"{tag},i", inst)
    assert block.get_snapshot(snapshot_id=blk_id).tags == [tag, "b"]
    assert instance.get_snapshot(snapshot_id=inst_id).snapshot.tags == [tag, "i"]
    assert sorted(ls(m.project / "tags" / tag)) == ["blk", "inst"]
    run("mv", blk, m.snapshots() / "blk2")
    blk = m.snapshots() / "blk2"
    assert block.get_snapshot(snapshot_id=blk_id).name == "blk2"
    # snapshot.json get-then-set on a Block snapshot: Block has no Set, an Update does it.
    doc = json.loads((blk / "snapshot.json").read_text())
    assert doc["base_volume"]["name"] == "vol-a" and doc["state"] == "available"
    doc["name"] = "blk3"
    (blk / "snapshot.json").write_text(json.dumps(doc))
    assert block.get_snapshot(snapshot_id=blk_id).name == "blk3"
    blk = m.snapshots() / "blk3"
    doc["size"] = doc["size"] + 512  # a read-only field: refused, nothing changes
    with pytest.raises(OSError) as info:
        (blk / "snapshot.json").write_text(json.dumps(doc))
    assert info.value.errno == errno.EINVAL
    assert block.get_snapshot(snapshot_id=blk_id).size == served_s3.volumes["vol-a"]["size"]

    # image.raw of a Block snapshot: exported with Block's export to the staging bucket.
    run("cmp", blk / "image.raw", served_s3.volumes["vol-a"]["path"])

    # export: no task in Block, the status is derived from the snapshot's.
    (blk / "export").write_text(f"{bucket}/blk.qcow2\n")
    st = wait_done(blk / "export")
    assert st["state"] == "success" and st["bucket"] == bucket, st
    img = tmp_path / "blk.qcow2"
    s3_server.client().download_file(bucket, "blk.qcow2", str(img))
    qemu_img_judges(img, Path(served_s3.volumes["vol-a"]["path"]))

    # imports/<name> creates through Block's import.
    (m.project / "imports" / "back").write_text(f"{bucket}/blk.qcow2\n")
    assert wait_done(m.project / "imports" / "back")["state"] == "success"
    back = m.snapshots() / "back"
    assert m.xattr(back, "api") == "block" and m.xattr(back, "class") == "sbs"
    run("cmp", back / "image.raw", served_s3.volumes["vol-a"]["path"])

    # rmdir: each through its owner.
    back_id = m.xattr(back, "id")
    run("rmdir", blk, inst, back)
    assert missing_in(lambda: block.get_snapshot(snapshot_id=blk_id))
    assert missing_in(lambda: block.get_snapshot(snapshot_id=back_id))
    assert missing_in(lambda: instance.get_snapshot(snapshot_id=inst_id))
    assert not {"blk3", "inst", "back"} & set(ls(m.snapshots()))
    assert os.listdir(m.project / "tags").count(tag) == 0
