"""An export cut off by an Object Storage outage cannot abort its multipart upload
either: the upload is recorded and aborted once the server answers again -- by
the running service (retried with backoff), or by the next open."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import pytest
import trio

from fixtures_s3 import SeaweedServer, logged
from fixtures_store import MiB, ZONE, random_bytes, read_all, snapshot_of
from snapfs.local import LocalService, open_local_service
from snapfs.local.uploads import left_uploads
from snapfs.s3.calls import RetryPolicy
from snapfs.s3.storage import S3ObjectStorage

pytestmark = pytest.mark.s3

#: Give up quickly: the outage must outlast the export's retries and its abort's.
QUICK = RetryPolicy(attempts=3, first_delay=0.1, max_delay=0.5, budget=2.0)


def objects_of(server: SeaweedServer) -> S3ObjectStorage:
    return server.objects(part_size=5 * MiB, concurrency=2, retry=QUICK, abort_retry=QUICK,
                          connect_timeout=1.0)


async def export_through_an_outage(svc: LocalService, server: SeaweedServer, bucket: str,
                                   vol: Path) -> str:
    """Start an export, stop the server once parts go up, and wait for the export
    to fail with its abort failed too: the upload id recorded."""
    snap = await snapshot_of(svc, vol)
    with logged("snapfs.local.uploads", "could not be aborted") as recorded:
        task = await svc.export_snapshot(ZONE, snap.id, bucket=bucket, key="big.qcow2")
        with trio.fail_after(60):
            while (t := await svc.get_task(ZONE, task.id)).progress < 5:
                assert t.status in ("pending", "started"), t
                await trio.sleep(0.005)
        uploads = server.client().list_multipart_uploads(Bucket=bucket).get("Uploads") or []
        assert len(uploads) == 1
        await trio.to_thread.run_sync(server.stop)
        with trio.fail_after(60):
            await recorded.wait()
    t = await svc.get_task(ZONE, task.id)
    with trio.fail_after(30):
        while (t := await svc.get_task(ZONE, task.id)).status in ("pending", "started"):
            await trio.sleep(0.02)
    assert t.status == "failure", t
    assert (await svc.get_snapshot(ZONE, snap.id)).state == "available"
    assert await read_all(svc, snap.id) == vol.read_bytes()
    [left] = left_uploads(svc.md)
    assert left.upload_id == uploads[0]["UploadId"] and left.key == "big.qcow2"
    return left.upload_id


async def test_an_upload_left_by_an_outage_is_aborted_once_the_server_is_back(
        private_s3_server: SeaweedServer, tmp_path: Path,
        volume_file: Callable[..., Path], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="snapfs")
    server = private_s3_server
    bucket = server.new_bucket()
    vol = volume_file("big", 96 * MiB, [(0, random_bytes(96 * MiB, 31))])
    objects = objects_of(server)
    try:
        async with open_local_service(tmp_path / "store", objects=objects) as svc:
            svc.left_uploads.retry_first = 0.2
            upload_id = await export_through_an_outage(svc, server, bucket, vol)
            await trio.sleep(1.0)  # a round or two of retries find the server still down
            assert [u.upload_id for u in left_uploads(svc.md)] == [upload_id]
            await trio.to_thread.run_sync(server.start)
            with trio.fail_after(60):
                while left_uploads(svc.md):
                    await trio.sleep(0.05)
    finally:
        await objects.aclose()
    c = server.client()
    assert c.list_multipart_uploads(Bucket=bucket).get("Uploads") is None
    assert c.list_objects_v2(Bucket=bucket).get("Contents") is None
    assert any(f"upload {upload_id} to {bucket}/big.qcow2 left by a failed export: aborted"
               in r.getMessage() for r in caplog.records)


async def test_an_upload_left_by_an_outage_is_aborted_by_the_next_open(
        private_s3_server: SeaweedServer, tmp_path: Path,
        volume_file: Callable[..., Path]) -> None:
    server = private_s3_server
    bucket = server.new_bucket()
    vol = volume_file("big", 96 * MiB, [(0, random_bytes(96 * MiB, 32))])
    store = tmp_path / "store"
    objects = objects_of(server)
    try:
        async with open_local_service(store, objects=objects) as svc:
            svc.left_uploads.retry_first = 3600.0  # no retry while this one runs
            await export_through_an_outage(svc, server, bucket, vol)
    finally:
        await objects.aclose()
    await trio.to_thread.run_sync(server.start)
    assert server.client().list_multipart_uploads(Bucket=bucket).get("Uploads")
    objects = objects_of(server)
    try:
        async with open_local_service(store, objects=objects) as svc:
            assert left_uploads(svc.md) == []
    finally:
        await objects.aclose()
    c = server.client()
    assert c.list_multipart_uploads(Bucket=bucket).get("Uploads") is None
    assert c.list_objects_v2(Bucket=bucket).get("Contents") is None
