#!/usr/bin/env python3
"""Cloud read benchmark: image.raw through `snapfs mount --backend scaleway` vs
`qemu-img convert -f qcow2 -O raw` reading the same QCOW2 object over HTTP.

Everything is real and local: SeaweedFS (`weed mini`) as Object Storage, a local
store with a volume holding DATA MiB of random data (plus holes) served as the
Scaleway Instance API by `snapfs serve`, and a cloud-backend mount of it. The
first open of image.raw exports the snapshot to the staging bucket (timed on its
own); then `dd bs=1M` streams image.raw through FUSE -> the cloud backend ->
ranged GETs of that object, and qemu-img (curl driver, Debian qemu-block-extra)
converts the very same object to a null target. Rounds alternate the two readers
so both see the same server state; the best round of each is compared.

qemu reads the object by a plain URL with anonymous read allowed on the bench
bucket: a presigned GET URL cannot serve qemu's curl driver, whose first request
is a HEAD, which S3 refuses for a GET signature (403; the signature covers the
method -- checked against SeaweedFS). snapfs reads with signed requests.

Targets (issue 5): snapfs >= 1.0x qemu-img's throughput; daemon peak RSS <= 200 MB.

    .venv/bin/python scripts/bench/cloud_read.py [--data-mib 1024] [--rounds 2]
                                                 [--dir DIR] [--keep] [--no-verify]
                                                 [--variant NAME:K=V,K=V ...]

``--variant``: paired A/B of daemon settings: one more mount per variant, its
daemon started with these extra environment variables (knobs a change under
test reads), all mounts read in every round, order rotated. CPU seconds of the
daemon(s), SeaweedFS and qemu-img are printed per round: on 2 cores the CPU one
reader spends is taken from the server.
"""

from __future__ import annotations

import argparse
import json
import resource
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # the SeaweedFS and `snapfs serve` helpers

from fixtures_http import ACCESS_KEY, SECRET, start_server, stop_server  # noqa: E402
from fixtures_s3 import ADMIN, SeaweedServer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
# evict: image.raw's pages, so the next read reaches the daemon
from pagecache import evict, add_reclaim_option, reclaim_paused  # noqa: E402
from readahead import parse_variant, tune  # noqa: E402
from verdict import mark  # noqa: E402

MiB = 1 << 20
BUCKET = "snapfs-bench"
STEP_TIMEOUT = 900.0
STALL = 15.0  # seconds without qemu-img progress output: a hang


#: The cloud backend's image reader without FUSE, in a process of its own: where
#: the time goes (backend + S3 reader vs the mount's FUSE path).
BACKEND_READ = """
import sys, time, trio
from snapfs.s3.storage import object_storage_from_config
from snapfs.scaleway import open_scaleway_service

async def main():
    endpoint, bucket, sid = sys.argv[1:4]
    objects = object_storage_from_config(endpoint)
    async with open_scaleway_service(staging_bucket=bucket, objects=objects) as svc:
        t = time.perf_counter()
        r = await svc.open_image("fr-par-1", sid)
        off = 0
        while off < r.size:
            b = await r.read(off, 1 << 20)
            if not b:
                raise SystemExit(f"short read at {off}")
            off += len(b)
        print(time.perf_counter() - t)
        await r.aclose()
        assert svc._images.exports_started == 0  # the staged export was reused
    await objects.aclose()

trio.run(main)
"""


class BenchSeaweed(SeaweedServer):
    """The test SeaweedFS, plus anonymous read of the bench bucket (for qemu)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        cfg = json.loads(self.config.read_text())
        cfg["identities"].append({"name": "anonymous", "actions": [f"Read:{BUCKET}"]})
        self.config.write_text(json.dumps(cfg))


def snapfs(*args: str | Path, env: dict[str, str] | None = None) -> str:
    """Run ``python -m snapfs`` from / (``-m`` puts the working directory first on
    sys.path: a variant's PYTHONPATH, another checkout, would not count), this
    checkout's code unless ``env`` names another PYTHONPATH."""
    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHONPATH", str(ROOT))
    res = subprocess.run([sys.executable, "-m", "snapfs", *map(str, args)], cwd="/",
                         capture_output=True, text=True, env=env, timeout=600)
    if res.returncode:
        raise SystemExit(f"snapfs {args[0]} failed: {res.stderr.strip()}")
    return res.stdout


def make_volume(path: Path, data: int) -> None:
    """``data`` bytes of random data in three runs, with holes between and after."""
    rnd = random.Random(1)
    size = data + data // 2
    runs = [(0, data // 2), (data * 5 // 8, data // 4), (size - data // 4 - 8 * MiB,
                                                          data - data // 2 - data // 4)]
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in runs:
            f.seek(off)
            while n > 0:
                k = min(n, 16 * MiB)
                f.write(rnd.randbytes(k))
                n -= k


def step(what: str) -> None:
    print(f"... {what}", file=sys.stderr, flush=True)


def dd_read(image: Path, size: int) -> float:
    """Seconds for dd to stream the whole image (checked: every byte was read)."""
    evict(image)
    cmd = ["dd", f"if={image}", "of=/dev/null", "bs=1M"]
    step(" ".join(cmd)[:120])
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    elapsed = time.perf_counter() - t
    if res.returncode:
        raise SystemExit(f"dd failed: {res.stderr.strip()[-2000:]}")
    copied = int(res.stderr.strip().splitlines()[-1].split()[0])
    if copied != size:
        raise SystemExit(f"dd read {copied} bytes of {size}: {res.stderr.strip()}")
    return elapsed


def loopback_bytes() -> int:
    """Bytes received on the loopback interface so far (the whole machine: an upper
    bound of the daemon's S3 traffic; below the image's data means a cache served it)."""
    return int(Path("/sys/class/net/lo/statistics/rx_bytes").read_text())


def qemu_convert(src: str, size: int) -> tuple[float, str, int]:
    """qemu-img convert with its defaults (8 coroutines). This qemu's curl driver
    sometimes hangs with several coroutines (the known qemu-img convert hang that
    osbuild works around with -m 1): a run whose progress (-p) stalls for
    STALL seconds is killed and rerun, and after three hangs -m 1 is used.
    Returns (seconds, mode, hangs)."""
    hangs = 0
    for coroutines in (None, None, None, 1):
        cmd = ["qemu-img", "convert", "-p", "-n", "-f", "qcow2", src,
               "--target-image-opts", f"driver=null-co,size={size}"]
        if coroutines:
            cmd[2:2] = ["-m", str(coroutines)]
        step(" ".join(cmd)[:120])
        elapsed = _run_watching_progress(cmd)
        if elapsed is None:
            hangs += 1
            print(f"    qemu-img stalled for {STALL:.0f} s: killed", file=sys.stderr)
            continue
        return elapsed, f"-m {coroutines}" if coroutines else "default", hangs
    raise SystemExit("qemu-img hung every time, even with -m 1")


def _run_watching_progress(cmd: list[str]) -> float | None:
    """Run ``cmd``; its seconds, or None if its output stalled (then it is killed)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    last = time.monotonic()
    while proc.poll() is None:
        time.sleep(0.05)
        try:
            chunk = os.read(proc.stdout.fileno(), 65536)
        except BlockingIOError:
            chunk = b""
        if chunk:
            last = time.monotonic()
        elif time.monotonic() - last > STALL:
            proc.kill()
            proc.wait()
            return None
    elapsed = time.perf_counter() - t
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode:
        raise SystemExit(f"qemu-img failed: {err.strip()[-2000:]}")
    return elapsed


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def parse_env_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    env = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    return name, env


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-mib", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--no-verify", action="store_true", help="skip the final cmp")
    p.add_argument("--direct-io", action="store_true",
                   help="mount with --direct-io instead of the default page-cache mode")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:K=V,K=V",
                   help="one more mount whose daemon gets these environment variables; "
                        "every mount is read in every round (paired A/B)")
    p.add_argument("--profile", type=Path, default=None,
                   help="py-spy --native profile of the base daemon's first read "
                        "(.svg: flame graph, else collapsed stacks)")
    p.add_argument("--no-backend", action="store_true",
                   help="skip the reader-without-FUSE run of each round")
    p.add_argument("--kernel", action="append", default=[], metavar="ra=KB,bg=N,cong=N",
                   help="paired A/B: each round reads once per setting of the mount's "
                        "kernel read-ahead / FUSE queue (readahead.py); '' = the daemon's")
    add_reclaim_option(p)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="snapfs-cloud-bench-", dir=args.dir or "/var/tmp"))
    s3 = BenchSeaweed(work / "s3")
    server = mnt = None
    mounts: list[Path] = []
    try:
        s3.start()
        s3.client().create_bucket(Bucket=BUCKET)
        vol = work / "volume.raw"
        step("writing the volume")
        make_volume(vol, args.data_mib * MiB)
        store = work / "store"
        snapfs("volume", "add", "bench", vol, "--store", store)
        s3_env = {"AWS_ACCESS_KEY_ID": ADMIN[0], "AWS_SECRET_ACCESS_KEY": ADMIN[1],
                  "AWS_DEFAULT_REGION": "us-east-1"}
        server, url = start_server(store, work / "serve.log",
                                   {"SCW_SECRET_KEY": SECRET, **s3_env},
                                   ["--s3-endpoint", s3.endpoint])
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SCW_", "AWS_"))}
        env.update(s3_env, SCW_ACCESS_KEY=ACCESS_KEY, SCW_SECRET_KEY=SECRET, SCW_API_URL=url,
                   SCW_DEFAULT_ZONE="fr-par-1", SCW_CONFIG_PATH=str(work / "no-scw.yaml"))

        variants: list[tuple[str, dict[str, str]]] = [("base", {})]
        variants += [parse_env_variant(v) for v in args.variant]
        for i, (vname, venv) in enumerate(variants):
            m = work / f"mnt{i}"
            m.mkdir()
            snapfs("mount", m, "--store", work / f"mount-state{i}", "--backend", "scaleway",
                   "--staging-bucket", BUCKET, "--s3-endpoint", s3.endpoint,
                   *(["--direct-io"] if args.direct_io else []), env={**env, **venv})
            mounts.append(m)
        mnt = mounts[0]
        daemons = [int(os.getxattr(m, "user.pid")) for m in mounts]
        daemon = daemons[0]
        name = f"bench-{uuid.uuid4().hex[:6]}"
        snap_dir = mnt / "fr-par-1" / "default" / "snapshots" / name
        step("snapshot (mkdir)")
        t = time.perf_counter()
        os.mkdir(mnt / "fr-par-1" / "default" / "volumes" / "bench" / name)
        while os.getxattr(snap_dir, "user.state").decode() != "available":
            time.sleep(0.05)
        capture_s = time.perf_counter() - t
        image = snap_dir / "image.raw"
        size = os.stat(image).st_size
        images = [m / image.relative_to(mnt) for m in mounts]

        # First open: the export to the staging bucket (then the QCOW2 header/L1 read).
        step("first open of image.raw (export)")
        t = time.perf_counter()
        with open(image, "rb") as f:
            f.read(4096)
        export_s = time.perf_counter() - t
        for other in images[1:]:  # the staged export is reused
            with open(other, "rb") as f:
                f.read(4096)
        keys = [o["Key"] for o in s3.client().list_objects_v2(
            Bucket=BUCKET, Prefix="snapfs-staging/").get("Contents", [])]
        assert len(keys) == 1, keys
        qcow2_bytes = s3.client().head_object(Bucket=BUCKET, Key=keys[0])["ContentLength"]
        qemu_src = "json:" + json.dumps({"file": {"driver": "http",
                                                   "url": f"{s3.endpoint}/{BUCKET}/{keys[0]}"}})

        kernels = [parse_variant(k) if k else {} for k in args.kernel]
        knames = args.kernel or [""]
        by_kernel: dict[str, list[float]] = {k: [] for k in knames}
        cloud: list[float] = []
        qemu: list[float] = []
        modes: list[str] = []
        hangs = 0
        fetched: list[int] = []
        backend: list[float] = []
        sid = os.getxattr(snap_dir, "user.id").decode()
        by_variant: dict[str, list[float]] = {v: [] for v, _ in variants}
        cpu_variant: dict[str, list[float]] = {v: [] for v, _ in variants}
        cpu_weed: list[tuple[float, float]] = []
        cpu_qemu: list[float] = []
        assert s3.proc is not None
        weed = s3.proc.pid
        for r in range(args.rounds):
            if not args.no_backend:
                step("backend read without FUSE")
                res = subprocess.run([sys.executable, "-c", BACKEND_READ, s3.endpoint, BUCKET,
                                      sid], capture_output=True, text=True, env=env,
                                     timeout=STEP_TIMEOUT)
                if res.returncode:
                    raise SystemExit(f"backend read failed: {res.stderr.strip()[-2000:]}")
                backend.append(float(res.stdout.split()[-1]))
            else:
                backend.append(float("nan"))
            w0 = cpu_seconds(weed)
            for v in [(r + j) % len(variants) for j in range(len(variants))]:  # rotated
                vname = variants[v][0]
                c0 = cpu_seconds(daemons[v])
                if v:
                    by_variant[vname].append(dd_read(images[v], size))
                    cpu_variant[vname].append(cpu_seconds(daemons[v]) - c0)
                    continue
                spy = None
                if args.profile and r == 0:
                    spy = subprocess.Popen(["py-spy", "record", "--native", "-r", "200", "-p",
                                            str(daemon), "-o", str(args.profile), "-f",
                                            "flamegraph" if args.profile.suffix == ".svg"
                                            else "raw"],
                                           stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
                    time.sleep(1.0)
                before = loopback_bytes()
                for i in [(r + j) % len(knames) for j in range(len(knames))]:  # rotated
                    if kernels:
                        tune(mnt, kernels[i])
                    by_kernel[knames[i]].append(dd_read(image, size))
                if spy is not None:
                    spy.send_signal(2)
                    spy.wait()
                cloud.append(min(by_kernel[k][-1] for k in knames))  # the best setting
                fetched.append((loopback_bytes() - before) // len(knames))
                by_variant["base"].append(cloud[-1])
                cpu_variant["base"].append((cpu_seconds(daemon) - c0) / len(knames))
            w1, q0 = cpu_seconds(weed), children_cpu()
            q, mode, h = qemu_convert(qemu_src, size)
            cpu_qemu.append(children_cpu() - q0)
            cpu_weed.append(((w1 - w0) / len(variants), cpu_seconds(weed) - w1))
            qemu.append(q)
            modes.append(mode)
            hangs += h
        rss = peak_rss(daemon)
        rss_of = [peak_rss(d) for d in daemons]  # before the cmp reads it all again
        if not args.no_verify:
            for im in images:
                subprocess.run(["cmp", str(im), str(vol)], check=True)

        best_c, best_q = min(cloud), min(qemu)
        ratio = best_q / best_c  # throughput ratio = inverse time ratio
        print(f"image {size / MiB:.0f} MiB virtual, {args.data_mib} MiB data; "
              f"QCOW2 object {qcow2_bytes / MiB:.0f} MiB; mount "
              f"{'--direct-io' if args.direct_io else 'page cache (default)'}")
        print(f"capture (mkdir -> available) {capture_s:6.2f} s")
        print(f"snapshot owned by the {os.getxattr(snap_dir, 'user.api').decode()} API")
        print(f"first open (export to staging) {export_s:6.2f} s")
        print(f"{'round':<6} {'snapfs s':>9} {'MiB/s':>7} {'lo MiB':>8} "
              f"{'qemu-img s':>11} {'MiB/s':>7} {'no-FUSE s':>10}")
        for i, (c, n, q, mode, b) in enumerate(zip(cloud, fetched, qemu, modes, backend), 1):
            print(f"{i:<6} {c:9.2f} {size / MiB / c:7.0f} {n / MiB:8.0f} {q:11.2f} "
                  f"{size / MiB / q:7.0f} {b:10.2f}  (qemu-img {mode})")
        print("(no-FUSE: the cloud backend's image reader read directly, 1 MiB reads)")
        print("CPU s per round: " + "; ".join(
            f"{i}: daemon {cpu_variant['base'][i - 1]:.2f}, weed during snapfs "
            f"{cpu_weed[i - 1][0]:.2f} (per mount read) / during qemu-img "
            f"{cpu_weed[i - 1][1]:.2f}, qemu-img {cpu_qemu[i - 1]:.2f}"
            for i in range(1, len(cloud) + 1)))
        for vname, venv in variants:
            ts = by_variant[vname]
            print(f"variant {vname} {venv}: snapfs/qemu-img {best_q / min(ts):.2f}x best, "
                  f"{statistics.median(qemu) / statistics.median(ts):.2f}x median "
                  f"({', '.join(f'{t:.2f}' for t in ts)} s; daemon CPU "
                  f"{', '.join(f'{c:.2f}' for c in cpu_variant[vname])} s; peak RSS "
                  f"{rss_of[[v for v, _ in variants].index(vname)] / 1e6:.0f} MB)")
        print("(lo MiB: loopback traffic during the round, all processes: at least the "
              "data fetched)")
        if hangs:
            print(f"qemu-img hung {hangs} time(s) with its default coroutines (killed, rerun)")
        fell_back = [i for i, mode in enumerate(modes, 1) if mode != "default"]
        if fell_back:  # one coroutine is slower than qemu-img's default 8: say so
            print(f"FALLBACK: round(s) {', '.join(map(str, fell_back))} fell back to "
                  f"qemu-img -m 1 (hung three times with 8 coroutines); their qemu-img "
                  f"time is not the default's and flatters snapfs")
        else:
            print("qemu-img ran with its default coroutines in every round")
        print("load average (1, 5, 15 min): %.2f %.2f %.2f" % os.getloadavg())
        if kernels:
            for k in knames:
                print(f"kernel {k or 'daemon default'}: snapfs/qemu-img "
                      f"{best_q / min(by_kernel[k]):.2f}x best, "
                      f"{statistics.median(qemu) / statistics.median(by_kernel[k]):.2f}x "
                      f"median ({', '.join(f'{t:.2f}' for t in by_kernel[k])} s)")
        med = statistics.median(qemu) / statistics.median(cloud)
        print(f"median rounds: snapfs/qemu-img {med:.2f}x")
        print(f"throughput snapfs/qemu-img {mark(ratio, 1.0)}x (best rounds; target >= 1.0) "
              f"{'OK' if ratio >= 1.0 else 'MISSED'}")
        print(f"daemon peak RSS {rss / 1e6:.0f} MB (target <= 200) "
              f"{'OK' if rss <= 200e6 else 'MISSED'}")
        if not args.no_verify:
            print("image.raw == volume (cmp)")
    finally:
        for m in mounts:
            if os.path.ismount(m):
                if subprocess.run(["fusermount3", "-u", str(m)]).returncode:
                    subprocess.run(["fusermount3", "-u", "-z", str(m)])
                time.sleep(0.5)
        if server is not None:
            stop_server(server)
        s3.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    with reclaim_paused("--leave-reclaim" not in sys.argv):
        main()
