#!/usr/bin/env python3
"""Paired A/B rounds of the export against `aws s3 cp` of the same bytes.

One 2 GiB volume holding 1 GiB of random data (as scripts/bench/export.py) is
captured once; then each round exports it once per variant and uploads the
exported object's bytes with `aws s3 cp`, in turn (A B ... aws, next round
the same order), each upload to an empty SeaweedFS of its own. Per step: wall
time, CPU-seconds of the uploading process and of SeaweedFS, peak RSS of the
exporting process (from the export's start), and the load average.

A variant is ``name:key=value,...`` of S3Settings fields (part_size in MiB) or
of snapfs/s3/export.py's constants (upper case; BUFFER_BUDGET in MiB):

    .venv/bin/python scripts/bench/export_ab.py --rounds 3 \\
        --variant p8:part_size=8 --variant p16:part_size=16

``code=DIR`` runs that variant's export with another checkout's snapfs (A/B of
code: e.g. ``git archive main | tar -x -C /tmp/base``, then ``base:code=/tmp/base``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

from export import RUNS, SIZE, make_volume  # noqa: E402
from fixtures_s3 import ADMIN, SeaweedServer  # noqa: E402
from scale import aws_cli  # noqa: E402

MiB = 1 << 20

CAPTURE = """
import json, sys, trio
from snapfs.local import open_local_service

async def main():
    store, path = sys.argv[1:3]
    async with open_local_service(store) as svc:
        vol = await svc.add_volume("bench", path)
        snap = await svc.create_snapshot("fr-par-1", name="s", volume_id=vol.id)
        while (await svc.get_snapshot("fr-par-1", snap.id)).state == "snapshotting":
            await trio.sleep(0.01)
    print(json.dumps({"id": snap.id}))
trio.run(main)
"""

EXPORT = """
import json, resource, sys, time, trio
from snapfs.local import open_local_service
from snapfs.memory import limit_malloc_arenas
from snapfs.s3.storage import S3ObjectStorage
from snapfs.s3.config import S3Settings
limit_malloc_arenas()  # as snapfs mount / serve do

async def main():
    store, snap_id, endpoint, ak, sk, bucket, fields = sys.argv[1:8]
    settings = S3Settings(endpoint=endpoint, region="us-east-1", access_key=ak, secret_key=sk)
    fields = json.loads(fields)
    poll = fields.pop("poll_ms", 50) / 1000  # how often the task's status is read (as the benches)
    import snapfs.s3.export as export  # upper-case fields: the module's constants
    for name in [f for f in fields if f.isupper()]:
        setattr(export, name, fields.pop(name))
    settings = settings.replace(**fields)
    objects = S3ObjectStorage(settings)
    async with open_local_service(store, objects=objects) as svc:
        with open("/proc/self/clear_refs", "w") as f:  # VmHWM: the export's own peak
            f.write("5")
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        task = await svc.export_snapshot("fr-par-1", snap_id, bucket=bucket, key="snap.qcow2")
        while (task := await svc.get_task("fr-par-1", task.id)).status in ("pending", "started"):
            await trio.sleep(poll)
        dt = time.perf_counter() - t
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        rss = [int(l.split()[1]) * 1024 for l in open("/proc/self/status")
               if l.startswith("VmHWM:")][0]
    await objects.aclose()
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(json.dumps({"seconds": dt, "status": task.status, "error": task.error,
                      "cpu": cpu, "rss": rss}))
trio.run(main)
"""


def proc_cpu(pid: int) -> float:
    """CPU-seconds of a process and its reaped children (SeaweedFS: one process)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, spec = text.partition(":")
    fields: dict = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key == "code":
            fields[key] = value
            continue
        fields[key] = int(value) * MiB if key in ("part_size", "BUFFER_BUDGET") else int(value)
    return name, fields


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variant", action="append", default=[], help="name:field=value,...")
    ap.add_argument("--no-aws", action="store_true", help="variants only")
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variant] or [("default", {})]
    aws = aws_cli()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    aws_env = dict(os.environ, AWS_ACCESS_KEY_ID=ADMIN[0], AWS_SECRET_ACCESS_KEY=ADMIN[1],
                   AWS_DEFAULT_REGION="us-east-1",
                   AWS_REQUEST_CHECKSUM_CALCULATION="when_required",
                   AWS_RESPONSE_CHECKSUM_VALIDATION="when_required")
    work = Path(tempfile.mkdtemp(prefix="snapfs-bench-export-ab-", dir=args.dir or "/var/tmp"))
    servers: list[SeaweedServer] = []

    def fresh_server(tag: str) -> tuple[SeaweedServer, str]:
        for old in servers:
            old.stop()
            shutil.rmtree(old.root, ignore_errors=True)
        servers.clear()
        server = SeaweedServer(work / f"seaweedfs-{tag}")
        servers.append(server)
        server.start()
        return server, server.new_bucket()

    results: dict[str, list[dict]] = {name: [] for name, _ in variants}
    results["aws"] = []
    try:
        vol = work / "volume.raw"
        make_volume(vol)
        r = subprocess.run([sys.executable, "-c", CAPTURE, str(work / "store"), str(vol)],
                           capture_output=True, text=True, check=True, env=env)
        snap_id = json.loads(r.stdout.strip().splitlines()[-1])["id"]
        qcow2 = work / "snap.qcow2"
        print(f"data {sum(n for _, n in RUNS) / MiB:.0f} MiB in {SIZE / MiB:.0f} MiB; "
              f"load {os.getloadavg()}", flush=True)
        for rnd in range(args.rounds):
            steps = [*variants] + ([] if args.no_aws else [("aws", {})])
            for name, fields in steps:
                if name == "aws" and not qcow2.exists():
                    continue
                server, bucket = fresh_server(f"{rnd}-{name}")
                assert server.proc is not None
                weed0 = proc_cpu(server.proc.pid)
                subprocess.run(["sync"], check=True)
                if name == "aws":
                    t = time.perf_counter()
                    before = os.times()
                    subprocess.run([aws, "s3", "cp", "--only-show-errors", "--endpoint-url",
                                    server.endpoint, str(qcow2), f"s3://{bucket}/copy.qcow2"],
                                   check=True, env=aws_env)
                    after = os.times()
                    res = {"seconds": time.perf_counter() - t, "rss": 0,
                           "cpu": (after.children_user - before.children_user
                                   + after.children_system - before.children_system)}
                else:
                    fields = dict(fields)
                    code = fields.pop("code", None)
                    r = subprocess.run([sys.executable, "-c", EXPORT, str(work / "store"),
                                        snap_id, server.endpoint, ADMIN[0], ADMIN[1], bucket,
                                        json.dumps(fields)], capture_output=True, text=True,
                                       env=dict(env, PYTHONPATH=code) if code else env,
                                       cwd=work)  # -c imports from the cwd first
                    if r.returncode:
                        sys.stderr.write(r.stderr[-3000:])
                        return 1
                    res = json.loads(r.stdout.strip().splitlines()[-1])
                    if res["status"] != "success":
                        print("export failed:", res["error"], file=sys.stderr)
                        return 1
                    if not qcow2.exists():
                        server.client().download_file(bucket, "snap.qcow2", str(qcow2))
                res["weed_cpu"] = proc_cpu(server.proc.pid) - weed0
                res["load"] = os.getloadavg()[0]
                results[name].append(res)
                print(f"round {rnd} {name:>10}: {res['seconds']:6.2f} s  CPU {res['cpu']:5.2f} s"
                      f"  weed CPU {res['weed_cpu']:5.2f} s  RSS {res['rss'] / 1e6:4.0f} MB"
                      f"  load {res['load']:.1f}", flush=True)
        print("medians:")
        for name, runs in results.items():
            if runs:
                print(f"  {name:>10}: {statistics.median(r['seconds'] for r in runs):6.2f} s, "
                      f"CPU {statistics.median(r['cpu'] for r in runs):5.2f} s, "
                      f"weed CPU {statistics.median(r['weed_cpu'] for r in runs):5.2f} s, "
                      f"peak RSS max {max(r['rss'] for r in runs) / 1e6:.0f} MB")
        return 0
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
