#!/usr/bin/env python3
"""Export benchmark: snapfs export (streamed QCOW2 multipart upload) vs `aws s3 cp`
of the raw volume file, both to the same SeaweedFS server in the same run.

A 2 GiB raw volume holding 1 GiB of random data in three runs (the rest holes)
is snapshotted (not timed), then exported by the local service through the S3
ObjectStorage in its own process (as the daemon would), then the raw file is
uploaded with `aws s3 cp` (awscli, installed into a venv of its own under .venv
if missing: its pinned botocore must not replace the project's).

It then uploads the exported object's own bytes (the QCOW2 file, 1 GiB of data
where the raw file is 2 GiB) with `aws s3 cp` as well: the same-bytes anchor.
Both ratios are printed, with the load average. Each aws upload goes to an
empty SeaweedFS of its own, as the export did (the import of the object runs
before them, on the export's server).

Targets (issue 4): aws time / export time >= 1.0; object size / data <= 1.05;
peak RSS of the exporting process <= 200 MB.

    .venv/bin/python scripts/bench/export.py [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from fixtures_s3 import ADMIN, SeaweedServer  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
SIZE = 2 * GiB
RUNS = [(0, 400 * MiB), (800 * MiB, 300 * MiB), (1536 * MiB, 324 * MiB)]  # 1 GiB in all
DATA = sum(n for _, n in RUNS)

EXPORT = """
import json, resource, sys, time, trio
from snapfs.local import open_local_service
from snapfs.memory import limit_malloc_arenas
from snapfs.s3.storage import S3ObjectStorage
from snapfs.s3.config import S3Settings
limit_malloc_arenas()  # as snapfs mount / serve do
# The task's state is read every 50 ms: at 10 ms the reads (SQLite, in this
# process) cost ~0.4 CPU-s per export (export_ab.py rounds), which no daemon spends.
POLL = 0.05

def rss_peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

async def main():
    store, path, endpoint, ak, sk, bucket, conc = sys.argv[1:8]
    settings = S3Settings(endpoint=endpoint, region="us-east-1", access_key=ak, secret_key=sk)
    if int(conc):
        settings = settings.replace(concurrency=int(conc))
    objects = S3ObjectStorage(settings)
    async with open_local_service(store, objects=objects) as svc:
        vol = await svc.add_volume("bench", path)
        snap = await svc.create_snapshot("fr-par-1", name="s", volume_id=vol.id)
        while (await svc.get_snapshot("fr-par-1", snap.id)).state == "snapshotting":
            await trio.sleep(0.01)
        capture_peak = rss_peak()  # (the import below runs after the export's peak reset)
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: the export's own peak
            f.write("5")
        t = time.perf_counter()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        task = await svc.export_snapshot("fr-par-1", snap.id, bucket=bucket, key="snap.qcow2")
        while (task := await svc.get_task("fr-par-1", task.id)).status in ("pending", "started"):
            await trio.sleep(POLL)
        dt = time.perf_counter() - t
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        export_rss = rss_peak()
    await objects.aclose()
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(json.dumps({"seconds": dt, "status": task.status, "error": task.error,
                      "bytes": task.bytes, "cpu": cpu, "export_rss": export_rss,
                      "capture_rss": capture_peak}))
trio.run(main)
"""

# The way back (a sanity figure, no target): a fresh daemon imports the object.
IMPORT = """
import json, sys, time, trio
from snapfs.local import open_local_service
from snapfs.memory import limit_malloc_arenas
from snapfs.s3.storage import S3ObjectStorage
from snapfs.s3.config import S3Settings
limit_malloc_arenas()  # as snapfs mount / serve do
# The task's state is read every 50 ms: at 10 ms the reads (SQLite, in this
# process) cost ~0.4 CPU-s per export (export_ab.py rounds), which no daemon spends.
POLL = 0.05

async def main():
    store, endpoint, ak, sk, bucket = sys.argv[1:6]
    objects = S3ObjectStorage(S3Settings(endpoint=endpoint, region="us-east-1",
                                         access_key=ak, secret_key=sk))
    async with open_local_service(store, objects=objects) as svc:
        t = time.perf_counter()
        imp = await svc.create_snapshot("fr-par-1", name="back", bucket=bucket,
                                        key="snap.qcow2")
        while (imp := await svc.get_snapshot("fr-par-1", imp.id)).state == "importing":
            await trio.sleep(POLL)
        dt = time.perf_counter() - t
    await objects.aclose()
    rss = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")]
    print(json.dumps({"seconds": dt, "state": imp.state, "rss": rss[0]}))
trio.run(main)
"""


def aws_cli() -> Path:
    """`aws` from PATH (as scale.py), else from a venv of its own (awscli pins
    an exact botocore)."""
    found = shutil.which("aws")
    if found:
        return Path(found)
    venv = ROOT / ".venv" / "awscli-venv"
    exe = venv / "bin" / "aws"
    if not exe.exists():
        print("bench: installing awscli into", venv, file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q",
                        "--disable-pip-version-check", "awscli"], check=True)
    return exe


def make_volume(path: Path) -> None:
    import blake3
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for i, (off, n) in enumerate(RUNS):
            f.seek(off)
            f.write(blake3.blake3(i.to_bytes(8, "little")).digest(length=n))
    subprocess.run(["sync"], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--concurrency", type=int, default=0,
                    help="parallel part uploads (default: the S3 settings' default)")
    args = ap.parse_args()
    aws = aws_cli()
    work = Path(tempfile.mkdtemp(prefix="snapfs-bench-export-", dir=args.dir))
    servers = [SeaweedServer(work / "seaweedfs")]

    def fresh_server(tag: str) -> tuple[SeaweedServer, str]:
        """An empty SeaweedFS for the next timed upload, as the export's was."""
        for old in servers:
            old.stop()
            shutil.rmtree(old.root, ignore_errors=True)
        servers[:] = [SeaweedServer(work / f"seaweedfs-{tag}")]
        servers[0].start()
        return servers[0], servers[0].new_bucket()

    server = servers[0]
    try:
        vol = work / "volume.raw"
        make_volume(vol)
        server.start()
        bucket = server.new_bucket()
        r = subprocess.run([sys.executable, "-c", EXPORT, str(work / "store"), str(vol),
                            server.endpoint, ADMIN[0], ADMIN[1], bucket,
                            str(args.concurrency)],
                           capture_output=True, text=True, check=True)
        ours = json.loads(r.stdout.strip().splitlines()[-1])
        if ours["status"] != "success":
            print(f"bench: export failed: {ours['error']}", file=sys.stderr)
            return 1
        size = server.client().head_object(Bucket=bucket, Key="snap.qcow2")["ContentLength"]
        qcow2 = work / "snap.qcow2"
        server.client().download_file(bucket, "snap.qcow2", str(qcow2))
        r = subprocess.run([sys.executable, "-c", IMPORT, str(work / "store2"),
                            server.endpoint, ADMIN[0], ADMIN[1], bucket],
                           capture_output=True, text=True, check=True)
        back = json.loads(r.stdout.strip().splitlines()[-1])

        env = dict(os.environ, AWS_ACCESS_KEY_ID=ADMIN[0], AWS_SECRET_ACCESS_KEY=ADMIN[1],
                   AWS_DEFAULT_REGION="us-east-1", AWS_REQUEST_CHECKSUM_CALCULATION="when_required",
                   AWS_RESPONSE_CHECKSUM_VALIDATION="when_required")
        subprocess.run(["sync"], check=True)
        server, bucket = fresh_server("raw")
        t = time.perf_counter()
        subprocess.run([str(aws), "s3", "cp", "--only-show-errors", "--endpoint-url",
                        server.endpoint, str(vol), f"s3://{bucket}/volume.raw"],
                       check=True, env=env)
        aws_s = time.perf_counter() - t
        # The same-bytes anchor: aws s3 cp of the exported object itself (the QCOW2
        # file, data only), so the ratio compares uploads of equal size.
        subprocess.run(["sync"], check=True)
        server, bucket = fresh_server("same")
        t = time.perf_counter()
        subprocess.run([str(aws), "s3", "cp", "--only-show-errors", "--endpoint-url",
                        server.endpoint, str(qcow2), f"s3://{bucket}/copy.qcow2"],
                       check=True, env=env)
        same_s = time.perf_counter() - t

        print(f"volume: {SIZE / GiB:.0f} GiB, data {DATA / GiB:.2f} GiB")
        print(f"snapfs export : {ours['seconds']:7.2f} s  object {size / MiB:8.1f} MiB  "
              f"CPU {ours['cpu']:.1f} s  "
              f"peak RSS export {ours['export_rss'] / MiB:.0f} MiB "
              f"(process incl. capture {ours['capture_rss'] / MiB:.0f} MiB)")
        print(f"aws s3 cp raw : {aws_s:7.2f} s  object {SIZE / MiB:8.1f} MiB")
        print(f"aws s3 cp qcow2: {same_s:6.2f} s  object {size / MiB:8.1f} MiB "
              f"(the exported object's bytes: the same-bytes anchor)")
        print(f"snapfs import of the object (fresh process): {back['seconds']:.2f} s "
              f"({back['state']}), peak RSS {back['rss'] / MiB:.0f} MiB")
        ratio = aws_s / ours["seconds"]
        peak = max(ours["export_rss"], ours["capture_rss"])
        print(f"time ratio aws(raw file)/export: {ratio:.2f} (target >= 1.0) "
              f"{'OK' if ratio >= 1.0 else 'MISSED'}")
        print(f"time ratio aws(same bytes)/export: {same_s / ours['seconds']:.2f} "
              f"(uploading the QCOW2 object's bytes as they are)")
        print("load average (1, 5, 15 min): %.2f %.2f %.2f" % os.getloadavg())
        print(f"object/data: {size / DATA:.3f} (target <= 1.05) "
              f"{'OK' if size / DATA <= 1.05 else 'MISSED'}")
        print(f"peak RSS (capture + export): {peak / 1e6:.0f} MB (target <= 200 MB) "
              f"{'OK' if peak <= 200e6 else 'MISSED'}")
        return 0
    finally:
        for server in servers:
            server.stop()
        if args.keep:
            print("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
