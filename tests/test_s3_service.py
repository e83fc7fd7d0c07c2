"""Export and import end to end: the local service (real store) with the S3
ObjectStorage on a real SeaweedFS, judged by qemu-img."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
import trio

from fixtures_s3 import SeaweedServer
from fixtures_store import MiB, ZONE, random_bytes, read_all, wait_state
from snapfs.local import LocalService, open_local_service
from snapfs.model import Snapshot, Task
from snapfs.s3.calls import RetryPolicy

pytestmark = pytest.mark.s3


async def snapshot_of(svc: LocalService, path: Path, name: str = "snap") -> Snapshot:
    vol = await svc.add_volume(path.stem, path)
    snap = await svc.create_snapshot(ZONE, name=name, volume_id=vol.id)
    snap = await wait_state(svc, snap.id)
    assert snap.state == "available", snap.error_reason
    return snap


async def wait_task(svc: LocalService, task_id: str, timeout: float = 120) -> Task:
    with trio.fail_after(timeout):
        while (t := await svc.get_task(ZONE, task_id)).status in ("pending", "started"):
            await trio.sleep(0.02)
    return t


def qemu_img_judges(img: Path, raw: Path) -> None:
    r = subprocess.run(["qemu-img", "check", "--output=json", "-f", "qcow2", str(img)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["check-errors"] == 0
    r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(img),
                        str(raw)], capture_output=True, text=True)
    assert r.returncode == 0 and "Images are identical" in r.stdout, r.stdout + r.stderr


def store_state(svc: LocalService, exclude: str | None = None) -> tuple[Any, ...]:
    snaps = svc.md.conn.execute(
        "SELECT id, state, size, name FROM snapshots WHERE id IS NOT ? ORDER BY id",
        (exclude,)).fetchall()
    chunks = svc.md.conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
    return tuple(map(tuple, snaps)), chunks


async def test_export_is_qcow2_that_qemu_img_accepts(
        s3_server: SeaweedServer, bucket: str, tmp_path: Path,
        volume_file: Callable[..., Path]) -> None:
    data = [(0, random_bytes(3 * MiB, 1)), (17 * MiB + 4096, random_bytes(9 * MiB, 2)),
            (63 * MiB, random_bytes(MiB, 3))]
    vol = volume_file("vol", 64 * MiB, data)
    objects = s3_server.objects(part_size=5 * MiB)
    async with open_local_service(tmp_path / "store", objects=objects) as svc:
        snap = await snapshot_of(svc, vol)
        task = await svc.export_snapshot(ZONE, snap.id, bucket=bucket, key="dir/snap.qcow2")
        t = await wait_task(svc, task.id)
        assert t.status == "success", t.error
        assert t.progress == 100 and t.terminated_at
        assert (await svc.get_snapshot(ZONE, snap.id)).state == "available"
    await objects.aclose()
    head = s3_server.client().head_object(Bucket=bucket, Key="dir/snap.qcow2")
    assert head["ContentLength"] == t.bytes
    assert t.bytes <= 1.05 * 13 * MiB + 256 * 1024  # ~ the data, not the 64 MiB size
    out = tmp_path / "out.qcow2"
    s3_server.client().download_file(bucket, "dir/snap.qcow2", str(out))
    qemu_img_judges(out, vol)
    assert s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads") is None


@pytest.mark.parametrize("opts", [(), ("-c",), ("-c", "-o", "compression_type=zstd")],
                         ids=["plain", "deflate", "zstd"])
async def test_import_images_qemu_img_made(
        s3_server: SeaweedServer, bucket: str, tmp_path: Path,
        volume_file: Callable[..., Path], opts: tuple[str, ...]) -> None:
    raw = volume_file("src", 24 * MiB + 512 * 3,
                      [(0, b"text that compresses well\n" * 50000),
                       (9 * MiB, random_bytes(5 * MiB, 4)), (24 * MiB, b"end" * 100)])
    img = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *opts, str(raw),
                    str(img)], check=True, capture_output=True)
    s3_server.client().upload_file(str(img), bucket, "src.qcow2")
    objects = s3_server.objects()
    async with open_local_service(tmp_path / "store", objects=objects) as svc:
        snap = await svc.create_snapshot(ZONE, name="imported", bucket=bucket,
                                         key="src.qcow2", size=raw.stat().st_size)
        assert snap.state == "importing"
        done = await wait_state(svc, snap.id)
        assert done.state == "available", done.error_reason
        assert done.size == raw.stat().st_size
        assert await read_all(svc, snap.id) == raw.read_bytes()
    await objects.aclose()


async def test_import_refusals_end_invalid_data_and_change_nothing(
        s3_server: SeaweedServer, bucket: str, tmp_path: Path,
        volume_file: Callable[..., Path]) -> None:
    c = s3_server.client()
    c.put_object(Bucket=bucket, Key="garbage.qcow2", Body=random_bytes(300_000, 5))
    raw = volume_file("t", 16 * MiB, [(0, random_bytes(12 * MiB, 6))])
    img = tmp_path / "t.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(img)],
                   check=True, capture_output=True)
    c.put_object(Bucket=bucket, Key="truncated.qcow2", Body=img.read_bytes()[:5 * MiB])
    c.upload_file(str(img), bucket, "good.qcow2")
    cases = [
        ("garbage.qcow2", None, "invalid_data", "not a QCOW2 image: bad magic"),
        ("truncated.qcow2", None, "invalid_data", "truncated QCOW2 image"),
        ("good.qcow2", 8 * MiB, "invalid_data",
         f"size {8 * MiB} does not match the image's virtual size {16 * MiB}"),
        ("missing.qcow2", None, "error", "not found"),
    ]
    objects = s3_server.objects()
    async with open_local_service(tmp_path / "store", objects=objects) as svc:
        keep = await snapshot_of(svc, volume_file("keep", 4 * MiB, [(0, random_bytes(MiB, 7))]))
        for key, size, state, reason in cases:
            before = store_state(svc)
            snap = await svc.create_snapshot(ZONE, name=key, bucket=bucket, key=key, size=size)
            done = await wait_state(svc, snap.id)
            assert done.state == state, (key, done.error_reason)
            assert reason in (done.error_reason or ""), (key, done.error_reason)
            assert store_state(svc, exclude=snap.id) == before
        other = await svc.create_snapshot(ZONE, name="nobucket", bucket="no-such-bucket",
                                          key="k", size=None)
        done = await wait_state(svc, other.id)
        assert done.state == "error" and "bucket 'no-such-bucket' not found" in (
            done.error_reason or "")
        assert await read_all(svc, keep.id) == (tmp_path / "keep.raw").read_bytes()
    await objects.aclose()


async def test_export_to_missing_bucket_fails_naming_it(
        s3_server: SeaweedServer, tmp_path: Path, volume_file: Callable[..., Path]) -> None:
    vol = volume_file("v", 8 * MiB, [(0, random_bytes(2 * MiB, 8))])
    objects = s3_server.objects()
    async with open_local_service(tmp_path / "store", objects=objects) as svc:
        snap = await snapshot_of(svc, vol)
        task = await svc.export_snapshot(ZONE, snap.id, bucket="no-such-bucket", key="k")
        t = await wait_task(svc, task.id)
        assert t.status == "failure" and "bucket 'no-such-bucket' not found" in (t.error or "")
        assert (await svc.get_snapshot(ZONE, snap.id)).state == "available"
        assert await read_all(svc, snap.id) == vol.read_bytes()
    await objects.aclose()


async def test_server_stopped_mid_export(private_s3_server: SeaweedServer, tmp_path: Path,
                                         volume_file: Callable[..., Path]) -> None:
    """The S3 server is killed while parts go up: the task ends in failure naming
    the cause, the multipart upload is aborted once the server is back (no
    orphan parts, no object), and the snapshot is available and unchanged."""
    server = private_s3_server
    bucket = server.new_bucket()
    vol = volume_file("big", 160 * MiB, [(0, random_bytes(160 * MiB, 9))])
    objects = server.objects(part_size=5 * MiB, concurrency=2,
                             retry=RetryPolicy(attempts=3, first_delay=0.1, budget=2.0),
                             abort_retry=RetryPolicy(attempts=200, first_delay=0.2,
                                                     max_delay=1.0, budget=120.0))
    aborting = trio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "aborting the upload" in record.getMessage():
                aborting.set()
    handler = Watch()
    logger = logging.getLogger("snapfs.s3.export")
    logger.addHandler(handler)
    try:
        async with open_local_service(tmp_path / "store", objects=objects) as svc:
            snap = await snapshot_of(svc, vol)
            task = await svc.export_snapshot(ZONE, snap.id, bucket=bucket, key="big.qcow2")
            with trio.fail_after(60):
                while (t := await svc.get_task(ZONE, task.id)).progress < 5:
                    assert t.status in ("pending", "started"), t
                    await trio.sleep(0.005)
            assert (await svc.get_snapshot(ZONE, snap.id)).state == "exporting"
            assert t.progress < 100
            await trio.to_thread.run_sync(server.stop)
            with trio.fail_after(60):
                await aborting.wait()
            await trio.to_thread.run_sync(server.start)
            t = await wait_task(svc, task.id)
            assert t.status == "failure"
            assert "failed after" in (t.error or "") and "attempts" in (t.error or "")
            snap = await svc.get_snapshot(ZONE, snap.id)
            assert snap.state == "available"
            assert await read_all(svc, snap.id) == vol.read_bytes()
    finally:
        logger.removeHandler(handler)
        await objects.aclose()
    c = server.client()
    assert c.list_multipart_uploads(Bucket=bucket).get("Uploads") is None
    assert c.list_objects_v2(Bucket=bucket).get("Contents") is None


async def test_service_stopping_mid_export_aborts_the_upload(
        s3_server: SeaweedServer, bucket: str, tmp_path: Path,
        volume_file: Callable[..., Path], caplog: pytest.LogCaptureFixture) -> None:
    """Closing the service cancels the export: the upload is aborted (shielded),
    nothing is left in the bucket, and no log line carries the secret key."""
    caplog.set_level(logging.DEBUG, logger="snapfs")
    vol = volume_file("c", 96 * MiB, [(0, random_bytes(96 * MiB, 10))])
    objects = s3_server.objects(part_size=5 * MiB, concurrency=2)
    async with open_local_service(tmp_path / "store", objects=objects) as svc:
        snap = await snapshot_of(svc, vol)
        task = await svc.export_snapshot(ZONE, snap.id, bucket=bucket, key="c.qcow2")
        with trio.fail_after(60):
            while (await svc.get_task(ZONE, task.id)).progress < 10:
                await trio.sleep(0.005)
        assert s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads")
    # (leaving the block closed the service: the export was cancelled)
    await objects.aclose()
    async with open_local_service(tmp_path / "store") as svc:
        t = await svc.get_task(ZONE, task.id)
        assert t.status == "failure"
        assert (await svc.get_snapshot(ZONE, snap.id)).state == "available"
    c = s3_server.client()
    assert c.list_multipart_uploads(Bucket=bucket).get("Uploads") is None
    assert c.list_objects_v2(Bucket=bucket).get("Contents") is None
    assert any("aborting the upload" in r.getMessage() for r in caplog.records)
    secret = objects.settings.secret_key
    assert secret and all(secret not in r.getMessage() for r in caplog.records)


async def test_corrupt_compressed_cluster_found_mid_import(
        s3_server: SeaweedServer, bucket: str, tmp_path: Path,
        volume_file: Callable[..., Path]) -> None:
    """Damage only shows when a cluster is decompressed, well into the capture:
    still invalid_data with the reason, and the partial data reclaimed."""
    raw = volume_file("z", 16 * MiB, [(0, b"squeeze me " * 1_500_000)])
    img = tmp_path / "z.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw),
                    str(img)], check=True, capture_output=True)
    buf = bytearray(img.read_bytes())
    mid = len(buf) - 8192  # inside the last compressed clusters, past every table
    buf[mid:mid + 4096] = random_bytes(4096, 11)
    s3_server.client().put_object(Bucket=bucket, Key="z.qcow2", Body=bytes(buf))
    objects = s3_server.objects()
    async with open_local_service(tmp_path / "store", objects=objects) as svc:
        before = store_state(svc)
        snap = await svc.create_snapshot(ZONE, name="z", bucket=bucket, key="z.qcow2")
        done = await wait_state(svc, snap.id)
        assert done.state == "invalid_data", done.error_reason
        assert "compressed cluster" in (done.error_reason or "")
        assert store_state(svc, exclude=snap.id) == before
    await objects.aclose()


async def test_export_of_corrupt_snapshot_fails_and_aborts(
        s3_server: SeaweedServer, bucket: str, tmp_path: Path,
        volume_file: Callable[..., Path]) -> None:
    """A chunk that no longer matches its hash, met after parts went up: the task
    fails naming the corruption, and the upload is aborted (no object, no parts)."""
    vol = volume_file("v", 32 * MiB, [(0, random_bytes(32 * MiB, 12))])
    store = tmp_path / "store"
    async with open_local_service(store) as svc:
        snap = await snapshot_of(svc, vol)
        pack, offset = svc.md.conn.execute(
            "SELECT c.pack, c.offset FROM chunks c JOIN snapshot_chunks m ON m.chunk = c.id "
            "WHERE m.idx = 24").fetchone()
    with open(store / "packs" / f"{pack:08d}.pack", "r+b") as f:
        f.seek(offset + 99)
        byte = f.read(1)
        f.seek(offset + 99)
        f.write(bytes([byte[0] ^ 0xFF]))
    objects = s3_server.objects(part_size=5 * MiB)
    async with open_local_service(store, objects=objects) as svc:
        task = await svc.export_snapshot(ZONE, snap.id, bucket=bucket, key="bad.qcow2")
        t = await wait_task(svc, task.id)
        assert t.status == "failure" and "does not match its hash" in (t.error or "")
        assert (await svc.get_snapshot(ZONE, snap.id)).state == "available"
    await objects.aclose()
    c = s3_server.client()
    assert c.list_multipart_uploads(Bucket=bucket).get("Uploads") is None
    assert c.list_objects_v2(Bucket=bucket).get("Contents") is None
