"""Export and import through the mount against a real S3 server (SeaweedFS)."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from fixtures_mount import Mount, interrupted_open, run, snapfs
from fixtures_s3 import ADMIN, READER, SeaweedServer

pytestmark = [pytest.mark.mount, pytest.mark.s3]


def s3_env(server: SeaweedServer) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": ADMIN[0], "AWS_SECRET_ACCESS_KEY": ADMIN[1],
            "AWS_DEFAULT_REGION": "us-east-1"}


def mount_with_s3(factory: Callable[..., Mount], store: Path, server: SeaweedServer) -> Mount:
    return factory(store, "--s3-endpoint", server.endpoint, env=s3_env(server))


def snap(m: Mount, name: str = "s1") -> Path:
    run("mkdir", m.volume("vol1") / name)
    path = m.snapshots() / name
    assert m.wait_state(path) == "available"
    return path


def status(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def wait_done(path: Path, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (st := status(path))["state"] in ("pending", "started"):
        assert time.monotonic() < deadline, st
        time.sleep(0.1)
    return st


def test_export_then_import_round_trip(mount_factory: Callable[..., Mount],
                                       store_with_volume: Path, s3_server: SeaweedServer,
                                       ext4_volume: tuple[Path, dict], tmp_path: Path,
                                       ) -> None:
    image, _ = ext4_volume
    bucket = s3_server.new_bucket()
    m = mount_with_s3(mount_factory, store_with_volume, s3_server)
    s = snap(m)
    (s / "export").write_text(f"s3://{bucket}/exports/s1.qcow2\n")
    st = wait_done(s / "export")
    assert st["state"] == "success", st
    assert st["bucket"] == bucket and st["key"] == "exports/s1.qcow2" and st["bytes"] > 0
    assert m.wait_state(s) == "available"
    # The object is a QCOW2 image with the volume's bytes (qemu-img says so).
    local = tmp_path / "s1.qcow2"
    s3_server.client().download_file(bucket, "exports/s1.qcow2", str(local))
    info = json.loads(run("qemu-img", "info", "--output=json", local).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == image.stat().st_size
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", local, image)
    # Import it back as a new snapshot; snapfs wait follows the import file.
    imp = m.project / "imports" / "restored"
    imp.write_text(f"{bucket}/exports/s1.qcow2\n")
    assert snapfs("wait", imp).stdout == "success\n"
    st = wait_done(imp)
    assert st["state"] == "success", st
    assert "restored" in os.listdir(m.project / "imports")
    restored = m.snapshots() / "restored"
    assert m.xattr(restored, "state") == "available"
    run("cmp", restored / "image.raw", image)
    res = run("e2fsck", "-fn", restored / "image.raw", check=False)
    assert res.returncode == 0, res.stdout


def test_import_of_a_missing_object_fails_with_the_reason(
        mount_factory: Callable[..., Mount], store_with_volume: Path,
        s3_server: SeaweedServer) -> None:
    bucket = s3_server.new_bucket()
    m = mount_with_s3(mount_factory, store_with_volume, s3_server)
    imp = m.project / "imports" / "nothing"
    imp.write_text(f"{bucket}/no/such.qcow2\n")
    st = wait_done(imp)
    assert st["state"] == "failure" and st["error"], st
    assert m.xattr(m.snapshots() / "nothing", "state") in ("error", "invalid_data")


def test_an_import_file_goes_with_its_last_writer_not_its_first(
        mount_factory: Callable[..., Mount], store_with_volume: Path,
        s3_server: SeaweedServer) -> None:
    """Two writers open imports/<name>; the first closes without writing: the file
    stays for the second, whose line starts the import. (The kernel sends a close's
    RELEASE after close(2) returned: a dd just after another one raced the first's
    removal under load, ENOENT or "already started".) Checked by breaking it:
    with the removal at any writer's release the file is gone while the second
    still holds it, and its line is EEXIST ("already started")."""
    bucket = s3_server.new_bucket()
    m = mount_with_s3(mount_factory, store_with_volume, s3_server)
    imp = m.project / "imports" / "both"
    first = os.open(imp, os.O_WRONLY | os.O_CREAT)
    second = os.open(imp, os.O_WRONLY | os.O_CREAT)
    try:
        os.close(first)
        time.sleep(0.5)  # its RELEASE handled (when it is not, this passes anyway)
        assert "both" in os.listdir(imp.parent)
        os.write(second, f"{bucket}/no/such.qcow2\n".encode())
    finally:
        os.close(second)
    st = wait_done(imp)
    assert st["state"] == "failure" and "no/such.qcow2" in json.dumps(st), st
    assert "imports/both: closed without an import started" not in m.log()


def test_rmdir_while_exporting_is_ebusy_and_stops_an_import(
        mount_factory: Callable[..., Mount], store_with_volume: Path,
        private_s3_server: SeaweedServer) -> None:
    server = private_s3_server
    bucket = server.new_bucket()
    m = mount_with_s3(mount_factory, store_with_volume, server)
    s = snap(m)
    server.stop()  # uploads now retry with backoff: the export stays in flight
    (s / "export").write_text(f"{bucket}/k.qcow2\n")
    assert m.xattr(s, "state") == "exporting"
    (m.project / "imports" / "incoming").write_text(f"{bucket}/other.qcow2\n")
    incoming = m.snapshots() / "incoming"
    assert m.xattr(incoming, "state") == "importing"
    before = sorted(os.listdir(m.snapshots()))
    for path in (s, m.volume("vol1") / "s1"):
        with pytest.raises(OSError) as info:
            os.rmdir(path)
        assert info.value.errno == errno.EBUSY, path
    res = run("rmdir", s, check=False)
    assert res.returncode != 0 and "busy" in res.stderr
    assert sorted(os.listdir(m.snapshots())) == before
    assert m.xattr(s, "state") == "exporting" and m.xattr(incoming, "state") == "importing"
    assert status(s / "export")["state"] in ("pending", "started")
    assert "EBUSY" in m.log()
    # An import is stopped by rmdir (its server may never answer) and deleted.
    t0 = time.monotonic()
    run("rmdir", incoming)
    assert time.monotonic() - t0 < 5
    assert sorted(os.listdir(m.snapshots())) == [n for n in before if n != "incoming"]
    assert m.xattr(s, "state") == "exporting"


def test_open_of_an_importing_image_waits_and_is_interruptible(
        mount_factory: Callable[..., Mount], store_with_volume: Path,
        private_s3_server: SeaweedServer) -> None:
    server = private_s3_server
    bucket = server.new_bucket()
    m = mount_with_s3(mount_factory, store_with_volume, server)
    server.stop()  # the import retries with backoff: it stays importing
    (m.project / "imports" / "pending").write_text(f"{bucket}/disk.qcow2\n")
    s = m.snapshots() / "pending"
    assert m.xattr(s, "state") == "importing"
    # A reader that handles SIGINT (OPENER): a cat, killed by it while its open was
    # still queued for the daemon, ended without the daemon ever seeing it (a loaded
    # run lost the log line so).
    waited, out = interrupted_open(s / "image.raw")  # open() waits for the import
    assert waited < 2
    assert out == ["-1", str(errno.EINTR)], out
    assert m.xattr(s, "state") == "importing"
    assert "EINTR: process" in m.log() and "was signalled while waiting" in m.log()


def test_an_import_claiming_a_petabyte_fails_at_once_and_blocks_no_other(
        mount_factory: Callable[..., Mount], store_with_volume: Path,
        s3_server: SeaweedServer, tmp_path: Path) -> None:
    bucket = s3_server.new_bucket()
    huge = tmp_path / "huge.qcow2"  # 6 MB of object, a header claiming 1 PiB
    run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=2M", huge, "1P")
    small = tmp_path / "small.raw"
    small.write_bytes(os.urandom(3 << 20))
    small_q = tmp_path / "small.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", small, small_q)
    client = s3_server.client()
    client.upload_file(str(huge), bucket, "huge.qcow2")
    client.upload_file(str(small_q), bucket, "small.qcow2")
    m = mount_with_s3(mount_factory, store_with_volume, s3_server)
    imports = m.project / "imports"
    t0 = time.monotonic()
    (imports / "huge").write_text(f"{bucket}/huge.qcow2\n")
    (imports / "small").write_text(f"{bucket}/small.qcow2\n")
    st = wait_done(imports / "huge", timeout=30)
    assert time.monotonic() - t0 < 15
    assert st["state"] == "failure", st
    assert f"beyond the {64 << 40}-byte limit (64 TiB)" in st["error"], st
    assert m.xattr(m.snapshots() / "huge", "state") == "invalid_data"
    assert wait_done(imports / "small", timeout=60)["state"] == "success"
    assert m.wait_state(m.snapshots() / "small") == "available"
    run("cmp", m.snapshots() / "small" / "image.raw", small)
    # The failed one goes with rmdir.
    run("rmdir", m.snapshots() / "huge")
    assert "huge" not in os.listdir(m.snapshots())


def test_an_import_naming_one_cluster_a_million_times_fails_and_stores_nothing(
        mount_factory: Callable[..., Mount], store_with_volume: Path,
        s3_server: SeaweedServer) -> None:
    """~300 KiB of object whose one L2 table, named by all 2048 L1 entries,
    names one data cluster 8192 times: a terabyte of import work (hours of
    fetching and hashing), now refused at once, with nothing stored."""
    from fixtures_qcow2 import header, image
    cs = 64 << 10
    h = header(16, 1 << 40, 2048, l1_table_offset=cs, refcount_table_offset=2 * cs)
    body = image(h, [4 * cs] * 2048, {4 * cs: [5 * cs] * 8192},
                 {5 * cs: bytes(range(256)) * 256})
    bucket = s3_server.new_bucket()
    s3_server.client().put_object(Bucket=bucket, Key="bomb.qcow2", Body=body)
    m = mount_with_s3(mount_factory, store_with_volume, s3_server)
    packs = store_with_volume / "packs"

    def pack_bytes() -> int:
        return sum(p.stat().st_size for p in packs.rglob("*") if p.is_file())
    before = pack_bytes()
    t0 = time.monotonic()
    (m.project / "imports" / "bomb").write_text(f"{bucket}/bomb.qcow2\n")
    st = wait_done(m.project / "imports" / "bomb", timeout=30)
    assert time.monotonic() - t0 < 15
    assert st["state"] == "failure", st
    assert "from more guest clusters than they can hold" in st["error"], st
    assert m.xattr(m.snapshots() / "bomb", "state") == "invalid_data"
    assert pack_bytes() == before
    run("rmdir", m.snapshots() / "bomb")
    assert "bomb" not in os.listdir(m.snapshots())


def test_export_by_appending_the_target(mount_factory: Callable[..., Mount],
                                        store_with_volume: Path, s3_server: SeaweedServer,
                                        ext4_volume: tuple[Path, dict]) -> None:
    """`echo b/k >> export` wrote past the status shown: the target arrived behind
    120 zero bytes and was refused as "must be one line". It is taken as a
    sysfs control file takes it: from where the appending write starts."""
    image, _ = ext4_volume
    bucket = s3_server.new_bucket()
    m = mount_with_s3(mount_factory, store_with_volume, s3_server)
    s = snap(m)
    assert (s / "export").stat().st_size > 0  # the status shown: appended to
    run("bash", "-c", f'echo "{bucket}/appended.qcow2" >> "{s}/export"')
    st = wait_done(s / "export")
    assert st["state"] == "success" and st["key"] == "appended.qcow2", st
    head = s3_server.client().head_object(Bucket=bucket, Key="appended.qcow2")
    assert head["ContentLength"] > 0
    # A bad target appended is refused as one written is, naming what is wrong.
    res = run("bash", "-c", f'echo "no-key-here" >> "{s}/export"', check=False)
    assert res.returncode != 0 and "Invalid argument" in res.stderr
    assert "must be one line" not in m.log()


def test_wait_on_an_export_file_follows_the_export(mount_factory: Callable[..., Mount],
                                                   store_with_volume: Path,
                                                   s3_server: SeaweedServer) -> None:
    """`snapfs wait SNAP` says the snapshot is `available` again after a failed
    export too, exit 0, and a script took that for a done export. `snapfs wait
    SNAP/export` follows the export itself: success, or exit 1 with its reason."""
    bucket = s3_server.new_bucket()
    m = mount_with_s3(mount_factory, store_with_volume, s3_server)
    s = snap(m)
    res = snapfs("wait", s / "export", check=False)
    assert res.returncode == 1 and "none: no export was started" in res.stderr, res
    (s / "export").write_text(f"{bucket}/ok.qcow2\n")
    assert snapfs("wait", s / "export").stdout == "success\n"
    # A user who may only read the bucket: the export fails, the snapshot is fine.
    reader = mount_factory(store_with_volume, "--s3-endpoint", s3_server.endpoint,
                           env={"AWS_ACCESS_KEY_ID": READER[0],
                                "AWS_SECRET_ACCESS_KEY": READER[1],
                                "AWS_DEFAULT_REGION": "us-east-1"})
    rs = reader.snapshots() / "s1"
    (rs / "export").write_text(f"{bucket}/denied.qcow2\n")
    res = snapfs("wait", rs / "export", check=False)
    assert res.returncode == 1 and "failure" in res.stderr, res
    assert snapfs("wait", rs).stdout == "available\n"
