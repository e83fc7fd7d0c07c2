"""README: a SIGKILL mid-import is recovered by the next open like one mid-capture:
the import is marked `error` ("interrupted"), its chunks are released and punched,
the other snapshots read right, fsck is clean, and importing again works."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Callable

import pytest
import trio

from fixtures_s3 import ADMIN, SeaweedServer, qcow2_of
from fixtures_store import (MiB, ZONE, kill_mid_way, random_bytes, read_all, snapfs_cli,
                            snapshot_of, wait_state)
from snapfs.local import open_local_service

pytestmark = pytest.mark.s3

#: A daemon importing one object as snapshot 'doomed'. Its real import is paced
#: after its first group commit, so that the kill always lands mid-way.
KILLED_IMPORT = textwrap.dedent("""
    import sys, trio
    from snapfs.local import capture, importsource, open_local_service
    from snapfs.s3.config import S3Settings
    from snapfs.s3.storage import S3ObjectStorage

    def pace(cls):  # imports read through either source (importsource.import_source)
        read = cls.read_batch
        async def paced(self, first, count):
            if first >= capture.GROUP_BYTES // capture.CHUNK_SIZE:
                await trio.sleep(0.05)
            if (first + count) * capture.CHUNK_SIZE >= self.size:
                await trio.sleep_forever()  # never done: a loaded run's kill came late
            return await read(self, first, count)
        cls.read_batch = paced
    pace(capture.ReaderSource)
    pace(importsource.AllocatedSource)

    async def main():
        store, endpoint, bucket, key = sys.argv[1:5]
        objects = S3ObjectStorage(S3Settings(endpoint=endpoint, region="us-east-1"))
        async with open_local_service(store, objects=objects) as svc:
            await svc.create_snapshot("fr-par-1", name="doomed", bucket=bucket, key=key)
            print("started", flush=True)
            await trio.sleep_forever()
    trio.run(main)
""")


def test_sigkill_mid_import_is_recovered_by_the_next_open(
        s3_server: SeaweedServer, bucket: str, tmp_path: Path,
        volume_file: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked by breaking it: without recovery's marking of dead processes'
    imports (recovery.py) the snapshot stays `importing` and its chunks stay."""
    keep = volume_file("keep", 4 * MiB, [(0, random_bytes(4 * MiB, seed=31))])
    raw = volume_file("big", 160 * MiB, [(0, random_bytes(160 * MiB, seed=32))])
    s3_server.client().upload_file(str(qcow2_of(raw)), bucket, "big.qcow2")
    store = tmp_path / "store"

    async def first() -> str:
        async with open_local_service(store) as svc:
            return (await snapshot_of(svc, keep, name="keeper")).id
    keeper = trio.run(first)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ADMIN[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ADMIN[1])
    progress = kill_mid_way(KILLED_IMPORT, store, s3_server.endpoint, bucket, "big.qcow2")
    assert 10 <= progress < 100, progress

    async def after() -> None:
        objects = s3_server.objects()
        try:
            async with open_local_service(store, objects=objects) as svc:
                doomed = (await svc.list_snapshots(ZONE, name="doomed")).items[0]
                assert doomed.state == "error"
                assert "interrupted" in (doomed.error_reason or "")
                assert await read_all(svc, keeper) == keep.read_bytes()
                # Its committed chunks were released: only the keeper's 4 remain.
                assert svc.md.conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == 4
                # And the same object imports whole now.
                again = await svc.create_snapshot(ZONE, name="again", bucket=bucket,
                                                  key="big.qcow2")
                assert (await wait_state(svc, again.id, timeout=120)).state == "available"
                assert await read_all(svc, again.id) == raw.read_bytes()
        finally:
            await objects.aclose()
    trio.run(after)
    res = snapfs_cli("fsck", store=store)
    assert res.returncode == 0 and "clean" in res.stdout, res.stdout
