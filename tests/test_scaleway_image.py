"""image.raw in the cloud: the Scaleway backend exports the snapshot through the
API (`snapfs serve`, real HTTP) to a staging bucket on SeaweedFS and reads it
back with ranged GETs through the QCOW2 reader; bytes compared with the volume."""

from __future__ import annotations

import errno
import random
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trio

from fixtures_http import ACCESS_KEY, SECRET, Served
from snapfs.errors import NotFound, NotPermitted, PermissionDenied, SnapfsError, errno_for
from snapfs.scaleway import ScalewayService, open_scaleway_service
from snapfs.scaleway.images import STAGING_PREFIX

pytestmark = pytest.mark.s3
MiB = 1 << 20


@pytest.fixture
def scw_env(served_s3: Served, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Served:
    monkeypatch.setenv("SCW_CONFIG_PATH", str(tmp_path / "absent.yaml"))
    monkeypatch.delenv("SCW_PROFILE", raising=False)
    for name, value in (("SCW_ACCESS_KEY", ACCESS_KEY), ("SCW_SECRET_KEY", SECRET),
                        ("SCW_API_URL", served_s3.url), ("SCW_DEFAULT_ZONE", "fr-par-1"),
                        ("SCW_DEFAULT_PROJECT_ID", served_s3.default_project)):
        monkeypatch.setenv(name, value)
    return served_s3


@pytest.fixture
async def cloud(scw_env: Served, s3_server: Any, bucket: str
                ) -> AsyncIterator[tuple[ScalewayService, str]]:
    objects = s3_server.objects()
    try:
        async with open_scaleway_service(staging_bucket=bucket, objects=objects) as svc:
            yield svc, bucket
    finally:
        await objects.aclose()


async def _snapshot(svc: ScalewayService, volume_id: str) -> Any:
    snap = await svc.create_snapshot("fr-par-1", name=f"img-{uuid.uuid4().hex[:8]}",
                                     volume_id=volume_id)
    with trio.fail_after(60):
        while (snap := await svc.get_snapshot("fr-par-1", snap.id)).state != "available":
            await trio.sleep(0.05)
    return snap


async def test_image_raw_bytes_and_reuse(cloud: tuple[ScalewayService, str], scw_env: Served,
                                         s3_server: Any) -> None:
    svc, bucket = cloud
    vol = scw_env.volumes["vol-a"]
    expected = Path(vol["path"]).read_bytes()
    snap = await _snapshot(svc, vol["id"])
    # vol-a is a block volume: its snapshot is the Block API's, exported with Block's
    # export (no task: followed through the snapshot's status).
    assert snap.api == "block"

    reader = await svc.open_image("fr-par-1", snap.id)
    try:
        assert reader.size == len(expected) == snap.size
        # Sequential 1 MiB reads, the whole image.
        got = bytearray()
        while len(got) < reader.size:
            got += await reader.read(len(got), MiB)
        assert bytes(got) == expected
        # Unaligned random reads, across data and holes; a read at the end is short.
        rnd = random.Random(5)
        for _ in range(40):
            off = rnd.randrange(reader.size)
            n = rnd.randrange(1, 300_000)
            assert await reader.read(off, n) == expected[off:off + n]
        assert await reader.read(reader.size - 10, 100) == expected[-10:]
        assert await reader.read(reader.size, 100) == b""
    finally:
        await reader.aclose()
    assert svc._images.exports_started == 1
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(
        Bucket=bucket, Prefix=STAGING_PREFIX).get("Contents", [])]
    assert len(keys) == 1 and snap.id in keys[0]

    # The second open reuses the export, in this service and in a new one.
    again = await svc.open_image("fr-par-1", snap.id)
    assert await again.read(0, 4096) == expected[:4096]
    await again.aclose()
    assert svc._images.exports_started == 1
    async with open_scaleway_service(staging_bucket=bucket, objects=svc.objects) as fresh:
        r = await fresh.open_image("fr-par-1", snap.id)
        assert await r.read(6 * MiB, 4096) == expected[6 * MiB:6 * MiB + 4096]
        await r.aclose()
        assert fresh._images.exports_started == 0


async def test_deleting_a_snapshot_deletes_its_staging_export(
        cloud: tuple[ScalewayService, str], scw_env: Served, s3_server: Any) -> None:
    svc, bucket = cloud
    kept, gone = [await _snapshot(svc, scw_env.volumes["vol-a"]["id"]) for _ in range(2)]
    for snap in (kept, gone):
        reader = await svc.open_image("fr-par-1", snap.id)
        await reader.aclose()

    def staged() -> list[str]:
        return [o["Key"] for o in s3_server.client().list_objects_v2(
            Bucket=bucket, Prefix=STAGING_PREFIX).get("Contents", [])]
    assert len(staged()) == 2
    await svc.delete_snapshot("fr-par-1", gone.id)
    [left] = staged()
    assert kept.id in left
    with pytest.raises(NotFound):
        await svc.get_snapshot("fr-par-1", gone.id)


async def test_concurrent_opens_share_one_export(cloud: tuple[ScalewayService, str],
                                                 scw_env: Served) -> None:
    svc, _ = cloud
    vol = scw_env.volumes["vol-b"]
    expected = Path(vol["path"]).read_bytes()
    snap = await _snapshot(svc, vol["id"])
    readers: list[Any] = []

    async def open_one() -> None:
        readers.append(await svc.open_image("fr-par-1", snap.id))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(open_one)
    try:
        assert svc._images.exports_started == 1
        for r in readers:
            assert await r.read(MiB, MiB) == expected[MiB:2 * MiB]
    finally:
        for r in readers:
            await r.aclose()


async def test_image_refusals(cloud: tuple[ScalewayService, str], scw_env: Served,
                              s3_server: Any) -> None:
    svc, _ = cloud
    snap = await _snapshot(svc, scw_env.volumes["vol-a"]["id"])
    async with open_scaleway_service() as bare:  # no staging bucket
        with pytest.raises(NotPermitted) as exc:
            await bare.open_image("fr-par-1", snap.id)
        assert errno_for(exc.value) == errno.EPERM
    missing_bucket = f"nope-{uuid.uuid4().hex[:8]}"
    async with open_scaleway_service(staging_bucket=missing_bucket,
                                     objects=svc.objects) as wrong:
        # A missing staging bucket is named (ENOENT) before any export is started.
        with pytest.raises(NotFound) as exc2:
            await wrong.open_image("fr-par-1", snap.id)
        assert exc2.value.resource == "bucket" and exc2.value.ident == missing_bucket
        assert errno_for(exc2.value) == errno.ENOENT
        assert wrong._images.exports_started == 0
    # Nothing was left behind: the snapshot is still available, not exporting.
    assert (await svc.get_snapshot("fr-par-1", snap.id)).state == "available"
    with pytest.raises(SnapfsError) as exc3:
        await svc.open_image("fr-par-1", str(uuid.uuid4()))
    assert isinstance(exc3.value, NotFound) and exc3.value.resource == "snapshot"


async def test_an_export_into_the_staging_prefix_is_refused(
        cloud: tuple[ScalewayService, str], scw_env: Served, s3_server: Any) -> None:
    """An export written to another snapshot's staging key (`echo stage/snapfs-
    staging/... > export`) made that snapshot's image.raw read these bytes: the
    staged image is taken by its key and size. The prefix is the mount's own."""
    svc, bucket = cloud
    snap = await _snapshot(svc, scw_env.volumes["vol-a"]["id"])
    for key in (f"{STAGING_PREFIX}fr-par-1/{snap.id}-0.qcow2", f"{STAGING_PREFIX}x"):
        with pytest.raises(PermissionDenied, match="staged images"):
            await svc.export_snapshot("fr-par-1", snap.id, bucket=bucket, key=key)
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    task = await svc.export_snapshot("fr-par-1", snap.id, bucket=bucket, key="mine.qcow2")
    assert task.id
