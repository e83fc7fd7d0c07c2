#!/usr/bin/env python3
"""Scale benchmark (issue 16): export and import cost the data, not the virtual size.

The same 1 GiB of random data (64 runs of 16 MiB spread over the volume, the
rest holes) in sparse volumes of 16 GiB, 1 TiB and 64 TiB (on an XFS loop
filesystem: ext4 files stop at 16 TiB). For each: a snapshot (not timed), the
export to SeaweedFS (timed, peak RSS of the process from the export's start),
then a fresh process imports the object (timed, peak RSS). Every timed upload (the
export, the aws anchor) goes to a SeaweedFS of its own, started empty: one
holding the earlier steps' gigabytes answers slower, which biased the later
step of each pair. Anchors measured in the same run: `aws s3 cp` uploading the
same object bytes (line rate, every case; its file evicted from the page cache
first, as the export's packs are, written with O_DIRECT), and the user's alternative to an
import for the 16 GiB case: `aws s3 cp` of the object down, then `qemu-img
convert -O raw` into a sparse file. The
16 GiB case is also exported with 256 MiB parts (``--spill-part``): parts too
big for memory are spilled to temporary files, as for volumes holding more
than ~250 GiB; its time and peak RSS are printed beside the default's.

Each case runs ``--repeat`` rounds (default 3) of export, import and both aws
steps in turn, and each step's median is compared (peak RSS: the highest): on
2 shared cores one step moves by +-20 % between rounds (session 11: the same
export 6.4-9.5 s in one hour), which decided single-round verdicts.
``--server-dir /dev/shm`` keeps SeaweedFS's data off the disk.

Targets: export and import at 1 TiB <= 1.2x their 16 GiB time, at 64 TiB
<= 1.5x; export >= 1.0x the aws upload's throughput in every case; import of
the 16 GiB case >= 1.0x the alternative; peak RSS <= 200 MB in every case.

    .venv/bin/python scripts/bench/scale.py [--dir DIR] [--keep] [--sizes 16G,1T,64T]
        [--repeat 3] [--server-dir DIR]

Needs root (mounts the XFS loop filesystem), qemu-img and the aws CLI (awscli
from PyPI; installed into a venv of its own when `aws` is not on PATH).
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

from fixtures_s3 import ADMIN, SeaweedServer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pagecache import evict, add_reclaim_option, reclaim_paused  # noqa: E402

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
RUN = 16 * MiB
RUNS = 64  # 1 GiB in all
SIZES = {"16G": 16 * GiB, "1T": TiB, "64T": 64 * TiB}

EXPORT = """
import json, sys, time, trio
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
    store, path, endpoint, ak, sk, bucket, key, part_mib = sys.argv[1:9]
    settings = S3Settings(endpoint=endpoint, region="us-east-1", access_key=ak, secret_key=sk)
    if int(part_mib):  # bigger parts than memory holds: spilled to temporary files
        settings = settings.replace(part_size=int(part_mib) << 20)
    objects = S3ObjectStorage(settings)
    async with open_local_service(store, objects=objects) as svc:
        vol = await svc.add_volume("bench", path)
        t = time.perf_counter()
        snap = await svc.create_snapshot("fr-par-1", name="s", volume_id=vol.id)
        while (await svc.get_snapshot("fr-par-1", snap.id)).state == "snapshotting":
            await trio.sleep(0.01)
        snap_s = time.perf_counter() - t
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: the export's own peak
            f.write("5")
        t = time.perf_counter()
        task = await svc.export_snapshot("fr-par-1", snap.id, bucket=bucket, key=key)
        while (task := await svc.get_task("fr-par-1", task.id)).status in ("pending", "started"):
            await trio.sleep(POLL)
        dt = time.perf_counter() - t
        rss = rss_peak()
    await objects.aclose()
    print(json.dumps({"seconds": dt, "snapshot": snap_s, "status": task.status,
                      "error": task.error, "bytes": task.bytes, "rss": rss}))
trio.run(main)
"""

IMPORT = """
import json, sys, time, trio
from snapfs.local import open_local_service
from snapfs.memory import limit_malloc_arenas
from snapfs.s3.storage import S3ObjectStorage
from snapfs.s3.config import S3Settings
limit_malloc_arenas()
# The task's state is read every 50 ms: at 10 ms the reads (SQLite, in this
# process) cost ~0.4 CPU-s per export (export_ab.py rounds), which no daemon spends.
POLL = 0.05

async def main():
    store, endpoint, ak, sk, bucket, key = sys.argv[1:7]
    objects = S3ObjectStorage(S3Settings(endpoint=endpoint, region="us-east-1",
                                         access_key=ak, secret_key=sk))
    async with open_local_service(store, objects=objects) as svc:
        t = time.perf_counter()
        imp = await svc.create_snapshot("fr-par-1", name="back", bucket=bucket, key=key)
        while (imp := await svc.get_snapshot("fr-par-1", imp.id)).state == "importing":
            await trio.sleep(POLL)
        dt = time.perf_counter() - t
    await objects.aclose()
    rss = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")]
    print(json.dumps({"seconds": dt, "state": imp.state, "error": imp.error_reason,
                      "rss": rss[0]}))
trio.run(main)
"""


def aws_cli() -> str:
    found = shutil.which("aws")
    if found:
        return found
    venv = ROOT / ".venv" / "awscli-venv"
    exe = venv / "bin" / "aws"
    if not exe.exists():  # awscli pins an exact botocore: a venv of its own
        print("bench: installing awscli into", venv, file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q",
                        "--disable-pip-version-check", "awscli"], check=True)
    return str(exe)


def make_volume(path: Path, size: int) -> None:
    import blake3
    stride = size // RUNS
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(RUNS):
            f.seek(i * stride + (i % 7) * MiB)
            f.write(blake3.blake3(i.to_bytes(8, "little")).digest(length=RUN))
    subprocess.run(["sync"], check=True)


def py(script: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                       env=env)
    if r.returncode:
        sys.stderr.write(r.stderr[-3000:])
        raise SystemExit("bench: a step failed")
    return json.loads(r.stdout.strip().splitlines()[-1])


def timed(*cmd: str, env: dict | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--sizes", default="16G,1T,64T", help="virtual sizes (16G, 1T, 64T)")
    ap.add_argument("--spill-part", type=int, default=256, metavar="MIB",
                    help="also export the 16G case with parts this big (spilled to "
                         "temporary files: what volumes with >~250 GiB of data get); 0: not")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds per case; each step's median is compared")
    ap.add_argument("--server-dir", type=Path, default=None,
                    help="where SeaweedFS keeps its data (default: the work directory)")
    add_reclaim_option(ap)
    args = ap.parse_args()
    aws = aws_cli()
    work = Path(tempfile.mkdtemp(prefix="snapfs-bench-scale-", dir=args.dir))
    servers: list[SeaweedServer] = []

    def fresh_server(tag: str) -> tuple[SeaweedServer, str]:
        """A SeaweedFS of its own, empty: every timed upload meets the same
        server state (one holding earlier cases' gigabytes answers slower)."""
        for old in servers:
            old.stop()
            shutil.rmtree(old.root, ignore_errors=True)
        servers.clear()
        server = SeaweedServer((args.server_dir or work) / f"snapfs-bench-seaweedfs-{tag}")
        servers.append(server)
        server.start()
        return server, server.new_bucket()

    fs_img, mnt = work / "xfs.img", work / "xfs"
    mounted = False
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ADMIN[0], AWS_SECRET_ACCESS_KEY=ADMIN[1],
               AWS_DEFAULT_REGION="us-east-1", AWS_REQUEST_CHECKSUM_CALCULATION="when_required",
               AWS_RESPONSE_CHECKSUM_VALIDATION="when_required")
    results: dict[str, dict] = {}
    try:
        with open(fs_img, "wb") as f:
            f.truncate(8 * GiB)
        subprocess.run(["mkfs.xfs", "-q", str(fs_img)], check=True, stdout=subprocess.DEVNULL)
        mnt.mkdir()
        subprocess.run(["mount", "-o", "loop", str(fs_img), str(mnt)], check=True)
        mounted = True
        print(f"load before: {os.getloadavg()}")
        for name in args.sizes.split(","):
            size = SIZES[name]
            vol = mnt / f"vol-{name}.raw"
            make_volume(vol, size)
            key = f"snap-{name}.qcow2"
            obj = work / "object.qcow2"
            steps: dict[str, list[float]] = {k: [] for k in (
                "export", "export_rss", "snapshot", "import_", "import_rss", "aws_up",
                "aws_down", "convert")}
            for rep in range(args.repeat):  # each step's median: one round moves by +-20 %
                server, bucket = fresh_server(f"{name}-export")
                ours = py(EXPORT, str(work / f"store-{name}"), str(vol), server.endpoint,
                          ADMIN[0], ADMIN[1], bucket, key, "0")
                if ours["status"] != "success":
                    raise SystemExit(f"bench: export failed: {ours['error']}")
                shutil.rmtree(work / f"store-{name}", ignore_errors=True)
                back = py(IMPORT, str(work / f"import-{name}"), server.endpoint, ADMIN[0],
                          ADMIN[1], bucket, key)
                if back["state"] != "available":
                    raise SystemExit(f"bench: import failed: {back['error']}")
                shutil.rmtree(work / f"import-{name}", ignore_errors=True)
                # The anchors: the same object's bytes down and up with the aws CLI.
                down = timed(aws, "s3", "cp", "--only-show-errors", "--endpoint-url",
                             server.endpoint, f"s3://{bucket}/{key}", str(obj), env=env)
                server, bucket = fresh_server(f"{name}-aws")  # as empty as the export's was
                # The export reads packs its capture wrote with O_DIRECT (not cached):
                # the anchor reads its source from the disk too, not the page cache.
                evict(obj, write_back=True)
                up = timed(aws, "s3", "cp", "--only-show-errors", "--endpoint-url",
                           server.endpoint, str(obj), f"s3://{bucket}/copy-{key}", env=env)
                if size <= 16 * GiB:
                    out = work / "converted.raw"
                    steps["convert"].append(timed("qemu-img", "convert", "-f", "qcow2",
                                                  "-O", "raw", str(obj), str(out)))
                    out.unlink()
                if name == "16G" and args.spill_part and rep == 0:  # not compared
                    spill = py(EXPORT, str(work / f"store-{name}"), str(vol), server.endpoint,
                               ADMIN[0], ADMIN[1], bucket, f"spill-{key}",
                               str(args.spill_part))
                    shutil.rmtree(work / f"store-{name}", ignore_errors=True)
                    if spill["status"] != "success":
                        raise SystemExit(f"bench: export failed: {spill['error']}")
                    print(f"16G export with {args.spill_part} MiB parts (spilled to "
                          f"temporary files, after the anchor, on its server): "
                          f"{spill['seconds']:6.2f} s, peak RSS {spill['rss'] / 1e6:.0f} MB "
                          f"(memory parts: {ours['seconds']:6.2f} s, "
                          f"{ours['rss'] / 1e6:.0f} MB)")
                obj.unlink()
                for k, v in (("export", ours["seconds"]), ("export_rss", ours["rss"]),
                             ("snapshot", ours["snapshot"]), ("import_", back["seconds"]),
                             ("import_rss", back["rss"]), ("aws_up", up), ("aws_down", down)):
                    steps[k].append(v)
                print(f"{name:>4} round {rep}: export {ours['seconds']:6.2f} s, aws up "
                      f"{up:6.2f} s | import {back['seconds']:6.2f} s, aws down {down:6.2f} s"
                      f" | load {os.getloadavg()[0]:.1f}")
            vol.unlink()
            med = statistics.median
            r = results[name] = dict(
                export=med(steps["export"]), export_rss=max(steps["export_rss"]),
                snapshot=med(steps["snapshot"]), bytes=ours["bytes"],
                import_=med(steps["import_"]), import_rss=max(steps["import_rss"]),
                aws_up=med(steps["aws_up"]), aws_down=med(steps["aws_down"]),
                convert=med(steps["convert"]) if steps["convert"] else None,
                load=os.getloadavg())
            print(f"{name:>4}: snapshot {r['snapshot']:6.2f} s | export {r['export']:6.2f} s "
                  f"(object {r['bytes'] / MiB:.0f} MiB, peak RSS {r['export_rss'] / 1e6:.0f} MB)"
                  f" | import {r['import_']:6.2f} s (peak RSS {r['import_rss'] / 1e6:.0f} MB)"
                  f" | aws up {r['aws_up']:6.2f} s, aws down {r['aws_down']:6.2f} s"
                  + (f", qemu-img convert {r['convert']:6.2f} s" if r["convert"] else "")
                  + f" | load {r['load'][0]:.1f}  (medians of {args.repeat}; peak RSS: max)")
        verdicts(results)
        return 0
    finally:
        for server in servers:
            server.stop()
            shutil.rmtree(server.root, ignore_errors=True)
        if mounted and subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)])
        if args.keep:
            print("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


def verdicts(results: dict[str, dict]) -> None:
    def say(what: str, value: float, target: str, ok: bool) -> None:
        print(f"{what}: {value:.2f} (target {target}) {'OK' if ok else 'MISSED'}")
    base = results.get("16G")
    for name, limit in (("1T", 1.2), ("64T", 1.5)):
        if base and name in results:
            for step in ("export", "import_"):
                ratio = results[name][step] / base[step]
                say(f"{step.rstrip('_')} {name} / 16G time", ratio, f"<= {limit}", ratio <= limit)
    for name, r in results.items():
        ratio = r["aws_up"] / r["export"]
        say(f"export {name} vs aws s3 cp upload (throughput)", ratio, ">= 1.0", ratio >= 1.0)
        peak = max(r["export_rss"], r["import_rss"])
        say(f"peak RSS {name} (MB)", peak / 1e6, "<= 200", peak <= 200e6)
    if base and base["convert"] is not None:
        alt = base["aws_down"] + base["convert"]
        ratio = alt / base["import_"]
        say("import 16G vs aws s3 cp + qemu-img convert (throughput)", ratio, ">= 1.0",
            ratio >= 1.0)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    with reclaim_paused("--leave-reclaim" not in sys.argv):
        sys.exit(main())
