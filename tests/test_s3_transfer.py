"""The S3 layer against a real SeaweedFS: streamed multipart export judged by
qemu-img, ranged-GET import of images qemu-img made, and the failures (missing
bucket or key, access denied, garbage, truncated, server gone mid-export).

The export source here is a plain file read through the ImageReader interface
(the service's own reader is exercised in test_s3_service.py)."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trio
import urllib3

from fixtures_proxy import Fault, FaultProxy
from fixtures_s3 import ADMIN, READER, SeaweedServer, logged, qcow2_of, qemu_img_judges
from snapfs.errors import InvalidData, NotFound, PermissionDenied, Transient
from snapfs.s3 import deadline
from snapfs.s3.calls import RetryPolicy
from snapfs.s3.storage import S3ObjectStorage
from snapfs.service import ImageReader

pytestmark = pytest.mark.s3
MiB = 1 << 20


class FileImage(ImageReader):
    """A raw file as an ImageReader; optionally pauses once ``pause_at`` is reached."""

    def __init__(self, path: Path, pause_at: int | None = None) -> None:
        self.path = path
        self.size = path.stat().st_size
        self.pause_at = pause_at
        self.paused = trio.Event()
        self.resume = trio.Event()

    async def read(self, offset: int, length: int) -> bytes:
        if self.pause_at is not None and offset >= self.pause_at and not self.resume.is_set():
            self.paused.set()
            await self.resume.wait()

        def pread() -> bytes:
            with open(self.path, "rb") as f:
                return os.pread(f.fileno(), length, offset)
        return await trio.to_thread.run_sync(pread)

    async def aclose(self) -> None:
        pass


def make_raw(path: Path, size: int, pieces: list[tuple[int, int]]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in pieces:
            f.seek(off)
            f.write(os.urandom(n))
    return path


def download(server: SeaweedServer, bucket: str, key: str, dest: Path) -> Path:
    server.client().download_file(bucket, key, str(dest))
    return dest


def uploads(server: SeaweedServer, bucket: str) -> list:
    return server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def keys(server: SeaweedServer, bucket: str) -> list[str]:
    return [o["Key"] for o in server.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


async def test_export_multipart_is_valid_and_small(s3_server: SeaweedServer, bucket: str,
                                                   tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "image.raw", 96 * MiB + 512,
                   [(0, 3 * MiB), (10 * MiB + 77, 9 * MiB), (60 * MiB, 7 * MiB),
                    (96 * MiB, 512)])
    objects = s3_server.objects(part_size=5 * MiB, concurrency=3)
    seen: list[tuple[int, int]] = []
    try:
        size = await objects.export_qcow2(FileImage(raw), bucket, "snap.qcow2",
                                          lambda d, t: seen.append((d, t)))
    finally:
        await objects.aclose()
    head = s3_server.client().head_object(Bucket=bucket, Key="snap.qcow2")
    assert head["ContentLength"] == size
    data = 19 * MiB + 2 * 65536  # two clusters for the unaligned piece and the tail
    assert size <= data * 1.02 + 512 * 1024
    assert seen[-1] == (raw.stat().st_size, raw.stat().st_size)
    assert all(a[0] < b[0] for a, b in zip(seen, seen[1:]))
    assert uploads(s3_server, bucket) == []
    qemu_img_judges(download(s3_server, bucket, "snap.qcow2", tmp_path / "o.qcow2"), raw)


async def test_export_small_image_is_one_part(s3_server: SeaweedServer, bucket: str,
                                              tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "small.raw", 4 * MiB, [(MiB, 100_000)])
    objects = s3_server.objects()
    try:
        await objects.export_qcow2(FileImage(raw), bucket, "small.qcow2", lambda d, t: None)
    finally:
        await objects.aclose()
    qemu_img_judges(download(s3_server, bucket, "small.qcow2", tmp_path / "o.qcow2"), raw)


@pytest.mark.parametrize("opts", [(), ("-c",), ("-c", "-o", "compression_type=zstd")],
                         ids=["plain", "deflate", "zstd"])
async def test_import_qemu_images(s3_server: SeaweedServer, bucket: str, tmp_path: Path,
                                  opts: tuple[str, ...]) -> None:
    raw = tmp_path / "image.raw"
    with open(raw, "wb") as f:
        f.truncate(40 * MiB)
        f.write(b"compressible text, compressible text\n" * 100_000)
        f.seek(20 * MiB + 4096)
        f.write(os.urandom(6 * MiB))
    img = qcow2_of(raw, *opts)
    s3_server.client().upload_file(str(img), bucket, "in.qcow2")
    objects = s3_server.objects(max_get=1 * MiB, readahead=8 * MiB)
    expected = raw.read_bytes()
    try:
        reader = await objects.open_qcow2(bucket, "in.qcow2")
        assert reader.size == len(expected)
        got = bytearray()
        for off in range(0, reader.size, MiB):  # the capture's pattern
            got += await reader.read(off, MiB)
        assert bytes(got) == expected
        for off, n in [(5, 70_000), (20 * MiB + 4000, 3 * MiB), (len(expected) - 9, 100)]:
            assert await reader.read(off, n) == expected[off:off + n]
        await reader.aclose()
    finally:
        await objects.aclose()


async def test_export_then_import_round_trip(s3_server: SeaweedServer, bucket: str,
                                             tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "rt.raw", 600 * MiB, [(511 * MiB, 2 * MiB), (5, 1000)])
    objects = s3_server.objects()
    try:
        await objects.export_qcow2(FileImage(raw), bucket, "rt.qcow2", lambda d, t: None)
        reader = await objects.open_qcow2(bucket, "rt.qcow2")
        assert reader.size == raw.stat().st_size
        with open(raw, "rb") as f:
            for off in (0, 510 * MiB, 512 * MiB, 599 * MiB):
                f.seek(off)
                assert await reader.read(off, 4 * MiB) == f.read(4 * MiB)
        await reader.aclose()
    finally:
        await objects.aclose()


async def test_missing_bucket(s3_server: SeaweedServer, tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "m.raw", MiB, [(0, 1000)])
    objects = s3_server.objects()
    try:
        with pytest.raises(NotFound, match="bucket 'no-such-bucket'"):
            await objects.export_qcow2(FileImage(raw), "no-such-bucket", "k", lambda d, t: None)
        with pytest.raises(NotFound, match="bucket 'no-such-bucket'|object"):
            await objects.open_qcow2("no-such-bucket", "k")
    finally:
        await objects.aclose()
    names = [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    assert "no-such-bucket" not in names


async def test_missing_key(s3_server: SeaweedServer, bucket: str) -> None:
    objects = s3_server.objects()
    try:
        with pytest.raises(NotFound, match="object"):
            await objects.open_qcow2(bucket, "nothing-here.qcow2")
    finally:
        await objects.aclose()


async def test_access_denied_export_leaves_nothing(s3_server: SeaweedServer, bucket: str,
                                                   tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "d.raw", 2 * MiB, [(0, 1000)])
    objects = s3_server.objects(creds=READER)
    try:
        with pytest.raises(PermissionDenied, match="denied"):
            await objects.export_qcow2(FileImage(raw), bucket, "k.qcow2", lambda d, t: None)
    finally:
        await objects.aclose()
    assert uploads(s3_server, bucket) == [] and keys(s3_server, bucket) == []


async def test_garbage_and_truncated_objects(s3_server: SeaweedServer, bucket: str,
                                             tmp_path: Path) -> None:
    c = s3_server.client()
    c.put_object(Bucket=bucket, Key="garbage", Body=os.urandom(200_000))
    c.put_object(Bucket=bucket, Key="empty", Body=b"")
    raw = make_raw(tmp_path / "t.raw", 16 * MiB, [(0, 12 * MiB)])
    img = qcow2_of(raw)
    c.put_object(Bucket=bucket, Key="truncated", Body=img.read_bytes()[:6 * MiB])
    objects = s3_server.objects()
    try:
        with pytest.raises(InvalidData, match="not a QCOW2 image: bad magic"):
            await objects.open_qcow2(bucket, "garbage")
        with pytest.raises(InvalidData, match="empty"):
            await objects.open_qcow2(bucket, "empty")
        with pytest.raises(InvalidData, match="truncated QCOW2 image"):
            reader = await objects.open_qcow2(bucket, "truncated")
            for off in range(0, reader.size, MiB):
                await reader.read(off, MiB)
    finally:
        await objects.aclose()


async def test_server_gone_mid_export_aborts_upload(private_s3_server: SeaweedServer,
                                                    tmp_path: Path) -> None:
    """The server dies between parts: retries give up, the export fails as
    Transient, and the abort (retried until the server is back) leaves no parts."""
    server = private_s3_server
    bucket = server.new_bucket()
    raw = make_raw(tmp_path / "g.raw", 40 * MiB, [(0, 40 * MiB)])
    image = FileImage(raw, pause_at=24 * MiB)
    objects = server.objects(part_size=5 * MiB, concurrency=2,
                             retry=RetryPolicy(attempts=3, first_delay=0.1, budget=2.0),
                             abort_retry=RetryPolicy(attempts=100, first_delay=0.2,
                                                     max_delay=1.0, budget=120.0))
    outcome: list[BaseException] = []
    with logged("snapfs.s3.export", "aborting the upload") as aborting:
        try:
            async with trio.open_nursery() as nursery:
                async def run() -> None:
                    try:
                        await objects.export_qcow2(image, bucket, "g.qcow2", lambda d, t: None)
                    except Exception as exc:
                        outcome.append(exc)
                nursery.start_soon(run)
                with trio.fail_after(60):
                    await image.paused.wait()
                assert len(uploads(server, bucket)) == 1  # parts went up already
                await trio.to_thread.run_sync(server.stop)
                image.resume.set()
                with trio.fail_after(60):
                    await aborting.wait()
                await trio.to_thread.run_sync(server.start)
        finally:
            await objects.aclose()
    assert len(outcome) == 1 and isinstance(outcome[0], Transient), outcome
    assert "after" in str(outcome[0]) and "attempts" in str(outcome[0])
    assert uploads(server, bucket) == []
    assert keys(server, bucket) == []


async def test_concurrent_reads_share_fetches(s3_server: SeaweedServer, bucket: str,
                                              tmp_path: Path) -> None:
    """FUSE sends several 128 KiB reads of one stream at once: all correct, and the
    read-ahead windows serve them with far fewer GETs than reads."""
    raw = make_raw(tmp_path / "c.raw", 16 * MiB, [(0, 16 * MiB)])
    s3_server.client().upload_file(str(qcow2_of(raw)), bucket, "c.qcow2")
    objects = s3_server.objects()
    expected = raw.read_bytes()
    gets: list[str] = []
    try:
        reader = await objects.open_qcow2(bucket, "c.qcow2")
        (await objects.calls_for()).client.meta.events.register(  # count real requests
            "before-send.s3.GetObject", lambda **kw: gets.append(kw["request"].url))
        chunk = 128 * 1024
        results: dict[int, bytes] = {}

        async def one(off: int) -> None:
            results[off] = await reader.read(off, chunk)
        for base in range(0, len(expected), 8 * chunk):  # 8 reads in flight at a time
            async with trio.open_nursery() as nursery:
                for off in range(base, base + 8 * chunk, chunk):
                    nursery.start_soon(one, off)
        assert b"".join(results[o] for o in sorted(results)) == expected
        assert len(gets) < len(results) // 4, (len(gets), len(results))
        await reader.aclose()
    finally:
        await objects.aclose()


async def test_sequential_reads_are_served_by_read_ahead(s3_server: SeaweedServer, bucket: str,
                                                         tmp_path: Path) -> None:
    """A streaming reader (dd through the mount, an import) finds the next windows
    fetched in the background: a read-ahead that silently failed would leave every
    window to be fetched while the reader waits (it once did, and went unnoticed)."""
    raw = make_raw(tmp_path / "s.raw", 96 * MiB, [(0, 96 * MiB)])
    s3_server.client().upload_file(str(qcow2_of(raw)), bucket, "s.qcow2")
    objects = s3_server.objects()
    expected = raw.read_bytes()
    try:
        async with trio.open_nursery() as nursery:  # the owner's, where read-ahead runs
            reader = await objects.open_qcow2(bucket, "s.qcow2", nursery=nursery)
            for off in range(0, len(expected), MiB):
                assert await reader.read(off, MiB) == expected[off:off + MiB]
                await trio.sleep(0.002)  # a consumer slower than the network
            stats = dict(reader.stats)  # type: ignore[attr-defined]
            await reader.aclose()
    finally:
        await objects.aclose()
    # The first window on demand; the rest ahead.
    assert stats["read_ahead"] >= 4, stats
    assert stats["on_demand"] <= 5, stats


async def test_an_object_replaced_mid_read_fails_instead_of_mixing_versions(
        s3_server: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """Every GET asks for the version the reader opened (If-Match: its ETag): an
    image replaced meanwhile -- same layout, other bytes, which no table check can
    tell -- fails clearly instead of reading half of each."""
    objects = s3_server.objects()
    try:
        await replaced_mid_read(s3_server, bucket, tmp_path, objects)
    finally:
        await objects.aclose()


async def replaced_mid_read(s3_server: SeaweedServer, bucket: str, tmp_path: Path,
                            objects: S3ObjectStorage) -> None:
    """An image opened, then replaced by one of the same layout: the reads after
    fail as "changed while being read" (whatever was fetched before is right)."""
    raw = make_raw(tmp_path / "a.raw", 64 * MiB, [(0, 64 * MiB)])
    other = make_raw(tmp_path / "b.raw", 64 * MiB, [(0, 64 * MiB)])
    s3_server.client().upload_file(str(qcow2_of(raw)), bucket, "disk.qcow2")
    reader = await objects.open_qcow2(bucket, "disk.qcow2")
    assert await reader.read(0, MiB) == raw.read_bytes()[:MiB]
    s3_server.client().upload_file(str(qcow2_of(other)), bucket, "disk.qcow2")
    expected = raw.read_bytes()
    with pytest.raises(InvalidData, match="changed while being read"):
        for off in range(MiB, len(expected), MiB):
            assert await reader.read(off, MiB) == expected[off:off + MiB]
    await reader.aclose()


async def test_a_qcow2_objects_holes_come_from_its_tables(s3_server: SeaweedServer, bucket: str,
                                                           tmp_path: Path) -> None:
    """SEEK_DATA/SEEK_HOLE of a cloud image.raw: the allocation the L2 tables map
    (1 MiB grains), known at open without another request."""
    raw = make_raw(tmp_path / "image.raw", 2048 * MiB,
                   [(0, MiB), (700 * MiB + 4096, 2 * MiB), (2047 * MiB, MiB)])
    s3_server.client().upload_file(str(qcow2_of(raw)), bucket, "sparse.qcow2")
    objects = s3_server.objects()
    try:
        reader = await objects.open_qcow2(bucket, "sparse.qcow2")
        got = [(await reader.next_allocated(o * MiB) // MiB, await reader.next_hole(o * MiB) // MiB)
               for o in (0, 1, 300, 700, 703, 1000, 2047)]
        # (data, hole) from each offset; a run of 2 MiB + 4 KiB spans 3 grains.
        assert got == [(0, 1), (700, 1), (700, 300), (700, 703), (2047, 703), (2047, 1000),
                       (2047, 2048)]
        assert await reader.read(700 * MiB, 4096) == bytes(4096)  # a hole reads zeros
        await reader.aclose()
    finally:
        await objects.aclose()


class IfMatchIgnoringProxy:
    """A real S3 server as one that ignores If-Match (as some S3-compatible
    servers do): requests are forwarded to SeaweedFS without it, signed again
    with the same credentials."""

    def __init__(self, server: SeaweedServer) -> None:
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials
        creds = Credentials(*ADMIN)
        upstream = server.endpoint

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self._forward()

            do_HEAD = do_GET

            def _forward(self) -> None:
                keep = {k: v for k, v in self.headers.items() if k.lower() in
                        ("range", "x-amz-content-sha256")}
                req = AWSRequest(method=self.command, url=upstream + self.path, headers=keep)
                S3SigV4Auth(creds, "s3", "us-east-1").add_auth(req)
                res = urllib3.request(self.command, upstream + self.path,
                                      headers=dict(req.headers.items()), timeout=60)
                self.send_response(res.status)
                for k, v in res.headers.items():
                    if k.lower() not in ("connection", "transfer-encoding"):
                        self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(res.data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


async def test_a_server_ignoring_if_match_still_cannot_mix_versions(
        s3_server: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """The pin was If-Match alone: a server that ignores it answered the new
    version's bytes with a 200, and an import of an object replaced midway was
    `available` with the first part of one image and the rest of the other. The
    answer's ETag is checked too."""
    proxy = IfMatchIgnoringProxy(s3_server)
    objects = S3ObjectStorage(replace(s3_server.settings(), endpoint=proxy.url))
    try:
        await replaced_mid_read(s3_server, bucket, tmp_path, objects)
    finally:
        await objects.aclose()
        proxy.close()


async def test_a_trickling_answer_is_cut_at_its_deadline_and_read_again(
        s3_server: SeaweedServer, bucket: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A server sending a byte at a time never trips botocore's per-read timeout:
    an import sat at 0% for hours (its first L2 table would have taken 36), and an
    rmdir of it waited as long. A GET past its deadline is cut and tried again."""
    monkeypatch.setattr(deadline, "MIN_SECONDS", 1.0)
    monkeypatch.setattr(deadline, "POLL", 0.2)
    caplog.set_level(logging.INFO, "snapfs.s3")
    raw = make_raw(tmp_path / "a.raw", 8 * MiB, [(0, 8 * MiB)])
    s3_server.client().upload_file(str(qcow2_of(raw)), bucket, "disk.qcow2")
    proxy = FaultProxy(s3_server.endpoint)
    proxy.add(Fault(206, b"\0" * 65536, trickle=0.5, method="GET", match="disk.qcow2"))
    objects = S3ObjectStorage(replace(s3_server.settings(), endpoint=proxy.url))
    try:
        with trio.fail_after(30):
            reader = await objects.open_qcow2(bucket, "disk.qcow2")
            assert await reader.read(0, 8 * MiB) == raw.read_bytes()
            await reader.aclose()
    finally:
        await objects.aclose()
        proxy.close()
    assert "slower than" in caplog.text
