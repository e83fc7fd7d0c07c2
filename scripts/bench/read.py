#!/usr/bin/env python3
"""Read benchmark: a snapshot's image.raw streamed through the mount, side by side
with the Python-FUSE ceiling (../shared/bench/passthrough_ceiling.py) serving the
same bytes, in the same run.

    .venv/bin/python scripts/bench/read.py [--size-mib 2048] [--runs 3] [--dir DIR]

A volume of --size-mib (random bytes; --hole-percent of it left as holes) is
registered in a fresh store, snapshotted through the mount (mkdir), then read
with ``dd bs=1M`` and with ``cat`` from both mounts, after one warm-up pass each
(so both sources are in the page cache: the ceiling's backing file, snapfs's pack
files). snapfs is timed twice per run: the first read on a freshly started mount
(every byte through the daemon) and the same read again (by default from the
kernel's page cache of image.raw; with ``--mount-args=--direct-io`` again through
the daemon, from the packs' page cache). Medians of --runs. Targets: snapfs >=
0.8x the ceiling for both tools; the daemon's peak RSS <= 200 MB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pagecache import add_reclaim_option, reclaim_paused  # noqa: E402
from verdict import mark  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
#: ../shared/bench beside the checkout (a worktree's is further up).
CEILING = next((p / "shared" / "bench" / "passthrough_ceiling.py" for p in ROOT.parents
                if (p / "shared" / "bench" / "passthrough_ceiling.py").is_file()),
               ROOT.parent / "shared" / "bench" / "passthrough_ceiling.py")
MiB = 1 << 20
#: snapfs against the ceiling, first read and again (issues 17 and 19).
TARGET = 0.8


def sh(*cmd: object, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True,
                          **kw)  # type: ignore[call-overload]


def snapfs(*args: object) -> subprocess.CompletedProcess[str]:
    return sh(sys.executable, "-m", "snapfs", *args)


def mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def make_volume(path: Path, size: int, hole_percent: int) -> None:
    import blake3
    data_end = size * (100 - hole_percent) // 100
    with open(path, "wb") as f:
        f.truncate(size)
        xof = blake3.blake3(b"snapfs read bench")
        off = 0
        while off < data_end:
            n = min(64 * MiB, data_end - off)
            f.write(xof.digest(length=n, seek=off))
            off += n


def timed(cmd: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["sh", "-c", cmd], check=True)
    return time.perf_counter() - t0


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--hole-percent", type=int, default=0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--mount-args", default="", help="extra `snapfs mount` arguments")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    add_reclaim_option(ap)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="snapfs-read-", dir=args.dir))
    store, vol = work / "store", work / "volume.raw"
    mnt, cmnt = work / "mnt", work / "ceiling"
    mnt.mkdir()
    cmnt.mkdir()
    ceiling = None
    try:
        size = args.size_mib * MiB
        print(f"volume: {args.size_mib} MiB ({100 - args.hole_percent}% random data)")
        make_volume(vol, size, args.hole_percent)
        snapfs("volume", "add", "bench", vol, "--store", store)
        snapfs("mount", mnt, "--store", store, *args.mount_args.split())
        pid = int(os.getxattr(mnt, "user.pid"))
        vdir = mnt / "fr-par-1" / "default" / "volumes" / "bench"
        t0 = time.perf_counter()
        (vdir / "snap").mkdir()
        snapfs("wait", vdir / "snap")
        print(f"snapshot taken through the mount in {time.perf_counter() - t0:.2f}s")
        image = vdir / "snap" / "image.raw"
        rss = peak_rss_mb(pid)

        ceiling = subprocess.Popen([sys.executable, str(CEILING), str(cmnt), str(vol)])
        deadline = time.monotonic() + 30
        while not mounted(cmnt):
            if time.monotonic() > deadline or ceiling.poll() is not None:
                raise SystemExit("the ceiling did not mount")
            time.sleep(0.05)
        cimage = cmnt / "image.raw"

        tools = {"dd bs=1M": "dd if={} of=/dev/null bs=1M status=none",
                 "cat": "cat {} > /dev/null"}
        for path in (cimage, image):  # both sources warm in the page cache
            timed(tools["cat"].format(path))
        first: dict[str, list[float]] = {t: [] for t in tools}
        again: dict[str, list[float]] = {t: [] for t in tools}
        ceil: dict[str, list[float]] = {t: [] for t in tools}
        for _ in range(args.runs):  # interleaved: all see the same machine load
            for tool, tmpl in tools.items():
                # A fresh mount: nothing of the image in the mount's page cache,
                # every byte comes through the daemon (chunk lookup + hash check).
                snapfs("umount", mnt)
                snapfs("mount", mnt, "--store", store, *args.mount_args.split())
                pid = int(os.getxattr(mnt, "user.pid"))
                first[tool].append(timed(tmpl.format(image)))
                again[tool].append(timed(tmpl.format(image)))
                ceil[tool].append(timed(tmpl.format(cimage)))
                rss = max(rss, peak_rss_mb(pid))
        gbps = {k: {t: size / statistics.median(v[t]) / 1e9 for t in tools}
                for k, v in (("first", first), ("again", again), ("ceiling", ceil))}
        print()
        print(f"{'tool':<9} {'ceiling':>8} {'snapfs 1st':>11} {'ratio':>6} "
              f"{'snapfs again':>13} {'ratio':>6}   (GB/s, median of {args.runs})")
        for tool in tools:
            c, f1, f2 = gbps["ceiling"][tool], gbps["first"][tool], gbps["again"][tool]
            print(f"{tool:<9} {c:>8.2f} {f1:>11.2f} {mark(f1 / c, TARGET):>6} {f2:>13.2f} "
                  f"{mark(f2 / c, TARGET):>6}")
        print("1st: first read on a fresh mount (through the daemon); again: the same file "
              f"read again. Target >= {TARGET}; '!' marks a miss.")
        print(f"daemon peak RSS: {rss:.0f} MB (target <= 200)")
    finally:
        if ceiling is not None:
            ceiling.send_signal(signal.SIGTERM)
            try:
                ceiling.wait(timeout=10)
            except subprocess.TimeoutExpired:
                ceiling.kill()
        for m in (cmnt, mnt):
            if mounted(m):
                subprocess.run(["fusermount3", "-u", str(m)], check=False)
                if mounted(m):
                    subprocess.run(["fusermount3", "-u", "-z", str(m)], check=False)
        time.sleep(0.5)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    with reclaim_paused("--leave-reclaim" not in sys.argv):
        sys.exit(main())
