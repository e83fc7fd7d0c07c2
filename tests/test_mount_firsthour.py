"""Issue 18 through a real mount: unknown attributes answer as on xattr-less files,
export/import without Object Storage refused at the write, no phantom imports/,
renames seen at once under the new name only."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Callable

import pytest

from fixtures_mount import Mount, gone_soon, run
from fixtures_s3 import SeaweedServer
from test_mount_s3 import mount_with_s3, wait_done

pytestmark = pytest.mark.mount


def snap(m: Mount, name: str = "s1") -> Path:
    run("mkdir", m.volume("vol1") / name)
    path = m.snapshots() / name
    assert m.wait_state(path) == "available"
    return path


def tree(m: Mount) -> dict[str, object]:
    """What a refused request must leave unchanged."""
    out: dict[str, object] = {}
    for section in ("snapshots", "imports"):
        out[section] = sorted(os.listdir(m.project / section))
    for s in out["snapshots"]:  # type: ignore[union-attr]
        p = m.snapshots() / s
        out[s] = {n: os.getxattr(p, n) for n in os.listxattr(p) if n != "user.progress"}
        out[f"{s}/export"] = (p / "export").read_text()
    return out


def failing(*cmd: str | Path) -> str:
    res = run(*cmd, check=False)
    assert res.returncode != 0, res
    return res.stderr


def test_unknown_user_xattrs_are_enotsup_to_set_and_enodata(mounted: Mount) -> None:
    s = snap(mounted)
    before = tree(mounted)
    for node in (s, mounted.project, mounted.snapshots(), s / "image.raw"):
        with pytest.raises(OSError) as exc:
            os.setxattr(node, "user.bogus", b"x")
        assert exc.value.errno == errno.EOPNOTSUPP, node
        with pytest.raises(OSError) as exc:
            os.getxattr(node, "user.bogus")
        assert exc.value.errno == errno.ENODATA, node
        with pytest.raises(OSError) as exc:
            os.removexattr(node, "user.bogus")
        assert exc.value.errno == errno.ENODATA, node
    assert "Operation not supported" in failing("setfattr", "-n", "user.bogus", "-v", "1", s)
    assert "No such attribute" in failing("getfattr", "-n", "user.bogus", s)
    assert tree(mounted) == before
    assert "has no attribute user.bogus to set" in mounted.log()


def test_export_and_import_without_object_storage_refused_at_the_write(
        mounted: Mount) -> None:
    s = snap(mounted)
    before = tree(mounted)
    # bash sees the write fail (the line is acted on at once), not just a close.
    err = failing("bash", "-c", f"echo my-bucket/v1.qcow2 > {s / 'export'}")
    assert "No such device or address" in err
    err = failing("bash", "-c",
                  f"echo my-bucket/base.qcow2 > {mounted.project / 'imports' / 'base'}")
    assert "No such device or address" in err
    assert tree(mounted) == before  # no snapshot in error, no task, no imports/ entry
    log = mounted.log()
    assert "Object Storage is not configured" in log and "ENXIO" in log


def test_no_phantom_import_after_a_refused_write(mounted: Mount) -> None:
    imports = mounted.project / "imports"
    before = tree(mounted)
    assert "Invalid argument" in failing("bash", "-c", f"echo 'not a target' > {imports / 'a'}")
    res = run("tee", imports / "b", input="s3://NO_SUCH/x\n", check=False)
    assert res.returncode != 0 and "Invalid argument" in res.stderr
    run("touch", imports / "c")  # nothing written: nothing started, nothing kept
    assert tree(mounted) == before
    assert not (imports / "a").exists()


@pytest.mark.s3
def test_no_phantom_import_after_its_snapshot_was_deleted(
        mount_factory: Callable[..., Mount], store_with_volume: Path,
        s3_server: SeaweedServer) -> None:
    m = mount_with_s3(mount_factory, store_with_volume, s3_server)
    imp = m.project / "imports" / "nothing"
    imp.write_text(f"{s3_server.new_bucket()}/no/such.qcow2\n")
    assert wait_done(imp)["state"] == "failure"
    assert os.listdir(m.project / "imports") == ["nothing"]
    run("rmdir", m.snapshots() / "nothing")
    assert os.listdir(m.project / "imports") == []
    # The listing forgot the record and told the kernel, which drops the name from
    # pyfuse3's notifier thread: just after, not necessarily before listdir returns.
    assert gone_soon(imp)
    assert "is gone; the import is forgotten" in m.log()


def test_rename_is_seen_at_once_under_the_new_name_only(mounted: Mount) -> None:
    s = snap(mounted, "old")
    run("setfattr", "-n", "user.tags", "-v", "t1", s)
    views = [mounted.snapshots(), mounted.volume("vol1"), mounted.project / "tags" / "t1"]
    for view in views:  # the kernel now caches "old" in every view
        assert (view / "old" / "image.raw").exists()
    # setfattr user.name: every view answers the new name only, at once.
    run("setfattr", "-n", "user.name", "-v", "new", s)
    for view in views:
        assert gone_soon(view / "old"), view
        assert json.loads((view / "new" / "snapshot.json").read_text())["name"] == "new"
    # mv in one view: the others follow at once too.
    run("mv", mounted.snapshots() / "new", mounted.snapshots() / "newer")
    for view in views:
        assert gone_soon(view / "new"), view
        assert (view / "newer").is_dir(), view
    # A tag removed: that tag's view stops answering at once.
    run("setfattr", "-x", "user.tags", mounted.snapshots() / "newer")
    assert gone_soon(views[2] / "newer")
    # rmdir in one view: gone from the others at once.
    run("rmdir", mounted.volume("vol1") / "newer")
    assert gone_soon(mounted.snapshots() / "newer")
